"""The run behind ``dpscale train`` and ``launch/train.py`` (the same code, so that ``accelerate
launch`` and ``deepspeed`` run it unchanged): load the model and data, evaluate, train privately
through the step driver (or the non-private baseline with the same everything else), evaluate
again, and leave in ``output_dir``:

    model/               save_pretrained folder with its tokenizer (LoRA: the PEFT adapter, and a GGUF
                         base beside it in model/base), README.md a model card with the privacy figures;
                         it loads with transformers / PEFT's auto classes alone
    noise.key            the run's secret key (unless --noise-key): beside model/, never in it
    privacy_report.json  what was spent and how (epsilon.png beside it)
    metrics.json         eval loss and accuracy (classification) or BLEU (causal LM), before and
                         after; the run's length, wall time and hardware; the privacy unit
                         (example or user; at user level the number of users)
    training.png         loss and epsilon against steps
    checkpoint/          the trainable parameters, optimizer and privacy state: a rerun with the
                         same output_dir and key file resumes here
    audit.json           with --audit: the canaries, their keyed coins, their losses before and
                         after training and the audit's result (also under "audit" in
                         privacy_report.json and metrics.json; dpscale/train/canaries.py)

This module is the orchestration and the private run (the engine through ``make_private``, its
loader, and ``dpscale.driver.run_steps``: the one DP loop every entry point shares). The
non-private loop is ``baseline.py``, the checkpoint folder ``checkpoint.py``, the metrics, plot,
progress and summary ``report.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dpscale.config import DPConfig
from dpscale.driver import RunOutcome, StepOutcome, run_steps
from dpscale.errors import ConfigError
from dpscale.integrations.accelerate import distributed_type
from dpscale.losses import causal_lm_losses, sequence_classification_losses
from dpscale.noise import NoiseKey
from dpscale.train.checkpoint import (
    load_checkpoint,
    restore_checkpoint,
    restore_privacy,
    save_checkpoint,
)
from dpscale.train.checks import check_data, describe_labels
from dpscale.train.config import TrainConfig
from dpscale.train.model_card import key_message, write_job_card
from dpscale.train.optimizers import build_optimizer
from dpscale.train.precision import check_mixed_precision, check_requested_precision
from dpscale.train.report import Trained, log_step, progress, write_report
from dpscale.train.rerun import apply_rerun, check_resumable, job_record, plan_rerun

__all__ = ["TrainResult", "run"]

logger = logging.getLogger(__name__)

_restore = restore_checkpoint  # the name tests/test_checkpoint_integrity.py imports from here


@dataclass
class TrainResult:
    metrics: dict
    output_dir: Path
    history: list[dict] = field(default_factory=list)


@dataclass
class _Task:
    """The task's datasets, losses and evaluation, bound to one tokenizer."""

    train: object
    eval: object | None
    labels: list | None
    classification: bool
    users: list | None = None  # privacy_unit user: the user of each training row, in row order
    job: dict | None = None  # what the checkpoint records of this run (rerun.job_record)
    prompt: bool = False  # classification through a causal LM's label words (train/prompting.py)
    generation: object | None = None  # causal LM: every held-out row, for the prompts BLEU is read on
    canaries: object | None = None  # --audit: the planted canaries (dpscale/train/canaries.py)

    def losses(self, model, batch, device) -> torch.Tensor:
        """Per-example losses of a collated batch, moved to ``device`` first (both loops' batches
        are collated on the CPU)."""
        if self.prompt:
            return self.train.losses(model, {k: v.to(device) for k, v in batch.items()})
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        labels = batch["labels"].to(device)
        logits = model(**inputs).logits
        if self.classification:
            return sequence_classification_losses(logits, labels)
        return causal_lm_losses(logits, labels)


