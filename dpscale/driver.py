"""One logical DP step, the same for every entry point: the engine loop helper, DPTrainer, the
Accelerate and Accelerate + DeepSpeed integrations, launch/train.py and ``dpscale train``.

A logical step is: the micro-batches of one logical (Poisson) batch, each through the user's
per-example losses and ``engine.backward``, inside the backend's accumulation block; the padding
passes a rank runs when the backend needs every rank to run as many (ZeRO-3); then the engine's
step (noise, accounting, update). The budget is checked before the batch is drawn. Nothing here
knows a training engine: the backend answers how many passes, what padding means and how a step is
closed.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dpscale.sampling import LogicalBatch

__all__ = ["RunOutcome", "StepOutcome", "budget_reached", "run_logical_step", "run_steps"]

logger = logging.getLogger(__name__)

LossesFn = Callable[[Any], Tensor]
"""losses_fn(micro_batch) -> [b] per-example losses of one forward pass (never a batch mean)."""


@dataclass(frozen=True)
class StepOutcome:
    """What one logical step did on this rank. ``loss_sum`` and ``examples`` describe the sampled
    examples themselves: non-private statistics, for the user's own monitoring only."""

    step: int
    examples: int
    global_size: int
    loss_sum: float
    seconds: float


@dataclass(frozen=True)
class RunOutcome:
    """stopped: "end" (the loader ran out), "max_steps", or "budget" (the next step would take
    epsilon past the target)."""

    steps: int
    stopped: str


def budget_reached(engine) -> bool:
    """Whether the next step would take epsilon past the target, and if so, the one log line that
    says the run stops there. Every loop that stops at the budget (``run_steps``, DPTrainer's loader
    and its stop-and-save callback) asks here, so the decision and its message are the same for
    every entry point; callers ask once per stop, so it is logged once."""
    if not engine.budget_exhausted:
        return False
    logger.warning(
        "Privacy budget reached after %d steps (epsilon %.4g, target %g): stopping.",
        engine.steps_taken, engine.epsilon(), engine.target_epsilon,
    )
    return True


def run_logical_step(engine, batch: LogicalBatch, losses_fn: LossesFn, *, close_step: bool = True) -> StepOutcome:
    """Run one logical batch through ``engine``.

    close_step: end with ``engine.step()`` (the default). False leaves the step to a caller whose
        own loop runs the attached optimizer right after (the Hugging Face Trainer).
    """
    start = time.perf_counter()
    backend = engine.backend
    micro_batches = batch.micro_batches
    local = len(micro_batches)
    passes = backend.micro_batch_count(local)
    loss_sum: Tensor | None = None  # on the losses' device: read once per step, not per micro-batch
    examples = 0
    with backend.accumulation():
        for j in range(passes):
            padding = j >= local
            micro = micro_batches.padding_batch() if padding else micro_batches[j]
            # user level: the user of each example, so that a user's examples are clipped as one
            by_user = getattr(micro_batches, "units", None) is not None
            users = (micro_batches.padding_units if padding else micro_batches.units_of(j)) if by_user else None
            with backend.padding() if padding else contextlib.nullcontext():
                losses = losses_fn(micro)
                if not by_user:
                    engine.backward(losses)
                else:
                    engine.backward(losses, users=users)
            if not padding:
                total = losses.detach().to(torch.float64).sum()
                loss_sum = total if loss_sum is None else loss_sum + total
                examples += losses.shape[0]
    if close_step:
        engine.step()
    loss = 0.0 if loss_sum is None else float(loss_sum)
    return StepOutcome(batch.step, examples, batch.global_size, loss, time.perf_counter() - start)


def run_steps(engine, loader: Iterable[LogicalBatch], losses_fn: LossesFn, *, max_steps: int | None = None,
              on_step: Callable[[StepOutcome], None] | None = None,
              on_stop: Callable[[RunOutcome], None] | None = None) -> RunOutcome:
    """Logical steps over ``loader`` (the engine's own, ``engine.make_data_loader``) until one pass
    of it ends (without ``max_steps``), ``max_steps`` steps were taken in this call (passes follow
    one another), or the privacy budget is spent: the budget is checked before each batch is
    drawn, so the run stops cleanly at it, never with an error.

    on_step(outcome): after every step (logging, progress, periodic checkpoints).
    on_stop(outcome): once at the end, whatever the reason (save a checkpoint there).
    """
    taken = 0
    stopped = "end"
    batches = iter(loader)
    while True:
        if max_steps is not None and taken >= max_steps:
            stopped = "max_steps"
            break
        if budget_reached(engine):
            stopped = "budget"
            break
        batch = next(batches, None)
        if batch is None and max_steps is not None:  # steps to go: the loader's next pass
            batches = iter(loader)
            batch = next(batches, None)
        if batch is None:
            break
        outcome = run_logical_step(engine, batch, losses_fn)
        taken += 1
        if on_step is not None:
            on_step(outcome)
    result = RunOutcome(taken, stopped)
    if on_stop is not None:
        on_stop(result)
    return result
