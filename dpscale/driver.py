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
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from dpscale.errors import SamplingError
from dpscale.sampling import DPDataLoader, LogicalBatch

__all__ = ["RunOutcome", "StepOutcome", "budget_reached", "run_logical_step", "run_steps"]

logger = logging.getLogger(__name__)

LossesFn = Callable[[Any], Tensor]
"""losses_fn(micro_batch) -> [b] per-example losses of one forward pass (never a batch mean)."""


@dataclass(frozen=True)
class StepOutcome:
    """What one logical step did on this rank. ``loss_sum`` and ``examples`` describe the sampled
    examples themselves: non-private statistics, for the user's own monitoring only.

    ``epsilon``: spent after this step (None where the step is not closed here or nothing is
    accounted). It is computed when first read, not when the step ends: composing T steps costs
    the accountant far more than a tiny model's step, and most steps' epsilon is never looked at.
    ``run_steps`` binds it to the step count, so it is this step's epsilon whenever it is read."""

    step: int
    examples: int
    global_size: int
    loss_sum: float
    seconds: float
    epsilon_of: Callable[[], float] | None = field(default=None, repr=False, compare=False)

    @functools.cached_property
    def epsilon(self) -> float | None:
        return None if self.epsilon_of is None else self.epsilon_of()

    @property
    def loss(self) -> float | None:
        """Mean loss of this rank's sampled examples (None for an empty batch)."""
        return self.loss_sum / self.examples if self.examples else None


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
              on_stop: Callable[[RunOutcome], None] | None = None, progress: bool = True) -> RunOutcome:
    """Logical steps over ``loader`` (the engine's own, ``engine.make_data_loader`` or
    ``make_data_loader(accelerator, engine, ...)``) until one pass of it ends (without
    ``max_steps``), ``max_steps`` steps were taken in this call (passes follow one another), or the
    privacy budget is spent: the budget is checked before each batch is drawn, so the run stops
    cleanly at it, never with an error. Any other loader (a plain ``DataLoader``) is refused before
    the first step (``SamplingError``): the accountant's Poisson assumption holds only for the
    engine's draws.

    on_step(outcome): after every step (logging, progress, periodic checkpoints); ``outcome`` has
        the step index, epsilon spent so far and the mean loss of the sampled examples.
    on_stop(outcome): once at the end, whatever the reason (save a checkpoint there).
    progress: a progress bar (tqdm, on stderr, first rank only) with epsilon and the sampled loss.
    """
    _check_loader(engine, loader)
    bar = _StepBar(engine, loader, max_steps) if progress else None
    taken = 0
    stopped = "end"
    batches = iter(loader)
    try:
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
            _check_batch(batch)
            outcome = run_logical_step(engine, batch, losses_fn)
            if engine.plan.accounts:
                outcome = dataclasses.replace(outcome, epsilon_of=_epsilon_after(engine, engine.steps_taken))
            taken += 1
            if bar is not None:
                bar.show(outcome)
            if on_step is not None:
                on_step(outcome)
    finally:
        if bar is not None:
            bar.close()
    result = RunOutcome(taken, stopped)
    if on_stop is not None:
        on_stop(result)
    return result


_LOADER_FIX = (
    "run_steps steps on logical batches drawn by the engine's own loader: loader = engine.make_data_loader(dataset, "
    "max_physical_batch_size=..., collate_fn=...) (with Accelerate: dpscale.make_data_loader(accelerator, engine, "
    "dataset, ...)), then dpscale.run_steps(engine, loader, losses_fn)"
)


def _check_loader(engine, loader) -> None:
    """The engine's own loader; where the user declared their own sampling (or nothing is
    accounted) another source of logical batches is theirs to vouch for (``_check_batch``)."""
    if loader is engine.data_loader or not engine._boundary.checks_sampling:
        return
    given = "an unbound DPDataLoader" if isinstance(loader, DPDataLoader) else f"a {type(loader).__name__}"
    raise SamplingError(f"run_steps was given {given}, not the engine's loader, so its batches would not be the "
                        f"Poisson draws the accountant assumes. {_LOADER_FIX}.")


def _check_batch(batch) -> None:
    if not isinstance(batch, LogicalBatch) and not hasattr(batch, "micro_batches"):
        raise SamplingError(f"run_steps got a {type(batch).__name__} where a logical batch (with its "
                            f"micro_batches) belongs. {_LOADER_FIX}.")


def _epsilon_after(engine, steps: int) -> Callable[[], float]:
    """Epsilon after the run's first ``steps`` steps, computed when called (see StepOutcome)."""

    def epsilon() -> float:
        if steps == engine.steps_taken or engine.noise_multiplier == 0:
            return engine.epsilon()
        return engine.accountant.epsilon_at(steps, engine.delta)

    return epsilon


class _StepBar:
    """The progress bar with epsilon and the sampled loss. Epsilon is refreshed only when the time
    since the last refresh is at least 20 times what that computation took (and at least every
    ``EVERY_S``): composing thousands of steps in the PLD accountant takes longer than a small
    model's step, and computing it at every step made a tiny run 50 times slower."""

    EVERY_S = 2.0

    def __init__(self, engine, loader, max_steps: int | None) -> None:
        from tqdm.auto import tqdm

        total = max_steps
        if total is None:
            with contextlib.suppress(TypeError):
                total = len(loader)
        if engine.budget_steps is not None and total is not None:
            total = min(total, max(0, engine.budget_steps - engine.steps_taken))
        self.bar = tqdm(total=total, unit="step", desc="dpscale", disable=engine.backend.rank != 0, leave=True)
        self.epsilon: float | None = None
        self.epsilon_step: int | None = None  # the step whose epsilon is shown
        self.loss: float | None = None
        self.last: StepOutcome | None = None
        self.next_epsilon_at = 0.0  # perf_counter time after which epsilon is refreshed

    def show(self, outcome: StepOutcome) -> None:
        self.last = outcome
        if outcome.loss is not None:
            self.loss = outcome.loss
        if time.perf_counter() >= self.next_epsilon_at:
            self._take_epsilon(outcome)
        self._postfix(refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.last is not None:
            self._take_epsilon(self.last)  # the bar ends on the run's epsilon
            self._postfix(refresh=True)
        self.bar.close()

    def _take_epsilon(self, outcome: StepOutcome) -> None:
        if self.bar.disable or outcome.epsilon_of is None or self.epsilon_step == outcome.step:
            return
        start = time.perf_counter()
        self.epsilon, self.epsilon_step = outcome.epsilon, outcome.step
        self.next_epsilon_at = start + max(self.EVERY_S, 20 * (time.perf_counter() - start))

    def _postfix(self, refresh: bool) -> None:
        shown = {"eps": self.epsilon, "loss": self.loss}
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items() if v is not None}, refresh=refresh)
