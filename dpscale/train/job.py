"""The run behind ``dpscale train`` and ``launch/train.py`` (the same code, so that ``accelerate
launch`` and ``deepspeed`` run it unchanged): load the model and data, evaluate, train privately
through the step driver (or the non-private baseline with the same everything else), evaluate
again, and leave in ``output_dir``:

    model/               save_pretrained folder with its tokenizer (LoRA: the PEFT adapter)
    privacy_report.json  what was spent and how (epsilon.png beside it)
    metrics.json         eval loss and accuracy (classification) or BLEU (causal LM), before and
                         after; the run's length, wall time and hardware; the privacy unit
                         (example or user; at user level the number of users)
    training.png         loss and epsilon against steps
    checkpoint/          the trainable parameters, optimizer and privacy state: a rerun with the
                         same output_dir and key file resumes here
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dpscale.accounting import steps_for_epochs
from dpscale.checkpoint import load_state, save_atomic
from dpscale.config import DPConfig
from dpscale.driver import RunOutcome, StepOutcome, run_steps
from dpscale.errors import CheckpointError, ConfigError
from dpscale.integrations.accelerate import distributed_type
from dpscale.losses import causal_lm_losses, sequence_classification_losses
from dpscale.noise import NoiseKey
from dpscale.train.config import TrainConfig

__all__ = ["TrainResult", "run"]

logger = logging.getLogger(__name__)


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

    def losses(self, model, batch) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits
        if self.classification:
            return sequence_classification_losses(logits, batch["labels"])
        return causal_lm_losses(logits, batch["labels"])


def run(config: TrainConfig) -> TrainResult:
    from accelerate import Accelerator

    from dpscale.train.models import load_model, resolve_model_name, save_model, select_trainable

    output = Path(config.output_dir)
    accelerator = Accelerator(log_with=config.report_to or None, project_dir=str(output / "logs"),
                              **_placement_kwargs(config))
    if distributed_type(accelerator) == "FSDP":
        raise ConfigError(
            "dpscale train does not run under FSDP: its checkpoints, resume and evaluation read whole parameters "
            "on every rank. For FSDP2 use examples/accelerate_loop.py (or your own Accelerate loop with "
            "dpscale.integrations.accelerate.make_private) or DPTrainer, with launch/accelerate_fsdp2.yaml; "
            "for this job use DDP or DeepSpeed."
        )
    torch.manual_seed(config.seed)
    train_rows, eval_rows, labels = _rows(config)
    users = _user_ids(config, train_rows)  # checked before the model loads
    name = resolve_model_name(config.model)
    model, tokenizer = load_model(name, task=config.task, num_labels=len(labels) if labels else None,
                                  labels=[str(label) for label in labels] if labels else None)
    task = _task(config, train_rows, eval_rows, tokenizer, labels)
    task.users = users
    model = select_trainable(model, config.trainable, task=config.task, lora_r=config.lora_r,
                             lora_alpha=config.lora_alpha, lora_dropout=0.0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    if config.report_to:
        # trackers take scalars and strings only; the key file's path is not logged
        accelerator.init_trackers("dpscale-train", config={
            k: v if isinstance(v, (int, float, str, bool)) else str(v)
            for k, v in config.as_dict().items() if k != "noise_key"})
    checkpoint = output / "checkpoint"
    state = _load_checkpoint(checkpoint, config, accelerator)
    if state:
        _restore(model, optimizer, state, accelerator)
    before = state["before"] if state else _evaluate(config, task, accelerator.unwrap_model(model), tokenizer)
    start = time.perf_counter()
    if config.non_private:
        history, outcome, privacy = _train_non_private(config, task, model, optimizer, accelerator, state, checkpoint,
                                                       before)
    else:
        history, outcome, privacy = _train_private(config, task, model, optimizer, accelerator, state, checkpoint,
                                                   before)
    seconds = time.perf_counter() - start
    unwrapped = accelerator.unwrap_model(model)
    after = _evaluate(config, task, unwrapped, tokenizer)
    metrics = {
        "task": config.task, "model": config.model, "trainable": config.trainable,
        "non_private": config.non_private, "before": before, "after": after, "privacy": privacy,
        "steps": outcome.steps_total, "stopped": outcome.stopped, "train_examples": len(task.train.dataset),
        "privacy_unit": None if config.non_private else config.privacy_unit,
        **({"train_users": len(set(task.users))} if task.users is not None else {}),
        "wall_seconds_this_run": round(seconds, 1), "processes": accelerator.num_processes,
        "hardware": f"{platform.machine()} {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}",
        "command_config": {k: v for k, v in config.as_dict().items() if k != "noise_key"},
    }
    with _whole_parameters(accelerator, unwrapped):  # ZeRO-3: gathered on every rank, saved by one
        if accelerator.is_main_process:
            output.mkdir(parents=True, exist_ok=True)
            save_model(unwrapped, tokenizer, output / "model", base_model=name, labels=labels)
    if accelerator.is_main_process:
        (output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        _plot_training(history, output / "training.png")
        _print_summary(accelerator, metrics)
    accelerator.end_training()
    return TrainResult(metrics, output, history)


@dataclass(frozen=True)
class _Outcome:
    steps_total: int
    stopped: str


# data --------------------------------------------------------------------------------------------


def _rows(config: TrainConfig):
    from dpscale.train.data import default_e2e, read_table

    if config.data is None:
        train_rows, eval_rows = default_e2e()
    else:
        train_rows = read_table(config.data)
        eval_rows = read_table(config.eval_data) if config.eval_data else None
    if config.max_train_examples:
        train_rows = train_rows[: config.max_train_examples]
    if eval_rows is not None and config.max_eval_examples:
        eval_rows = eval_rows[: config.max_eval_examples]
    labels = None
    if config.task == "classification":
        if not train_rows or config.label_column not in train_rows[0]:
            raise ConfigError(f"The training data has no column {config.label_column!r} (--label-column).")
        labels = sorted({row[config.label_column] for row in train_rows}, key=str)
    return train_rows, eval_rows, labels


def _user_ids(config: TrainConfig, rows) -> list | None:
    """At user level the user of every training row, and a batch size no larger than the users."""
    from dpscale.train.data import user_ids

    if config.privacy_unit != "user":
        return None
    users = user_ids(rows, config.user_column)
    count = len(set(users))
    if config.batch_size > count:
        raise ConfigError(
            f"--batch-size {config.batch_size:g} is the expected number of users per step at user level, but the "
            f"training data has {count} users (distinct values of {config.user_column!r}); lower --batch-size to at "
            f"most {count}."
        )
    return users


def _task(config: TrainConfig, train_rows, eval_rows, tokenizer, labels) -> _Task:
    from dpscale.train.data import CausalLMData, ClassificationData

    if config.task == "classification":
        def build(rows, column):
            return ClassificationData(rows, tokenizer, text_column=column, label_column=config.label_column,
                                      max_length=config.max_length, labels=labels)

        train = build(train_rows, config.text_column)
        evaluation = build(eval_rows, config.eval_text_column or config.text_column) if eval_rows else None
        return _Task(train, evaluation, labels, True)

    def build_lm(rows):
        if config.text_column:
            return CausalLMData(rows, tokenizer, max_length=config.max_length, text_column=config.text_column)
        return CausalLMData(rows, tokenizer, max_length=config.max_length, prompt_column=config.prompt_column,
                            target_column=config.target_column)

    return _Task(build_lm(train_rows), build_lm(eval_rows) if eval_rows else None, None, False)


# evaluation ---------------------------------------------------------------------------------------


def _evaluate(config: TrainConfig, task: _Task, model, tokenizer) -> dict:
    from dpscale.train import evaluate

    if task.eval is None:
        return {}
    if task.classification:
        return evaluate.evaluate_classification(model, task.eval, batch_size=config.eval_batch_size)
    result = evaluate.evaluate_causal_lm(model, task.eval, batch_size=config.eval_batch_size)
    if config.generations and task.eval.prompts:
        prompts = task.eval.prompts[: config.generations]
        references = task.eval.references[: config.generations]
        outputs = evaluate.generate(model, tokenizer, prompts, max_new_tokens=config.max_new_tokens)
        result["bleu"] = evaluate.bleu(outputs, references)
        result["bleu_prompts"] = len(prompts)
        result["samples"] = [{"prompt": p, "generated": g, "reference": r[0]}
                             for p, g, r in zip(prompts[:3], outputs[:3], references[:3])]
    return result


# the private run ------------------------------------------------------------------------------------


def _train_private(config, task, model, optimizer, accelerator, state, checkpoint, before):
    from dpscale.integrations.accelerate import make_data_loader, make_private

    examples = len(task.train.dataset)
    # at user level N counts users and the batch size users per step (DPConfig(privacy_unit="user"))
    dataset_size = examples if task.users is None else len(set(task.users))
    length = dict(epochs=config.epochs) if config.epochs else dict(steps=config.max_steps)
    unit = {"privacy_unit": "user", "examples_per_user": config.examples_per_user} if task.users is not None else {}
    dp = DPConfig(max_grad_norm=config.max_grad_norm, expected_batch_size=config.batch_size,
                  dataset_size=dataset_size, target_epsilon=config.epsilon, target_delta=config.delta,
                  clip_fn=config.clip_fn, **length, **unit)
    engine = make_private(accelerator, model, optimizer, dp, noise_key=_shared_key(config, accelerator))
    loader = make_data_loader(accelerator, engine, task.train.dataset, max_physical_batch_size=config.micro_batch,
                              collate_fn=task.train.collate, user_ids=task.users)
    history = list(state["history"]) if state else []
    if state and "privacy" in state:  # the privacy state written atomically with the parameters
        engine.load_state_dict(state["privacy"])
    elif state:  # a state.pt written before it held the privacy state
        engine.load_checkpoint(checkpoint / "privacy.pt")
    total = min(engine.budget_steps, config.max_steps or engine.budget_steps)
    if task.users is None:
        data = f"{examples} training examples, expected batch {config.batch_size:g} examples"
    else:
        data = (f"{dataset_size} users ({config.user_column!r}) over {examples} training examples, expected batch "
                f"{config.batch_size:g} users of at most {dp.examples_per_user} example(s) each; epsilon per user")
    accelerator.print(f"{accelerator.num_processes} process(es) on {accelerator.device}, {data}, sigma "
                      f"{engine.noise_multiplier:.4g} for epsilon {config.epsilon:g} at delta {engine.delta:.3g}, "
                      f"{engine.planned_steps} steps planned (budget {engine.budget_steps})")
    progress = _progress(accelerator, total, engine.steps_taken)

    def losses_of(micro):
        return task.losses(engine.model, _to_device(micro, accelerator.device))

    def on_step(outcome: StepOutcome) -> None:
        norms = engine.step_norms
        record = {
            "step": engine.steps_taken, "loss": outcome.loss_sum / max(outcome.examples, 1) if outcome.examples else None,
            "epsilon": engine.epsilon(), "sigma": engine.noise_multiplier, "sample_rate": engine.sample_rate,
            "clip_fraction": float((norms > config.max_grad_norm).float().mean()) if norms.numel() else 0.0,
            "mean_norm": float(norms.mean()) if norms.numel() else 0.0, "step_seconds": outcome.seconds,
            "batch": outcome.global_size,  # users at user level
        }
        history.append(record)
        _log(accelerator, progress, record)
        if engine.steps_taken % config.checkpoint_every == 0:
            _save_checkpoint(checkpoint, accelerator, model, optimizer, engine, history, before)

    def on_stop(result: RunOutcome) -> None:
        _save_checkpoint(checkpoint, accelerator, model, optimizer, engine, history, before)
        if result.stopped == "budget":
            accelerator.print(f"Privacy budget reached after {engine.steps_taken} steps (epsilon "
                              f"{engine.epsilon():.3f} <= {config.epsilon}): stopped, checkpoint saved in {checkpoint}.")

    remaining = None if config.max_steps is None else max(0, config.max_steps - engine.steps_taken)
    if config.stop_after is not None:
        remaining = config.stop_after if remaining is None else min(remaining, config.stop_after)
    outcome = run_steps(engine, loader, losses_of, max_steps=remaining, on_step=on_step, on_stop=on_stop)
    progress.close()
    report = engine.privacy_report(config.output_dir if accelerator.is_main_process else None)
    privacy = {k: report[k] for k in ("epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "planned_steps",
                                      "budget_steps", "target_epsilon", "accountant", "sampling", "sampling_source",
                                      "clip_fn", "max_grad_norm", "expected_batch_size", "dataset_size",
                                      "privacy_unit", "examples_per_user", "protects")}
    engine.detach()
    return history, _Outcome(engine.steps_taken, outcome.stopped), privacy


# the non-private baseline --------------------------------------------------------------------------


def _train_non_private(config, task, model, optimizer, accelerator, state, checkpoint, before):
    """The same model, data, batch size, steps, learning rate and optimizer, with no clipping and no
    noise: shuffled batches of ``batch_size``, the mean loss over each batch. At user level (a
    user-level config run as its baseline) nothing is protected; each batch holds the rows a private
    step brings in expectation (batch_size users times the mean rows a drawn user brings) and the
    length is the private run's (epochs of N users), so both runs see as much data."""
    dataset = task.train.dataset
    size = len(dataset)
    if task.users is None:
        batch = max(1, min(size, round(config.batch_size)))
        rate = batch / size
    else:
        counts = Counter(task.users).values()
        k = config.examples_per_user or 1
        brought = sum(min(k, n) for n in counts) / len(counts)
        batch = max(1, min(size, round(config.batch_size * brought)))
        rate = config.batch_size / len(counts)
    steps = min(config.max_steps or 2**62, steps_for_epochs(config.epochs, rate) if config.epochs else 2**62)
    generator = torch.Generator().manual_seed(config.seed)
    order: list[int] = []
    history = list(state["history"]) if state else []
    step = state["step"] if state else 0
    for _ in range(step):  # the same batches as an uninterrupted run
        order = _next_batch(order, size, batch, generator)[1]
    progress = _progress(accelerator, steps, step)
    model.train()
    stop = steps if config.stop_after is None else min(steps, step + config.stop_after)
    while step < stop:
        started = time.perf_counter()
        indices, order = _next_batch(order, size, batch, generator)
        indices = indices[accelerator.process_index :: accelerator.num_processes]
        total = 0.0
        for start in range(0, len(indices), config.micro_batch):
            micro = task.train.collate([dataset[i] for i in indices[start : start + config.micro_batch]])
            losses = task.losses(model, _to_device(micro, accelerator.device))
            accelerator.backward(losses.sum() / batch * accelerator.num_processes)
            total += float(losses.detach().sum())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        record = {"step": step, "loss": total / max(len(indices), 1), "step_seconds": time.perf_counter() - started,
                  "batch": batch}
        history.append(record)
        _log(accelerator, progress, record)
        if step % config.checkpoint_every == 0 or step == stop:
            _save_checkpoint(checkpoint, accelerator, model, optimizer, None, history, before, step=step)
    progress.close()
    return history, _Outcome(step, "end"), {"epsilon": None, "non_private": True}


