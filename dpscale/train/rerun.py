"""A ``dpscale train`` run in an output folder that may hold a previous run: resume it, start anew
with a new key (``--fresh-key``), or refuse, naming the flags. Everything is checked before the
model loads and before anything is written: the noise key is read, never created, until the checks
pass (``plan_rerun`` reads, ``apply_rerun`` writes).

Why a new run needs a new key: the batches and the noise of every step derive from the key alone
(with the step, the parameter and the coordinate), so two runs on the same data with one key draw
the same batches and the same noise; the difference of their updates cancels the noise, which no
accounting covers. So ``--no-resume`` with the key the previous run's checkpoint was written with
is refused, and ``--fresh-key`` moves the previous run (checkpoint, key, outputs) into
``previous-<its key's fingerprint>/`` beside it, whole and resumable there, and creates a new key.
It never continues the previous run's accounting under the new key: that run starts at step 0.

The flags a resumed run must share (``RESUME_FLAGS``) are recorded in the checkpoint (``job``):
a refusal names each flag that changed, old and new value ("--epsilon 8 -> 3").
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from dpscale.checkpoint import load_state
from dpscale.errors import CheckpointError, ConfigError
from dpscale.noise import NoiseKey, load_noise_key
from dpscale.train.checks import JobData
from dpscale.train.config import TrainConfig

__all__ = ["RESUME_FLAGS", "Rerun", "apply_rerun", "check_resumable", "job_record", "plan_rerun"]

logger = logging.getLogger(__name__)

# the TrainConfig fields that define the mechanism, the model's trainable parameters or their meaning
RESUME_FLAGS = ("task", "model", "trainable", "lora_r", "lora_alpha", "label_column", "text_column", "prompt_column",
                "target_column", "max_train_examples", "epsilon", "delta", "epochs", "max_steps", "batch_size",
                "max_grad_norm", "clip_fn", "privacy_unit", "user_column", "examples_per_user", "non_private")
# what a previous run leaves in its output folder, moved whole by --fresh-key
PREVIOUS_RUN = ("checkpoint", "noise.key", "model", "privacy_report.json", "epsilon.png", "metrics.json",
                "training.png", "logs")


@dataclass(frozen=True)
class Rerun:
    """What the run does with its output folder, decided before anything is written.

    state: the checkpoint to resume (None: start at step 0). key: the key file the run reads (None
    for the non-private baseline, which draws no noise). new_key: ``key`` is created first.
    set_aside: the folder the previous run moves to (--fresh-key)."""

    state: dict | None
    key: str | None
    new_key: bool = False
    set_aside: Path | None = None
    previous_fingerprint: str | None = None


def job_record(config: TrainConfig, data: JobData) -> dict:
    """What the checkpoint records of the run that writes it: the resume flags, the labels, and
    the training rows (count and digest; their path only to name it in a message)."""
    rows = json.dumps(data.train.rows, sort_keys=True, default=str).encode("utf-8")
    return {
        "flags": {name: getattr(config, name) for name in RESUME_FLAGS},
        "labels": None if data.labels is None else [str(label) for label in data.labels],
        "data": config.data, "train_rows": len(data.train.rows), "rows_sha256": hashlib.sha256(rows).hexdigest(),
    }


def plan_rerun(config: TrainConfig, record: dict, folder: Path, state: dict | None) -> Rerun:
    """Check what the run would do with ``folder`` (the checkpoint) and its key, reading only;
    ``state`` is ``load_checkpoint``'s (None with --no-resume or no checkpoint)."""
    output = Path(config.output_dir)
    key_path = Path(config.noise_key) if config.noise_key else output / "noise.key"
    previous = _previous_fingerprint(folder, state)
    where = f"the checkpoint in {folder}" + (f" (step {state['step']})" if state else "")
    start_anew = _start_anew(output, previous)
    if config.fresh_key:
        if config.noise_key:
            raise ConfigError(
                "--fresh-key creates a new key in --output-dir; drop --noise-key. (To start over with a key file of "
                "your own, give a new file with --noise-key and --no-resume.)"
            )
        existing = [name for name in PREVIOUS_RUN if (output / name).exists()]
        aside = _aside(output, previous) if existing else None
        return Rerun(None, None if config.non_private else str(key_path), not config.non_private, aside, previous)
    if state is not None:
        _refuse_changed_flags(state, record, where, start_anew)
    if config.non_private:
        return Rerun(state, None)
    fingerprint = load_noise_key(key_path).fingerprint if key_path.exists() else None
    if state is not None and previous is not None:
        if fingerprint is None:
            raise ConfigError(
                f"{where[0].upper()}{where[1:]} was written with noise key {previous}, and there is no key file at "
                f"{key_path}. Resume with --noise-key PATH, the key file the run began with; or start anew: "
                f"{start_anew}. Nothing was created."
            )
        if fingerprint != previous:
            raise ConfigError(
                f"{where[0].upper()}{where[1:]} was written with noise key {previous}, but {key_path} holds key "
                f"{fingerprint}. Resume with --noise-key PATH, the key file the run began with; or start anew: "
                f"{start_anew}."
            )
    if state is None and previous is not None and fingerprint == previous:
        raise ConfigError(
            f"--no-resume starts over, but {key_path} holds the key {previous} that {where} was written with: a "
            "second run with one key draws the same batches and noise as the first on the same data, and the "
            "difference of their updates cancels the noise (no accounting covers it). Start anew with --fresh-key "
            f"(the previous run moves to {_aside(output, previous)}/ and a new key is created), a new key file "
            "(--noise-key), or a new --output-dir."
        )
    return Rerun(state, str(key_path), fingerprint is None)