def run(config: TrainConfig) -> TrainResult:
    from accelerate import Accelerator

    from dpscale.train.models import (
        load_model,
        resolve_model_name,
        save_model,
        select_trainable,
    )

    data = check_data(config)  # every data file checked before anything is created or loaded
    output = Path(config.output_dir)
    check_requested_precision(config.mixed_precision, cpu=config.cpu)  # before Accelerate's global state holds it
    accelerator = Accelerator(log_with=config.report_to or None, project_dir=str(output / "logs"),
                              mixed_precision=config.mixed_precision, **_placement_kwargs(config))
    precision = check_mixed_precision(accelerator.mixed_precision, accelerator.device)  # as launched
    if distributed_type(accelerator) == "FSDP":
        raise ConfigError(
            "dpscale train does not run under FSDP: its checkpoints, resume and evaluation read whole parameters "
            "on every rank. For FSDP2 use examples/accelerate_loop.py (or your own Accelerate loop with "
            "dpscale.integrations.accelerate.make_private) or DPTrainer, with launch/accelerate_fsdp2.yaml; "
            "for this job use DDP or DeepSpeed."
        )
    # resume checks (checkpoint, key, flags) read only; then the folder is written, then the model loads
    folder = output / "checkpoint"
    state = None if config.fresh_key else load_checkpoint(folder, config, accelerator)
    record = job_record(config, data)
    rerun = plan_rerun(config, record, folder, state)
    apply_rerun(rerun, config, accelerator)
    if rerun.key is not None:
        config = dataclasses.replace(config, noise_key=rerun.key)
    torch.manual_seed(config.seed)
    train_rows, eval_rows, labels = data.train.rows, data.eval.rows if data.eval else None, data.labels
    if labels is not None:
        logger.info("Labels: %s", describe_labels(data))
        accelerator.print(f"Labels: {describe_labels(data)}")
    name = resolve_model_name(config.model)
    model_task = "causal-lm" if config.label_words else config.task  # label words: the LM head classifies
    with_head = bool(labels) and not config.label_words
    head = {"num_labels": len(labels), "labels": [str(label) for label in labels]} if with_head else {}
    model, tokenizer = load_model(name, task=model_task, **head)
    if config.head_init == "zero":  # before select_trainable: PEFT's trainable head is a copy of this one
        from dpscale.heads import zero_head

        zero_head(model)
    task = _task(config, train_rows, eval_rows, tokenizer, labels)
    task.users, task.job = data.users, record
    if config.audit:  # canaries join the training rows before anything counts them
        from dpscale.train.canaries import plant_canaries

        task.canaries = plant_canaries(config, task, tokenizer, key=_shared_key(config, accelerator),
                                       build=lambda rows: _task(config, rows, None, tokenizer, labels).train)
    model = select_trainable(model, config.trainable, task=model_task, lora_r=config.lora_r,
                             lora_alpha=config.lora_alpha, lora_dropout=0.0)
    from dpscale.train.lpft import plan_phases

    phases = plan_phases(model, config, state, accelerator)  # --lp-steps: the head alone first
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(config, trainable, probing=phases is not None and phases.phase == 1)
    model, optimizer = accelerator.prepare(model, optimizer)
    if config.report_to:
        # trackers take scalars and strings only; the key file's path is not logged
        accelerator.init_trackers("dpscale-train", config={
            k: v if isinstance(v, (int, float, str, bool)) else str(v)
            for k, v in config.as_dict().items() if k != "noise_key"})
    if state:
        restore_checkpoint(model, optimizer, state, accelerator)
    with accelerator.autocast():  # bf16: generation too (PEFT's generate bypasses the prepared forward)
        before = state["before"] if state else _evaluate(config, task, accelerator.unwrap_model(model), tokenizer)
    if task.canaries is not None:
        task.canaries.start(accelerator.unwrap_model(model), accelerator.device, resumed=state is not None,
                            main_process=accelerator.is_main_process)
    start = time.perf_counter()
    if config.non_private:
        from dpscale.train.baseline import train_non_private

        trained = train_non_private(config, task, model, optimizer, accelerator, state, folder, before)
    else:
        trained = _train_private(config, task, model, optimizer, accelerator, state, folder, before, phases)
    seconds = time.perf_counter() - start
    unwrapped = accelerator.unwrap_model(model)
    with accelerator.autocast():
        after = _evaluate(config, task, unwrapped, tokenizer)
    audit = None if task.canaries is None else task.canaries.finish(
        unwrapped, accelerator.device, trained.privacy, main_process=accelerator.is_main_process)
    metrics = {
        "task": config.task, "model": config.model, "trainable": config.trainable,
        "non_private": config.non_private, "before": before, "after": after, "privacy": trained.privacy,
        "steps": trained.steps_total, "stopped": trained.stopped, "train_examples": len(task.train.dataset),
        "privacy_unit": None if config.non_private else config.privacy_unit,
        **({"labels": [str(label) for label in labels], "label_counts": data.label_counts} if labels else {}),
        **({"train_users": len(set(task.users))} if task.users is not None else {}),
        "wall_seconds_this_run": round(seconds, 1), "processes": accelerator.num_processes,
        "mixed_precision": precision,
        "hardware": f"{platform.machine()} {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}",
        "command_config": {k: v for k, v in config.as_dict().items() if k != "noise_key"},
        **({"audit": audit} if audit is not None else {}),
    }
    with _whole_parameters(accelerator, unwrapped):  # ZeRO-3: gathered on every rank, saved by one
        if accelerator.is_main_process:
            output.mkdir(parents=True, exist_ok=True)
            save_model(unwrapped, tokenizer, output / "model", base_model=name,
                       labels=None if task.prompt else labels, task=model_task)
            if task.prompt:
                from dpscale.train.prompting import write_prompt_record

                write_prompt_record(output / "model", task.train)
            write_job_card(output, base_name=config.model, metrics=metrics, non_private=config.non_private)
    write_report(accelerator, output, metrics, trained.history)
    if not config.non_private and accelerator.is_main_process:  # where the key is, and why it matters
        message = key_message(_key_path(config), trained.privacy.get("key_fingerprint"))
        logger.info(message)
        accelerator.print(message)
    if audit is not None:
        accelerator.print(audit["describe"])
    accelerator.end_training()
    return TrainResult(metrics, output, trained.history)


