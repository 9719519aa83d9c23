"""What ``dpscale train`` ships travels with its guarantee: the saved folder loads in a fresh
process with transformers and PEFT alone (``AutoPeftModelForCausalLM`` /
``AutoPeftModelForSequenceClassification``) and gives the outputs of the model the job trained,
a GGUF base included (saved beside the adapter as safetensors); its README.md is a model card
whose metadata and prose carry the privacy report's figures; the noise key is never in the model
folder, and the end of the run says where it is and why it matters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dpscale.cli import main as cli
from dpscale.noise import NoiseKey
from dpscale.train import models as dp_models
from tests.tiny_models import save_tiny_causal_lm, save_tiny_classifier, write_e2e_csv, write_tiny_gguf

torch.set_num_threads(1)

IDS = [[5, 9, 13, 7, 2, 11], [3, 4, 8, 21, 17, 6]]

LOAD = """
import json, sys, torch
import peft
assert "dpscale" not in sys.modules
folder, kind, ids, out = sys.argv[1:]
cls = peft.AutoPeftModelForCausalLM if kind == "causal" else peft.AutoPeftModelForSequenceClassification
model = cls.from_pretrained(folder).eval()
ids = torch.tensor(json.loads(ids))
with torch.no_grad():
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
torch.save(logits, out)
assert not [name for name in sys.modules if name.split(".")[0] == "dpscale"]
"""


CARD_LOAD = """
import json, re, sys, torch
folder, ids, out = sys.argv[1:]
code = re.search(r"```python\\n(.*?)```", open(folder + "/README.md").read(), re.S).group(1)
scope = {}
exec(code, scope)  # the model card's own lines
model = scope["model"].eval()
ids = torch.tensor(json.loads(ids))
with torch.no_grad():
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
torch.save({"logits": logits, "id2label": model.config.id2label}, out)
assert not [name for name in sys.modules if name.split(".")[0] == "dpscale"]
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("saved_model")
    sst = root / "sst.tsv"
    sst.write_text("sentence\tlabel\n" + "\n".join(["a good film\t1", "a dull , bad movie\t0"] * 24) + "\n")
    key = root / "noise.key"
    NoiseKey.write_new(key)
    return {"gpt2": save_tiny_causal_lm(root / "gpt2"), "bert": save_tiny_classifier(root / "bert"),
            "e2e": write_e2e_csv(root / "e2e.csv"), "sst": sst, "key": key, "root": root}


def train_and_capture(monkeypatch, out: Path, *flags: str) -> torch.Tensor:
    """Run the job; return the logits of IDS from the model it trained, taken as it is saved."""
    captured = {}
    save = dp_models.save_model

    def capturing(model, tokenizer, folder, *args, **kwargs):
        model.eval()
        ids = torch.tensor(IDS)
        with torch.no_grad():
            captured["logits"] = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        return save(model, tokenizer, folder, *args, **kwargs)

    monkeypatch.setattr(dp_models, "save_model", capturing)
    assert cli(["train", "--output-dir", str(out), "--max-steps", "2", "--max-eval-examples", "4",
                "--generations", "0", "--trainable", "lora", "--lora-r", "2", *flags]) == 0
    return captured["logits"]


