"""The job's checkpoint: ``output_dir/checkpoint``, what a rerun with the same output_dir and key
file resumes from. Both files are ``dpscale.checkpoint`` containers (atomic, SHA-256 sealed):

    state.pt    kind "train-state": trainable parameters, optimizer, RNG, history, the eval before
                training, the step, and the privacy state of that same step (private runs)
    privacy.pt  kind "privacy": the privacy state alone, as ``engine.save_checkpoint`` writes it,
                for ``dpscale audit`` and other readers

``state.pt`` alone is enough to resume; ``privacy.pt`` may lag one step behind a run killed
between the two writes. A ``state.pt`` written before it held the privacy state resumes only with
a ``privacy.pt`` of its own step.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from dpscale.checkpoint import load_state, save_atomic
from dpscale.errors import CheckpointError, ConfigError
from dpscale.integrations.accelerate import distributed_type
from dpscale.train.config import TrainConfig

__all__ = ["load_checkpoint", "restore_checkpoint", "restore_privacy", "save_checkpoint"]

logger = logging.getLogger(__name__)

_STATE_KEYS = {"params", "optimizer", "history", "before", "step", "rng"}


def save_checkpoint(folder: Path, accelerator, model, optimizer, engine, history, before, step=None,
                    job: dict | None = None) -> None:
    """Trainable parameters, optimizer and privacy state, written by the main process (all ranks
    hold the same after a step). ``state.pt`` holds all three in one atomic write, so a run killed
    at any point leaves a consistent checkpoint of one step; ``privacy.pt`` beside it is the privacy
    state alone (for ``dpscale audit`` and other readers), written after, so it may lag one step
    behind a killed run's ``state.pt``. ``job``: what the run records of itself (its resume flags
    and training rows, ``rerun.job_record``), checked by a rerun. Under DeepSpeed (partitioned
    parameters and optimizer state) only the privacy state is written, and a rerun refuses to
    resume from it."""
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
                 **({"privacy": engine.state_dict()} if engine is not None else {}),
                 **({"job": job} if job is not None else {})},
                folder / "state.pt", kind="train-state")
    if engine is not None:
        engine.save_checkpoint(folder / "privacy.pt")


def load_checkpoint(folder: Path, config: TrainConfig, accelerator) -> dict | None:
    """The state to resume from, or None to start over (no checkpoint, or --no-resume). A state
    whose parameters and privacy state are of different steps is refused: resuming it would take
    steps the accountant never saw, or draw batches twice."""
    if config.resume and _is_deepspeed(accelerator) and (folder / "privacy.pt").is_file():
        raise ConfigError(
            f"{folder} holds a checkpoint, but resuming under DeepSpeed is not supported yet (its parameters and "
            "optimizer state are partitioned); rerun with another --output-dir or --no-resume to start over."
        )
    if not config.resume or not (folder / "state.pt").is_file():
        return None
    state = load_state(folder / "state.pt", kind="train-state")
    missing = sorted(_STATE_KEYS - set(state))
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
    return state


def restore_checkpoint(model, optimizer, state, accelerator) -> None:
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


def restore_privacy(engine, state: dict, folder: Path) -> None:
    """The engine's privacy state of the resumed step: the one written atomically with the
    parameters in ``state.pt``, or for a ``state.pt`` written before it held one, ``privacy.pt``
    (``load_checkpoint`` has checked that it is of the same step)."""
    if "privacy" in state:
        engine.load_state_dict(state["privacy"])
    else:
        engine.load_checkpoint(folder / "privacy.pt")


def _is_deepspeed(accelerator) -> bool:
    return distributed_type(accelerator) == "DEEPSPEED"