# data --------------------------------------------------------------------------------------------


def _task(config: TrainConfig, train_rows, eval_rows, tokenizer, labels) -> _Task:
    from dpscale.train.data import CausalLMData, ClassificationData

    if config.label_words:
        from dpscale.train.prompting import PromptClassificationData

        def prompted(rows, column):
            return PromptClassificationData(rows, tokenizer, label_words=config.label_words,
                                            template=config.prompt_template, text_column=column,
                                            label_column=config.label_column, max_length=config.max_length,
                                            labels=labels)

        column = config.eval_text_column or config.text_column
        evaluation = prompted(_first(eval_rows, config), column) if eval_rows else None
        return _Task(prompted(train_rows, config.text_column), evaluation, labels, True, prompt=True)
    if config.task == "classification":
        def build(rows, column):
            return ClassificationData(rows, tokenizer, text_column=column, label_column=config.label_column,
                                      max_length=config.max_length, labels=labels)

        train = build(train_rows, config.text_column)
        column = config.eval_text_column or config.text_column
        evaluation = build(_first(eval_rows, config), column) if eval_rows else None
        return _Task(train, evaluation, labels, True)

    def build_lm(rows):
        if config.text_column:
            return CausalLMData(rows, tokenizer, max_length=config.max_length, text_column=config.text_column)
        return CausalLMData(rows, tokenizer, max_length=config.max_length, prompt_column=config.prompt_column,
                            target_column=config.target_column)

    # the eval loss reads the first max_eval_examples held-out rows; BLEU the first `generations`
    # distinct prompts of all of them, each with every reference it has
    generation = build_lm(_generation_rows(eval_rows, config)) if eval_rows and config.generations else None
    return _Task(build_lm(train_rows), build_lm(_first(eval_rows, config)) if eval_rows else None, None, False,
                 generation=generation)


def _generation_rows(rows, config: TrainConfig):
    """The held-out rows of the first ``generations`` distinct prompts, each with all its references
    (BLEU reads only those, so no other row is tokenised or held to max_length)."""
    if not config.prompt_column or config.text_column:
        return rows
    chosen = set(list(dict.fromkeys(str(row[config.prompt_column]) for row in rows))[: config.generations])
    return [row for row in rows if str(row[config.prompt_column]) in chosen]


def _first(rows, config: TrainConfig):
    return rows[: config.max_eval_examples] if rows and config.max_eval_examples else rows


# evaluation ---------------------------------------------------------------------------------------


def _evaluate(config: TrainConfig, task: _Task, model, tokenizer) -> dict:
    from dpscale.train import evaluate

    if task.eval is None:
        return {}
    if task.prompt:
        from dpscale.train.prompting import evaluate_prompt_classification

        return evaluate_prompt_classification(model, task.eval, batch_size=config.eval_batch_size)
    if task.classification:
        return evaluate.evaluate_classification(model, task.eval, batch_size=config.eval_batch_size)
    result = evaluate.evaluate_causal_lm(model, task.eval, batch_size=config.eval_batch_size)
    source = task.generation or task.eval
    if config.generations and source.prompts:
        prompts = source.prompts[: config.generations]
        references = source.references[: config.generations]
        outputs = evaluate.generate(model, tokenizer, prompts, max_new_tokens=config.max_new_tokens)
        result["bleu"] = evaluate.bleu(outputs, references)
        result["bleu_prompts"] = len(prompts)
        result["samples"] = [{"prompt": p, "generated": g, "reference": r[0]}
                             for p, g, r in zip(prompts[:3], outputs[:3], references[:3])]
    return result