def load_in_fresh_process(folder: Path, kind: str, where: Path) -> torch.Tensor:
    """Only transformers and PEFT, in another working directory, without dpscale on the path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = where / f"logits-{kind}.pt"
    done = subprocess.run([sys.executable, "-c", LOAD, str(folder), kind, json.dumps(IDS), str(out)], cwd=where,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


@pytest.mark.slow  # a job and a fresh process each, about 20 s on one core
@pytest.mark.parametrize("kind", ["causal", "gguf", "classification"])
def test_the_saved_model_loads_with_auto_peft_alone_and_gives_the_trained_outputs(inputs, tmp_path, monkeypatch,
                                                                                  kind):
    if kind == "gguf":
        pytest.importorskip("gguf")
        base = str(write_tiny_gguf(tmp_path / "tiny.gguf"))
    else:
        base = str(inputs["gpt2" if kind == "causal" else "bert"])
    data = (["--task", "classification", "--data", str(inputs["sst"]), "--eval-data", str(inputs["sst"]),
             "--text-column", "sentence", "--batch-size", "8"] if kind == "classification" else
            ["--data", str(inputs["e2e"]), "--eval-data", str(inputs["e2e"]), "--batch-size", "8"])
    out = tmp_path / "run"
    expected = train_and_capture(monkeypatch, out, "--model", base, "--noise-key", str(inputs["key"]),
                                 "--micro-batch", "8", *data)
    folder = out / "model"
    adapter = json.loads((folder / "adapter_config.json").read_text())
    if kind == "gguf":  # the de-quantized base beside the adapter, named by it
        assert adapter["base_model_name_or_path"] == str((folder / "base").resolve())
        assert (folder / "base" / "model.safetensors").is_file() and (folder / "base" / "config.json").is_file()
    else:
        assert adapter["base_model_name_or_path"] == str(Path(base).resolve())
        assert not (folder / "base").exists()
    got = load_in_fresh_process(folder, "causal" if kind != "classification" else "classification", tmp_path)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    if kind == "classification":  # the card's lines give the trained outputs and the label names
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
        done = subprocess.run([sys.executable, "-c", CARD_LOAD, str(folder), json.dumps(IDS), str(tmp_path / "c.pt")],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        card = torch.load(tmp_path / "c.pt")
        assert card["id2label"] == {0: "0", 1: "1"}
        torch.testing.assert_close(card["logits"], expected, rtol=1e-5, atol=1e-6)


def test_the_model_card_carries_the_privacy_report_and_the_key_stays_out(inputs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    train_and_capture(monkeypatch, out, "--model", str(inputs["gpt2"]), "--data", str(inputs["e2e"]),
                      "--eval-data", str(inputs["e2e"]), "--batch-size", "8", "--micro-batch", "8",
                      "--epsilon", "4", "--clip-fn", "abadi", "--max-grad-norm", "0.5",
                      "--noise-key", str(inputs["key"]))
    report = json.loads((out / "privacy_report.json").read_text())
    card = (out / "model" / "README.md").read_text()
    assert card.startswith("---\n")
    header, prose = card.split("---\n")[1], card.split("---\n", 2)[2]
    meta = yaml.safe_load(header)
    figures = meta["differential_privacy"]
    for name in ("epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "accountant", "clipping",
                 "clip_fn", "max_grad_norm", "privacy_unit", "dataset_size", "expected_batch_size"):
        assert figures[name] == report[name], name
    assert meta["library_name"] == "peft" and "differential-privacy" in meta["tags"]
    assert meta["base_model"] == str(inputs["gpt2"]) and meta["pipeline_tag"] == "text-generation"
    assert f"({report['epsilon']:.4g}, {report['delta']:.3g})-differentially private** per example" in prose
    for said in (f"sigma = {report['noise_multiplier']:.4g}", f"q = {report['sample_rate']:.4g}",
                 f"R = {report['max_grad_norm']:g}", f"{report['steps']} step(s)", "pld", "flat (abadi)",
                 "AutoPeftModelForCausalLM.from_pretrained", "noise key is not in this folder"):
        assert said in prose, said
    # the key: never inside model/, and the end of the run says where it is and why it matters
    secret = inputs["key"].read_bytes().strip()
    for path in (out / "model").rglob("*"):
        assert path.is_dir() or secret not in path.read_bytes(), path
    said = capsys.readouterr().out
    assert f"Noise key: {inputs['key']} (fingerprint {report['noise']['key_fingerprint']})" in said
    assert "Keep it to resume" in said and "Keep it secret" in said


def test_the_default_key_lies_beside_the_model_and_one_inside_it_is_refused(inputs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    common = ["--model", str(inputs["gpt2"]), "--data", str(inputs["e2e"]), "--batch-size", "8", "--micro-batch", "8"]
    train_and_capture(monkeypatch, out, *common)
    assert (out / "noise.key").is_file() and not list((out / "model").rglob("*.key"))
    assert f"Noise key: {out / 'noise.key'}" in capsys.readouterr().out
    inside = tmp_path / "other" / "model" / "noise.key"
    inside.parent.mkdir(parents=True)
    NoiseKey.write_new(inside)
    assert cli(["train", "--output-dir", str(tmp_path / "other"), "--noise-key", str(inside), "--max-steps", "1",
                *common]) == 2
    assert "inside the model folder" in capsys.readouterr().err


# the card alone, from a report -------------------------------------------------------------------


def report_of(**changes) -> dict:
    base = {"epsilon": 2.5, "delta": 1e-5, "noise_multiplier": 0.9, "sample_rate": 0.01, "steps": 40,
            "planned_steps": 50, "target_epsilon": 3.0, "accountant": "pld", "sampling": "poisson",
            "clipping": "flat", "clip_fn": "abadi", "max_grad_norm": 1.0, "expected_batch_size": 32.0,
            "dataset_size": 3200, "privacy_unit": "example", "examples_per_user": None,
            "protects": "each example (one sequence)"}
    return {**base, **changes}


def test_a_job_card_names_the_hub_base_of_a_packaged_model_and_a_baseline_claims_nothing(tmp_path):
    from dpscale.train.model_card import write_job_card

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "dpscale_base.json").write_text(json.dumps({"task": "causal-lm", "adapter": "lora", "gguf_file": "x.gguf",
                                                          "base_saved_in": "base", "num_labels": None}))
    (tmp_path / "privacy_report.json").write_text(json.dumps(report_of()))
    metrics = {"before": {"loss": 2.5}, "after": {"loss": 1.75}}
    card = write_job_card(tmp_path, base_name="smollm2-135m", metrics=metrics, non_private=False).read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "packaged smollm2-135m" in card and "de-quantized" in card and "eval loss: 2.5 before, 1.75 after" in card
    assert "(2.5, 1e-05)-differentially private** per example" in card and "40 step(s) taken" in card
    assert "base/ beside the adapter" in card
    card = write_job_card(tmp_path, base_name="gpt2", metrics=metrics, non_private=True).read_text()
    assert yaml.safe_load(card.split("---\n")[1])["differential_privacy"] is None
    assert "without differential privacy" in card and "differentially private**" not in card


def test_a_user_level_card_says_per_user(tmp_path):
    from dpscale.train.model_card import model_card

    card = model_card(report_of(privacy_unit="user", dataset_size=400, examples_per_user=4,
                                protects="each user (all their examples)"), task="classification")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["differential_privacy"]["neighbouring_datasets"] == "add or remove one user"
    assert "private** per user: it protects each user (all their examples) of the 400 users" in card
    assert meta["pipeline_tag"] == "text-classification" and meta["library_name"] == "transformers"