def _next_batch(order: list[int], size: int, batch: int, generator: torch.Generator):
    if len(order) < batch:
        order = order + torch.randperm(size, generator=generator).tolist()
    return order[:batch], order[batch:]


# checkpoints ---------------------------------------------------------------------------------------


def _save_checkpoint(folder: Path, accelerator, model, optimizer, engine, history, before, step=None) -> None:
    """Trainable parameters, optimizer and privacy state, written by the main process (all ranks
    hold the same after a step). ``state.pt`` holds all three in one atomic write, so a run killed
    at any point leaves a consistent checkpoint of one step; ``privacy.pt`` beside it is the privacy
    state alone (for ``dpscale audit`` and other readers), written after, so it may lag one step
    behind a killed run's ``state.pt``. Under DeepSpeed (partitioned parameters and optimizer
    state) only the privacy state is written, and a rerun refuses to resume from it."""
    if not accelerator.is_main_process:
        return
    if _is_deepspeed(accelerator):
        if engine is not None:
            engine.save_checkpoint(folder / "privacy.pt")
        return
    unwrapped = accelerator.unwrap_model(model)
    params = {n: p.detach().cpu() for n, p in unwrapped.named_parameters() if p.requires_grad}
    save_atomic({"params": params, "optimizer": optimizer.state_dict(), "history": history, "before": before,
                 "step": step if step is not None else engine.steps_taken,
                 "rng": torch.get_rng_state(),  # dropout masks continue as in an uninterrupted run
                 **({"privacy": engine.state_dict()} if engine is not None else {})},
                folder / "state.pt", kind="train-state")
    if engine is not None:
        engine.save_checkpoint(folder / "privacy.pt")