# the private run ------------------------------------------------------------------------------------


def _train_private(config: TrainConfig, task: _Task, model, optimizer, accelerator, state: dict | None, folder: Path,
                   before: dict, phases=None) -> Trained:
    from dpscale.integrations.accelerate import make_data_loader, make_private

    examples = len(task.train.dataset)
    # at user level N counts users and the batch size users per step (DPConfig(privacy_unit="user"))
    dataset_size = examples if task.users is None else len(set(task.users))
    length = {"epochs": config.epochs} if config.epochs else {"steps": config.max_steps}
    unit = {"privacy_unit": "user", "examples_per_user": config.examples_per_user} if task.users is not None else {}
    dp = DPConfig(max_grad_norm=config.max_grad_norm, expected_batch_size=config.batch_size,
                  dataset_size=dataset_size, target_epsilon=config.epsilon, target_delta=config.delta,
                  clip_fn=config.clip_fn, **length, **unit, **_adaptive_clipping(config))
    key = _shared_key(config, accelerator)
    engine = make_private(accelerator, model, optimizer, dp, noise_key=key)
    loader = make_data_loader(accelerator, engine, task.train.dataset, max_physical_batch_size=config.micro_batch,
                              collate_fn=task.train.collate, user_ids=task.users)
    history = list(state["history"]) if state else []
    if state:
        check_resumable(engine, state, folder)  # the engine's own checks, worded with the flags
        restore_privacy(engine, state, folder)
    total = min(engine.budget_steps, config.max_steps or engine.budget_steps)
    if task.users is None:
        data = f"{examples} training examples, expected batch {config.batch_size:g} examples"
    else:
        data = (f"{dataset_size} users ({config.user_column!r}) over {examples} training examples, expected batch "
                f"{config.batch_size:g} users of at most {dp.examples_per_user} example(s) each; epsilon per user")
    accelerator.print(f"{accelerator.num_processes} process(es) on {accelerator.device}, {data}, sigma "
                      f"{engine.noise_multiplier:.4g} for epsilon {config.epsilon:g} at delta {engine.delta:.3g}, "
                      f"{engine.planned_steps} steps planned (budget {engine.budget_steps})")
    if phases is not None and config.lp_steps >= engine.planned_steps:
        raise ConfigError(f"--lp-steps {config.lp_steps} leaves no fine-tuning step of the {engine.planned_steps} "
                          "planned: lower --lp-steps.")
    bar = progress(accelerator, total, engine.steps_taken)

    def losses_of(micro):
        return task.losses(engine.model, micro, accelerator.device)

    def clip_norm_used() -> float:
        adaptive = engine.adaptive_clipping
        return config.max_grad_norm if adaptive is None else adaptive.history[-1]

    if task.canaries is not None:  # an excluded canary's loss times 0: a zero gradient
        losses_of = task.canaries.weigh(losses_of)

    def on_step(outcome: StepOutcome) -> None:
        norms = engine.step_norms
        record = {
            "step": engine.steps_taken,
            "loss": outcome.loss_sum / max(outcome.examples, 1) if outcome.examples else None,
            "epsilon": engine.epsilon(), "sigma": engine.noise_multiplier, "sample_rate": engine.sample_rate,
            "clip_fraction": float((norms > clip_norm_used()).float().mean()) if norms.numel() else 0.0,
            "mean_norm": float(norms.mean()) if norms.numel() else 0.0, "step_seconds": outcome.seconds,
            "batch": outcome.global_size,  # users at user level
        }
        if engine.adaptive_clipping is not None:  # R over time: the norm this step clipped with, and the next
            record["clip_norm"] = clip_norm_used()
            record["next_clip_norm"] = engine.clip_thresholds[0]
            record["unclipped_fraction"] = engine.adaptive_clipping.last_fractions[0]  # the noisy, released one
        history.append(record)
        log_step(accelerator, bar, record)
        if engine.steps_taken % config.checkpoint_every == 0:
            save_checkpoint(folder, accelerator, model, optimizer, engine, history, before, job=task.job)

    def on_stop(result: RunOutcome) -> None:
        save_checkpoint(folder, accelerator, model, optimizer, engine, history, before, job=task.job)
        if result.stopped == "budget":
            accelerator.print(f"Privacy budget reached after {engine.steps_taken} steps (epsilon "
                              f"{engine.epsilon():.3f} <= {config.epsilon}): stopped, checkpoint saved in {folder}.")

    remaining = None if config.max_steps is None else max(0, config.max_steps - engine.steps_taken)
    if config.stop_after is not None:
        remaining = config.stop_after if remaining is None else min(remaining, config.stop_after)
    outcome = None
    if phases is not None and phases.phase == 1:  # LP-FT: the head alone up to step lp_steps, then hand over
        from dpscale.train.lpft import hand_over

        probe = config.lp_steps - engine.steps_taken
        first = run_steps(engine, loader, losses_of, max_steps=probe if remaining is None else min(probe, remaining),
                          on_step=on_step, progress=False)
        if first.steps < probe:  # this invocation ends inside phase 1 (max_steps, stop_after)
            on_stop(first)
            outcome = first
        else:  # on_step and on_stop read engine and optimizer from here: they follow the new ones
            engine, optimizer = hand_over(phases, engine, model, accelerator, config, dp, key)
            remaining = None if remaining is None else remaining - first.steps
    if outcome is None:
        outcome = run_steps(engine, loader, losses_of, max_steps=remaining, on_step=on_step, on_stop=on_stop,
                            progress=False)  # the job shows its own bar
    bar.close()
    report = engine.privacy_report(config.output_dir if accelerator.is_main_process else None)
    privacy = {k: report[k] for k in ("epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "planned_steps",
                                      "budget_steps", "target_epsilon", "accountant", "sampling", "sampling_source",
                                      "clip_fn", "max_grad_norm", "expected_batch_size", "dataset_size",
                                      "privacy_unit", "examples_per_user", "protects")}
    privacy.update({k: report[k] for k in ("gradient_noise_multiplier", "adaptive_clipping") if k in report})
    privacy["key_fingerprint"] = report["noise"]["key_fingerprint"]
    engine.detach()
    return Trained(history, engine.steps_taken, outcome.stopped, privacy)