def apply_rerun(rerun: Rerun, config: TrainConfig, accelerator) -> None:
    """Write what ``plan_rerun`` decided, on the main process (the others wait): the previous run moved
    aside, a new key created; then say what the run does."""
    output = Path(config.output_dir)
    if accelerator.is_main_process:
        if rerun.set_aside is not None:
            rerun.set_aside.mkdir(parents=True)
            for name in PREVIOUS_RUN:
                if (output / name).exists():
                    (output / name).rename(rerun.set_aside / name)
            accelerator.print(f"--fresh-key: the previous run (key {rerun.previous_fingerprint or 'unknown'}) was "
                              f"moved to {rerun.set_aside}; this run starts at step 0 with a new key.")
            logger.warning("A new run on data a previous run (kept in %s) trained on: if both models are released, "
                           "their epsilons add up.", rerun.set_aside)
        if rerun.new_key:
            Path(rerun.key).parent.mkdir(parents=True, exist_ok=True)
            NoiseKey.write_new(rerun.key)
    accelerator.wait_for_everyone()
    if rerun.state is not None:
        accelerator.print(f"Resuming from {output / 'checkpoint'} (step {rerun.state['step']}).")


def check_resumable(engine, state: dict, folder: Path) -> None:
    """Before the engine loads the privacy state, the checks ``dpscale.resume`` makes, worded with the
    flags: for a checkpoint written before it recorded its flags (``job``), or a change they do not
    show (the mechanism is the last word)."""
    from dpscale.resume import _recorded_noise_schemes, resume_check

    privacy = state["privacy"] if "privacy" in state else load_state(folder / "privacy.pt", kind="privacy")
    where = f"The checkpoint in {folder} (step {state['step']})"
    start_anew = _start_anew(Path(folder).parent, privacy.get("key_fingerprint"))
    saved = {**privacy.get("mechanism", {}), **privacy.get("resume_check", {})}
    ours = {**engine.plan.mechanism(), **resume_check(engine)}
    for field, value in ours.items():
        if field in saved and saved[field] != value:
            raise CheckpointError(
                f"{where} was written with {field} {saved[field]!r}, this run has {value!r}: "
                f"{_MECHANISM_FLAGS.get(field, 'the dpscale version')} changed since. Resume with the flags the run "
                f"began with; or start anew: {start_anew}."
            )
    recorded = _recorded_noise_schemes(privacy)[-1][0]
    if recorded != engine.plan.noise.scheme:
        raise CheckpointError(
            f"{where} was written under noise scheme {recorded!r} by another dpscale version; this one draws "
            f"{engine.plan.noise.scheme!r}. Resume with the dpscale version that wrote it; or start anew: {start_anew}."
        )