def _load_checkpoint(folder: Path, config: TrainConfig, accelerator) -> dict | None:
    if config.resume and _is_deepspeed(accelerator) and (folder / "privacy.pt").is_file():
        raise ConfigError(
            f"{folder} holds a checkpoint, but resuming under DeepSpeed is not supported yet (its parameters and "
            "optimizer state are partitioned); rerun with another --output-dir or --no-resume to start over."
        )
    if not config.resume or not (folder / "state.pt").is_file():
        return None
    state = load_state(folder / "state.pt", kind="train-state")
    missing = sorted({"params", "optimizer", "history", "before", "step", "rng"} - set(state))
    if missing:
        raise CheckpointError(f"{folder / 'state.pt'} lacks {missing}: it is not a dpscale train state; remove "
                              f"{folder} to start over.")
    if not config.non_private and "privacy" not in state and not (folder / "privacy.pt").is_file():
        raise ConfigError(f"{folder} has no privacy.pt: the run died mid-checkpoint; remove {folder} to start over.")
    if not config.non_private and "privacy" in state:
        if not isinstance(state["privacy"], dict) or state["privacy"].get("steps_taken") != state["step"]:
            raise CheckpointError(f"{folder / 'state.pt'} holds parameters and a privacy state of different steps; "
                                  f"it is damaged: remove {folder} to start over.")
        lagging = (folder / "privacy.pt").is_file() and \
            load_state(folder / "privacy.pt", kind="privacy").get("steps_taken") != state["step"]
        if lagging or not (folder / "privacy.pt").is_file():  # killed between the two writes: state.pt is whole
            logger.warning("%s is missing or behind %s (step %s): the run was stopped between the two writes. "
                           "Resuming from state.pt, which holds both; privacy.pt is rewritten at the next checkpoint.",
                           folder / "privacy.pt", folder / "state.pt", state["step"])
    elif not config.non_private:
        # a state.pt written before it held the privacy state: both files or neither; parameters at step k with
        # a privacy state at another step would resume with steps the accountant never saw (or batches drawn twice)
        privacy = load_state(folder / "privacy.pt", kind="privacy")
        if privacy.get("steps_taken") != state["step"]:
            raise CheckpointError(
                f"{folder} holds parameters of step {state['step']} but a privacy state of step "
                f"{privacy.get('steps_taken')}: the run died between the two writes. Remove {folder} to start over."
            )
    accelerator.print(f"Resuming from {folder} (step {state['step']}).")
    return state


