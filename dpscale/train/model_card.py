"""The model card: the saved model's README.md, so that the guarantee travels with the weights.

A folder of weights says nothing of how it was trained; PEFT's own README is an empty template.
This writes a Hugging Face model card (a YAML metadata header, then prose) whose header carries
the privacy figures under ``differential_privacy`` (epsilon, delta, the privacy unit, sigma, the
sample rate, the steps, the accountant, the clipping and R), read from the engine's privacy report,
so a hub or a script can read them, and whose prose says the same to a person, with how to load the
folder and what the noise key is. ``dpscale train``, DPTrainer and a user's own loop
(``dpscale.write_model_card(folder, engine)``) write the same card.

The noise key is named only as a warning: it is never written into the model folder.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

__all__ = ["KEY_NOTE", "card_metadata", "key_message", "load_snippet", "model_card", "write_job_card",
           "write_model_card"]

logger = logging.getLogger(__name__)

# What is true of the key, said once for the card, the CLI and the logs.
KEY_NOTE = (
    "The noise key is the seed of every noise draw and of every Poisson batch of the run. Keep it to resume "
    "(a checkpoint holds only its fingerprint; resuming without it is refused). Keep it secret and never ship it "
    "with the model: the (epsilon, delta) guarantee assumes that whoever sees the model does not know the noise. "
    "Whoever holds the key can regenerate every noise vector that was added and every batch that was drawn (which "
    "examples each step used); with the training trajectory, or for plain SGD with the start and end weights alone, "
    "they can subtract the noise, so against them the model carries no guarantee. Delete it once the run is final."
)

# dpscale's packaged model names -> the hub repositories their weights come from (card metadata names hub ids)
_PACKAGED_HUB_IDS = {"minilm-l6": "sentence-transformers/all-MiniLM-L6-v2",
                     "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}

# report key -> what the card calls it (the metadata keeps the report's names)
_FIGURES = ("epsilon", "delta", "privacy_unit", "protects", "noise_multiplier", "sample_rate", "steps",
            "planned_steps", "target_epsilon", "accountant", "sampling", "clipping", "clip_fn", "max_grad_norm",
            "expected_batch_size", "dataset_size", "examples_per_user")


def card_metadata(report: dict, *, base_model: str | None = None, task: str | None = None,
                  adapter: str | None = None) -> dict:
    """The YAML header: the Hugging Face fields (library, base model, pipeline, tags) and the privacy
    figures under ``differential_privacy``."""
    report = report or {}
    neighbours = "replace one" if report.get("sampling") == "shuffle" else "add or remove one"
    figures = {key: report.get(key) for key in _FIGURES}
    figures["neighbouring_datasets"] = f"{neighbours} {report.get('privacy_unit') or 'example'}"
    figures["noise_std_per_step"] = _noise_std(report)
    figures["mechanism"] = "DP-SGD: per-unit clipping, Gaussian noise once per step (dpscale)"
    meta: dict = {"library_name": "peft" if adapter == "lora" else "transformers"}
    if base_model:
        meta["base_model"] = base_model
    pipeline = {"causal-lm": "text-generation", "classification": "text-classification"}.get(task or "")
    if pipeline:
        meta["pipeline_tag"] = pipeline
    meta["tags"] = ["dpscale", "differential-privacy", "dp-sgd", *(["lora"] if adapter == "lora" else [])]
    meta["differential_privacy"] = figures if report else None
    return meta


def _noise_std(report: dict) -> float | None:
    sigma, bound = report.get("noise_multiplier"), report.get("max_grad_norm")
    return None if sigma is None or bound is None else float(sigma) * float(bound)


def model_card(report: dict, *, base_model: str | None = None, task: str | None = None,
               adapter: str | None = None, metrics: dict | None = None, how_to_load: str | None = None) -> str:
    """The card's text: the metadata header, then the guarantee, the mechanism, the results and how
    to load, in prose."""
    import yaml

    meta = card_metadata(report, base_model=base_model, task=task, adapter=adapter)
    r = meta["differential_privacy"]
    if r is None:
        return "\n".join(["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
                          "# Non-private fine-tune (dpscale baseline)", "",
                          "This model was trained **without differential privacy** (`--non-private`): it carries "
                          "no privacy guarantee for its training data.", ""]
                         + (["## How to load", "", "```python", how_to_load.strip(), "```", ""] if how_to_load else []))
    epsilon = r["epsilon"]
    unit = r["privacy_unit"] or "example"
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
        "# Differentially private fine-tune (dpscale)", "",
        f"This model was fine-tuned with DP-SGD by dpscale{f' from `{base_model}`' if base_model else ''}"
        f"{' as a LoRA adapter' if adapter == 'lora' else ''}.", "",
        "## Privacy guarantee", "",
    ]
    if epsilon is None:
        lines.append("No epsilon was accounted for this run (no dataset size was given): it carries no stated "
                     "guarantee.")
    else:
        lines.append(
            f"The training is **({epsilon:.4g}, {r['delta']:.3g})-differentially private** per {unit}: it protects "
            f"{r['protects'] or 'each ' + unit} of the {r['dataset_size']} {unit}s of the training set (neighbouring "
            f"datasets: {r['neighbouring_datasets']}). Epsilon is what the {r['accountant']} accountant "
            f"(dp-accounting) gives for the {r['steps']} step(s) taken of the subsampled Gaussian mechanism"
            + (f" (target epsilon {r['target_epsilon']:g})." if r.get("target_epsilon") is not None else "."))
    lines += [
        "", "## Mechanism", "",
        f"- privacy unit: {unit}",
        f"- sampling: {r['sampling']}, sample rate q = {_num(r['sample_rate'])} (expected batch "
        f"{_num(r['expected_batch_size'])} of {r['dataset_size']})",
        f"- clipping: {r['clipping']} ({r['clip_fn']}), max_grad_norm R = {_num(r['max_grad_norm'])}",
        f"- noise multiplier sigma = {_num(r['noise_multiplier'])}: Gaussian noise of std sigma R = "
        f"{_num(r['noise_std_per_step'])} on each step's clipped sum, drawn once per step",
        f"- steps taken: {r['steps']} (planned {r['planned_steps']}); accountant: {r['accountant']}",
        "",
        "The guarantee covers the training data only: the base model, and any data used to choose the "
        "hyperparameters or to evaluate, are not covered by it.",
    ]
    if metrics:
        lines += ["", "## This run", ""]
        for name, value in metrics.items():
            lines.append(f"- {name}: {value}")
    if how_to_load:
        lines += ["", "## How to load", "", "```python", how_to_load.strip(), "```"]
    lines += ["", "## The noise key", "", "The run's noise key is not in this folder, and must never be. " + KEY_NOTE,
              ""]
    return "\n".join(lines)


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def write_model_card(folder: str | os.PathLike, engine_or_report, *, base_model: str | None = None,
                     task: str | None = None, adapter: str | None = None, metrics: dict | None = None,
                     how_to_load: str | None = None) -> Path:
    """Write ``folder/README.md`` (replacing PEFT's template) from a PrivacyEngine or its privacy
    report (``engine.privacy_report()``); returns its path. ``base_model``, ``task`` and ``adapter``
    default to what ``dpscale_base.json`` in the folder records, when there is one."""
    folder = Path(folder)
    report = engine_or_report.privacy_report() if hasattr(engine_or_report, "privacy_report") else engine_or_report
    record_path = folder / "dpscale_base.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        task = task or record.get("task")
        adapter = adapter or record.get("adapter")
        base_model = base_model or record.get("base_model")
    elif (folder / "adapter_config.json").is_file():  # a PEFT adapter saved by the user's own loop
        peft_config = json.loads((folder / "adapter_config.json").read_text())
        adapter = adapter or ("lora" if peft_config.get("peft_type") == "LORA" else None)
        task = task or {"SEQ_CLS": "classification", "CAUSAL_LM": "causal-lm"}.get(peft_config.get("task_type"))
    if how_to_load is None and ((folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()):
        how_to_load = load_snippet(folder, task, adapter)
    text = model_card(report, base_model=base_model, task=task, adapter=adapter, metrics=metrics,
                      how_to_load=how_to_load)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "README.md"
    path.write_text(text)
    logger.info("model card written to %s", path)
    return path


def load_snippet(folder: str | os.PathLike, task: str | None, adapter: str | None, num_labels: int | None = None,
                base_saved_in: str | None = None, label_names: list[str] | None = None) -> str:
    """The few lines that load ``folder`` with transformers and PEFT alone. A LoRA classifier's label
    names are spelled out: PEFT builds the head from the base model's config, which has none."""
    folder = str(folder)
    head = "SequenceClassification" if task == "classification" else "CausalLM"
    labels = f", num_labels={num_labels}" if task == "classification" and num_labels not in (None, 2) else ""
    if task == "classification" and label_names:
        id2label = dict(enumerate(label_names))
        label2id = {name: i for i, name in id2label.items()}
        labels = f", num_labels={len(label_names)},\n    id2label={id2label!r}, label2id={label2id!r}"
    tokenizer = f"tokenizer = AutoTokenizer.from_pretrained({folder!r})"
    if adapter != "lora":
        return (f"from transformers import AutoModelFor{head}, AutoTokenizer\n\n"
                f"model = AutoModelFor{head}.from_pretrained({folder!r})\n{tokenizer}")
    text = (f"from peft import AutoPeftModelFor{head}\nfrom transformers import AutoTokenizer\n\n"
            f"model = AutoPeftModelFor{head}.from_pretrained({folder!r}{labels})\n{tokenizer}")
    if base_saved_in:
        text += (f"\n# the base (de-quantized from GGUF) is in {base_saved_in}/ beside the adapter; if this folder "
                 f"moved:\n# model = peft.PeftModel.from_pretrained(transformers.AutoModelFor{head}.from_pretrained("
                 f"<folder>/{base_saved_in}), <folder>)")
    return text


def write_job_card(output: str | os.PathLike, *, base_name: str | None, metrics: dict,
                   non_private: bool) -> Path:
    """The card of ``dpscale train``'s ``output/model``, from the ``privacy_report.json`` the run wrote
    beside it, ``dpscale_base.json`` in it and the run's metrics (eval before and after)."""
    output = Path(output)
    folder = output / "model"
    record = json.loads((folder / "dpscale_base.json").read_text())
    report = None if non_private else json.loads((output / "privacy_report.json").read_text())
    results = {}
    for key in ("loss", "accuracy", "bleu"):
        if key in metrics.get("after", {}):
            before = metrics.get("before", {}).get(key)
            results[f"eval {key}"] = (f"{before:.4g} before, " if before is not None else "") + \
                f"{metrics['after'][key]:.4g} after"
    task = record.get("task")
    load = load_snippet(folder.resolve(), task, record.get("adapter"), record.get("num_labels"),
                       record.get("base_saved_in"), record.get("labels"))
    if base_name in _PACKAGED_HUB_IDS:
        results = {"base": f"dpscale's packaged {base_name}, the weights of {_PACKAGED_HUB_IDS[base_name]}"
                   + (" (a GGUF file, de-quantized to float32)" if record.get("gguf_file") else ""), **results}
        base_name = _PACKAGED_HUB_IDS[base_name]
    return write_model_card(folder, report, base_model=base_name, task=task, adapter=record.get("adapter"),
                            metrics=results or None, how_to_load=load)


def key_message(path: str | os.PathLike, fingerprint: str | None = None) -> str:
    """What the end of a run says about its key: where it is, and why it matters."""
    where = f"{path}" + (f" (fingerprint {fingerprint})" if fingerprint else "")
    return f"Noise key: {where}, outside the model folder. {KEY_NOTE}"