_MECHANISM_FLAGS = {
    "noise_multiplier": "sigma, calibrated from --epsilon, --delta, --batch-size, --max-steps or --epochs and the "
                        "training rows,",
    "sensitivity": "--max-grad-norm", "expected_batch_size": "--batch-size",
    "sample_rate": "--batch-size or the training rows (--data, --max-train-examples)",
    "privacy_unit": "--privacy-unit", "examples_per_user": "--examples-per-user",
    "parameters": "--model, --trainable or --lora-r", "clip_fn": "--clip-fn", "clip_gamma": "--clip-fn",
    "clip_groups": "--trainable", "clip_thresholds": "--max-grad-norm",
}


def _refuse_changed_flags(state: dict, record: dict, where: str, start_anew: str) -> None:
    saved = state.get("job")
    if not isinstance(saved, dict):
        return  # written before checkpoints recorded their flags: check_resumable words the engine's checks
    old, new = saved.get("flags", {}), record["flags"]
    changed = []
    for name in RESUME_FLAGS:
        if name == "max_steps" and (old.get("epochs") or new.get("epochs")):
            continue  # with --epochs the noise is calibrated for the epochs; --max-steps only caps the run
        if name in old and old[name] != new[name]:
            changed.append(f"--{name.replace('_', '-')} {_shown(old[name])} -> {_shown(new[name])}")
    if saved.get("labels") != record["labels"]:
        changed.append(f"labels {_shown(saved.get('labels'))} -> {_shown(record['labels'])}")
    if saved.get("rows_sha256") != record["rows_sha256"]:
        changed.append(f"the training rows (--data {saved.get('data') or 'default'}, {saved.get('train_rows')} rows "
                       f"-> --data {record['data'] or 'default'}, {record['train_rows']} rows, not the same rows)")
    if changed:
        raise CheckpointError(
            f"{where[0].upper()}{where[1:]} was written by a run with other settings: {'; '.join(changed)}. Resuming "
            "would change the mechanism its accounting composed or the parameters it trained. Rerun with the "
            f"run's settings to resume it; or start anew: {start_anew}."
        )


def _shown(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value)
    return str(value)


def _previous_fingerprint(folder: Path, state: dict | None) -> str | None:
    """The key fingerprint the checkpoint in ``folder`` was written with (None: none, or non-private)."""
    if state is not None and isinstance(state.get("privacy"), dict):
        return state["privacy"].get("key_fingerprint")
    if (folder / "privacy.pt").is_file():
        return load_state(folder / "privacy.pt", kind="privacy").get("key_fingerprint")
    if (folder / "state.pt").is_file():
        privacy = load_state(folder / "state.pt", kind="train-state").get("privacy")
        return privacy.get("key_fingerprint") if isinstance(privacy, dict) else None
    return None


def _aside(output: Path, fingerprint: str | None) -> Path:
    """output/previous-<fingerprint>, or with -2, -3, ... where that is taken."""
    base = output / f"previous-{fingerprint or 'run'}"
    path, number = base, 1
    while path.exists():
        number += 1
        path = base.with_name(f"{base.name}-{number}")
    return path


def _start_anew(output: Path, fingerprint: str | None) -> str:
    return (f"add --fresh-key (the previous run moves, whole and resumable, to {_aside(output, fingerprint)}/ and a "
            "new key is created) or give a new --output-dir")