def _restore(model, optimizer, state, accelerator) -> None:
    """Parameters, optimizer and RNG from ``state``, after checking that it was written for these
    trainable parameters (names and shapes): a state of another model or --trainable is refused
    before anything is copied, never half-loaded."""
    unwrapped = accelerator.unwrap_model(model)
    trainable = {n: p for n, p in unwrapped.named_parameters() if p.requires_grad}
    saved = state["params"]
    if set(saved) != set(trainable):
        extra, absent = sorted(set(saved) - set(trainable)), sorted(set(trainable) - set(saved))
        raise CheckpointError(
            f"The checkpoint was written for other trainable parameters (only in the checkpoint: {extra[:3]}, only "
            f"here: {absent[:3]}); resume with the --model and --trainable the run began with, or use another "
            "--output-dir."
        )
    for name, value in saved.items():
        if tuple(value.shape) != tuple(trainable[name].shape):
            raise CheckpointError(
                f"The checkpoint's {name} has shape {tuple(value.shape)}, this model's {tuple(trainable[name].shape)}; "
                "resume with the --model the run began with, or use another --output-dir."
            )
    try:
        optimizer.load_state_dict(state["optimizer"])  # checks its groups before it changes anything
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"The checkpoint's optimizer state does not fit this optimizer ({error}); resume "
                              "with the settings the run began with, or use another --output-dir.") from error
    with torch.no_grad():
        for name, value in saved.items():
            trainable[name].copy_(value)
    torch.set_rng_state(state["rng"])