# plumbing -----------------------------------------------------------------------------------------


def _adaptive_clipping(config: TrainConfig) -> dict:
    """--clip-quantile and its knobs, as DPConfig takes them (empty: fixed clipping)."""
    if config.clip_quantile is None:
        return {}
    return {"clip_quantile": config.clip_quantile, "clip_quantile_lr": config.clip_quantile_lr,
            "clip_count_std": config.clip_count_std}
def _key_path(config: TrainConfig) -> Path:
    return Path(config.noise_key) if config.noise_key else Path(config.output_dir) / "noise.key"


def _shared_key(config: TrainConfig, accelerator) -> str:
    """The key file every rank reads: --noise-key, or one created once in output_dir (mode 0600),
    beside the model folder, never in it (the folder is what gets shared)."""
    model_folder = (Path(config.output_dir) / "model").resolve()
    if model_folder in _key_path(config).resolve().parents:
        raise ConfigError(f"--noise-key {config.noise_key} lies inside the model folder {model_folder}, which is "
                          "what gets shared: keep the key out of it (whoever holds it can reproduce the noise).")
    if config.noise_key:
        return config.noise_key
    path = Path(config.output_dir) / "noise.key"
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            NoiseKey.write_new(path)
    accelerator.wait_for_everyone()
    return str(path)


def _placement_kwargs(config: TrainConfig) -> dict:
    """Data parallel: Accelerator(cpu=...). DeepSpeed, from --deepspeed (deepspeed launcher,
    torchrun) or from `accelerate launch`'s DeepSpeed config: its plugin, and on a machine without
    CUDA (or with --cpu) a gloo process group (Accelerate's cpu=True would skip DeepSpeed)."""
    import datetime

    from accelerate.utils import InitProcessGroupKwargs

    # a dead or hung rank fails the others' next collective after this long, not torch's 30 minutes
    timeout = datetime.timedelta(seconds=config.collective_timeout)
    from_accelerate = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if not config.deepspeed and not from_accelerate:
        return {"cpu": config.cpu, "kwargs_handlers": [InitProcessGroupKwargs(timeout=timeout)]}
    from accelerate import DeepSpeedPlugin

    kwargs: dict = {}
    if config.deepspeed:
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=config.deepspeed)
    gloo = {"backend": "gloo"} if config.cpu or not torch.cuda.is_available() else {}
    kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(timeout=timeout, **gloo)]
    return kwargs


def _whole_parameters(accelerator, module):
    """Under DeepSpeed ZeRO-3, every parameter gathered whole for the duration (a collective: all
    ranks enter); otherwise nothing to do."""
    if distributed_type(accelerator) == "DEEPSPEED" and accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(module.parameters()))
    return contextlib.nullcontext()
