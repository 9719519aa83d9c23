"""``dpscale train --lp-steps K``: linear probing, then fine-tuning, as one accounted run.

Steps 0..K-1 train the classification head alone; steps K.. train the ``--trainable`` subset and
the head. Both phases are engines built from one DPConfig whose length is the whole run (so sigma
is calibrated for it and epsilon ends at the target), the second continuing the first's
accountant, step counter, key and loader (``dpscale.phases.continue_run``, where the reasons are).
Phase 2 starts with a fresh AdamW over its parameters, as LP-FT does.

A checkpoint resumes in the phase its parameters belong to: one that holds the head's parameters
only is of phase 1 (at step K the hand-over then happens at once), any other of phase 2.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from dpscale.errors import ConfigError
from dpscale.heads import head_parameter_names
from dpscale.integrations import accelerate as integration
from dpscale.phases import continue_run, set_trainable
from dpscale.train.config import TrainConfig
from dpscale.train.optimizers import build_optimizer

__all__ = ["Phases", "hand_over", "plan_phases"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Phases:
    lp_steps: int
    head: tuple[str, ...]  # phase 1's trainable parameters
    full: tuple[str, ...]  # phase 2's: the --trainable subset and the head
    phase: int  # the phase the run (re)starts in


def plan_phases(model: nn.Module, config: TrainConfig, state: dict | None, accelerator) -> Phases | None:
    """None without ``lp_steps``. Otherwise record both phases' parameter sets (the model's
    trainable set now is phase 2's) and leave the model in the phase the run starts in."""
    if not config.lp_steps:
        return None
    if integration.distributed_type(accelerator) in ("DEEPSPEED", "FSDP"):
        raise ConfigError("--lp-steps changes the trained parameters between phases, which DeepSpeed's and FSDP's "
                          "optimizers fix when they are built; run LP-FT on one process or with DDP (accelerate "
                          "launch --multi_gpu), or drop --lp-steps.")
    full = tuple(name for name, p in model.named_parameters() if p.requires_grad)
    head = tuple(head_parameter_names(model))
    if set(head) == set(full):
        raise ConfigError("--lp-steps: the --trainable subset is the head alone, so there is nothing to fine-tune "
                          "after probing; choose all, bias or lora.")
    phase = 1 if state is None or set(state["params"]) == set(head) else 2
    set_trainable(model, head if phase == 1 else full)
    logger.info("LP-FT: %d steps of the head (%d tensors), then the %s subset (%d tensors); starting in phase %d",
                config.lp_steps, len(head), config.trainable, len(full), phase)
    return Phases(config.lp_steps, head, full, phase)


def hand_over(phases: Phases, engine, model, accelerator, config: TrainConfig, dp, noise_key: str):
    """End phase 1 after its last step: detach its engine, train phase 2's parameters, and return
    (engine, optimizer) of phase 2, continuing the run (``continue_run``)."""
    engine.detach()
    unwrapped = accelerator.unwrap_model(model)
    set_trainable(unwrapped, phases.full)
    optimizer = build_optimizer(config, [p for p in unwrapped.parameters() if p.requires_grad])
    optimizer = accelerator.prepare(optimizer)
    following = integration.make_private(accelerator, model, optimizer, dp, noise_key=noise_key)
    continue_run(following, engine)
    accelerator.print(f"LP-FT: after {engine.steps_taken} steps of the head, fine-tuning {config.trainable} and the "
                      f"head ({len(following.parameters)} tensors), same accountant (epsilon so far "
                      f"{following.epsilon():.3f}).")
    return following, optimizer