# plumbing -----------------------------------------------------------------------------------------


def _shared_key(config: TrainConfig, accelerator) -> str:
    """The key file every rank reads: --noise-key, or one created once in output_dir (mode 0600)."""
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


def _is_deepspeed(accelerator) -> bool:
    return distributed_type(accelerator) == "DEEPSPEED"


def _whole_parameters(accelerator, module):
    """Under DeepSpeed ZeRO-3, every parameter gathered whole for the duration (a collective: all
    ranks enter); otherwise nothing to do."""
    if _is_deepspeed(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(module.parameters()))
    return contextlib.nullcontext()


def _to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def _progress(accelerator, total, initial):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not accelerator.is_main_process, unit="step", desc="dpscale train")


def _log(accelerator, progress, record: dict) -> None:
    shown = {"loss": record.get("loss"), "eps": record.get("epsilon"), "s/step": record.get("step_seconds")}
    progress.set_postfix({k: f"{v:.3g}" for k, v in shown.items() if v is not None})
    progress.update(1)
    values = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
    if accelerator.trackers:
        accelerator.log(values, step=record["step"])


def _plot_training(history: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=110)
    axes = figure.add_subplot()
    steps = [r["step"] for r in history if r.get("loss") is not None]
    axes.plot(steps, [r["loss"] for r in history if r.get("loss") is not None], color="#1f4e79", label="train loss")
    axes.set_xlabel("step")
    axes.set_ylabel("train loss (sampled examples)")
    lines = axes.get_lines()
    if any(r.get("epsilon") is not None for r in history):
        right = axes.twinx()
        right.plot([r["step"] for r in history], [r["epsilon"] for r in history], color="#b03a2e", label="epsilon")
        right.set_ylabel("epsilon spent")
        lines = lines + right.get_lines()
    axes.legend(lines, [line.get_label() for line in lines], loc="center right")
    axes.set_title("dpscale train: loss of the sampled examples, and epsilon, per step")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)


def _print_summary(accelerator, metrics: dict) -> None:
    privacy = metrics["privacy"]
    if privacy.get("epsilon") is not None:
        unit = "per user" if privacy.get("privacy_unit") == "user" else "per example"
        accelerator.print(f"epsilon {privacy['epsilon']:.3f} {unit} at delta {privacy['delta']:.2e} "
                          f"(sigma {privacy['noise_multiplier']:.3f}, q {privacy['sample_rate']:.4g}, "
                          f"{privacy['steps']} steps)")
    else:
        accelerator.print("non-private run: no privacy guarantee")
    for key in ("loss", "accuracy", "bleu"):
        if key in metrics["after"]:
            accelerator.print(f"eval {key}: {metrics['before'].get(key, float('nan')):.4f} -> {metrics['after'][key]:.4f}")
    for sample in metrics["after"].get("samples", []):
        accelerator.print(f"  {sample['prompt']!r}\n    generated: {sample['generated']!r}\n    reference: {sample['reference']!r}")
