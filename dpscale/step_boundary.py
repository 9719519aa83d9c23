"""The step boundary: the one place a logical step is closed, checked and accounted.

A step closes in exactly two ways: the attached optimizer's step (its pre-hook runs ``close`` and
has the backend write the noised gradients; its post-hook releases them), or, for a backend whose
training engine runs the optimizer (DeepSpeed), that engine's step, through
``BackendContext.close_step``. ``close`` refuses a step the engine cannot vouch for (the model's
trainable parameters changed, the budget is spent, a foreign gradient was seen, the batch was not
drawn by the bound loader), then records it with the accountant and returns the step's noise
function: no public call accounts a step that updates nothing.

The state of the step in progress (the drawn batch, the users seen, the norms) lives here too, so
that the backward pipeline holds none and a resume knows what to reset.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from dpscale.adaptive_clipping import AdaptiveClipping
from dpscale.backends.base import GradientBackend, NoiseFn
from dpscale.errors import (
    ConfigError,
    ForeignGradientError,
    PrivacyBudgetExhausted,
    SamplingError,
    StepBoundaryError,
)
from dpscale.gradient_guard import ForeignGradientFlag
from dpscale.noise import DEFAULT_NOISE_AHEAD, NoiseAhead, NoiseAheadOptions, NoiseKey
from dpscale.plan import ExecutionPlan
from dpscale.sampling import LogicalBatch

__all__ = ["StepBoundary"]

logger = logging.getLogger(__name__)


class StepBoundary:
    """The steps taken and the step in progress. ``current_parameters`` gives the model's trainable
    parameters as they are now (checked against the ones the engine was built with). ``adaptive``: the
    adaptive clipping state, whose thresholds each closed step moves (None: fixed clipping)."""

    def __init__(self, plan: ExecutionPlan, parameters: Mapping[str, nn.Parameter], backend: GradientBackend,
                 noise_key: NoiseKey, accountant, current_parameters: Callable[[], Mapping[str, nn.Parameter]],
                 adaptive: AdaptiveClipping | None = None,
                 noise_ahead: NoiseAheadOptions | None = DEFAULT_NOISE_AHEAD) -> None:
        self.plan = plan
        self.parameters = parameters
        self.backend = backend
        self.accountant = accountant
        self.noise_ahead = NoiseAhead(noise_key, noise_ahead)  # the next step's noise, drawn while it runs
        self._noise_key = noise_key  # adaptive clipping's count noise
        self._current_parameters = current_parameters
        self.steps_taken = 0
        self.optimizer: torch.optim.Optimizer | None = None
        self.frozen_in_optimizer: tuple[nn.Parameter, ...] = ()  # the model's frozen parameters it holds
        self.step_norms: Tensor | None = None  # per-unit norms of the last finished step (all its backwards)
        self.nonfinite_examples = 0  # units zeroed by the non-finite rule, this process
        self.foreign = ForeignGradientFlag()  # a gradient from outside engine.backward reached a parameter
        self.adaptive = adaptive
        # std of the noise in each coordinate of the gradient of the step last closed (what the optimizer
        # applying it sees: after the 1/B, the micro-batches and the reduction over ranks); None before
        self.step_noise_std: float | None = None
        # a backward failed after handing some clipped sums over: they stay in the backend's buffers,
        # which no reset or resume clears, so this engine takes no further step
        self._partial = False
        self.reset_step()

    def reset_step(self) -> None:
        self.drawn_step: int | None = None  # the logical batch the bound loader handed out for this step
        self.users_this_step: set = set()  # user level: users whose examples a backward of this step saw
        self._norms: list[Tensor] = []
        self._nonfinite = 0
        if self.adaptive is not None:
            self.adaptive.reset_step()

    # what a backward and a draw report ------------------------------------------------------------

    def record_backward(self, norms: Tensor, users: frozenset, nonfinite: int, unclipped: Tensor | None = None) -> None:
        if unclipped is not None:
            self.adaptive.record(unclipped)
        self.users_this_step |= users
        self._norms.append(norms)
        self._nonfinite += nonfinite

    def partial_backward(self) -> None:
        """A backward raised after the backend had taken part of its clipped sums (the groups
        finished before the failure): the step now holds some of its examples' clipped gradients.
        Running those examples again would count them twice (twice the sensitivity), and there is
        no taking the part back (the backend's buffers keep it), so this engine takes no further
        step (``check_not_partial``)."""
        self._partial = True

    def check_not_partial(self) -> None:
        if self._partial:
            raise StepBoundaryError(
                "An engine.backward of this step raised after handing part of its clipped sums to the backend "
                "(clipping groups are handed over during the backward as soon as their norms are known), so "
                "this step holds part of those examples' gradients: running them again would count them twice, "
                "and the step cannot be completed as drawn. This engine takes no further step: fix what raised "
                "(e.g. out of memory: a smaller max_physical_batch_size) and restart from the last checkpoint with "
                "a new engine (a new process)."
            )

    def check_before_backward(self) -> None:
        """Everything ``engine.backward`` checks before it runs."""
        self.check_bound()
        self.check_model_unchanged()
        self.check_no_foreign_gradient()
        self.check_not_partial()
        self.check_budget()
        self.check_drawn()

    def on_draw(self, batch: LogicalBatch) -> None:
        """Called by the bound loader before it hands out a logical batch (its position has not
        moved yet, so a refused draw leaves the loader where the checkpoint expects it)."""
        if self.drawn_step is not None:
            raise SamplingError(
                f"A new logical batch was drawn while batch {self.drawn_step} was never stepped. Step every "
                "logical batch exactly once, empty ones included (skipping a batch because of its size leaks "
                "it): engine.step() or optimizer.step() after its micro-batches."
            )
        self.check_budget()
        if batch.step != self.steps_taken:
            raise SamplingError(
                f"The loader is at logical batch {batch.step} but the engine has taken {self.steps_taken} steps: "
                "restore both from the same checkpoint (engine.load_checkpoint restores the loader's position)."
            )
        self.drawn_step = batch.step
        self.draw_noise_ahead()

    def draw_noise_ahead(self) -> None:
        """Start drawing the noise of the step in progress (index ``steps_taken``) in the background,
        unless that step would be refused for the budget. Called when a step ends, when its batch
        is drawn and at each backward; the draw starts once. Which step's noise is served at a
        step is decided there (``NoiseAhead.noise_fn``), never here."""
        if not self.budget_exhausted:
            self.noise_ahead.prepare(self.steps_taken, self._std_of_step())

    def _std_of_step(self) -> float:
        """The noise std of the step in progress: the plan's, or under adaptive clipping the plan's
        at the thresholds this step clips with (they move only when a step closes)."""
        if self.adaptive is None:
            return self.plan.noise.std
        return self.plan.noise.std_at(self.adaptive.sensitivity)

    # checks ---------------------------------------------------------------------------------------

    @property
    def checks_sampling(self) -> bool:
        return self.plan.accounts and not self.plan.sampling.declared_by_user

    @property
    def budget_exhausted(self) -> bool:
        acc = self.plan.accounting
        return acc.budget_steps is not None and not acc.allow_budget_overrun and self.steps_taken >= acc.budget_steps

    def check_budget(self) -> None:
        if self.budget_exhausted:
            acc = self.plan.accounting
            raise PrivacyBudgetExhausted(
                f"The privacy budget is spent: {self.steps_taken} steps taken, and step {self.steps_taken + 1} "
                f"would take epsilon past target_epsilon={acc.target_epsilon} at delta={acc.delta:.3g} "
                f"(sigma={self.plan.noise.noise_multiplier:.5g} was calibrated for {acc.planned_steps} steps). Stop "
                "and save here, or give DPConfig(allow_budget_overrun=True) to go on and report the larger epsilon."
            )

    def check_bound(self) -> None:
        if self.optimizer is None and not self.backend.owns_step:
            raise StepBoundaryError(
                "No optimizer is attached to the privacy engine, so nothing would add the noise: an optimizer "
                "stepping these parameters would train without privacy. Attach it before training: "
                "optimizer = engine.attach_optimizer(torch.optim.AdamW(engine.parameters.values(), lr=...)) "
                "(or PrivacyEngine(..., optimizer=optimizer)), and close each logical step with engine.step() "
                "or optimizer.step()."
            )

    def check_no_foreign_gradient(self) -> None:
        if self.foreign.seen:
            raise ForeignGradientError(
                "A gradient from a backward other than engine.backward reached a trainable parameter earlier (it "
                "was refused then). The training engine may have taken it into its own gradient buffers, so this "
                "engine takes no further step: restart from the last checkpoint, and back-propagate per-example "
                "losses only through engine.backward."
            )

    def check_model_unchanged(self, now: Mapping[str, nn.Parameter] | None = None) -> None:
        """The trainable parameters (names, objects, ties) and the attached optimizer's parameters are
        the ones the engine was built with: a parameter added, frozen, unfrozen, replaced or re-tied
        afterwards would be trained without noise, noised but not trained, or keyed wrongly."""
        now = self._current_parameters() if now is None else now
        ours = self.parameters
        changed = now.keys() != ours.keys()
        if not self.backend.swaps_parameters:  # else the objects change by design: names only
            changed = changed or any(now[name] is not p for name, p in ours.items())
        if changed:
            added = sorted(now.keys() - ours.keys())
            gone = sorted(ours.keys() - now.keys())
            replaced = sorted(name for name in now.keys() & ours.keys() if now[name] is not ours[name])
            what = [f"{label}: {names[:5]}" for label, names in (("added or unfrozen", added), (
                "frozen, removed or tied to another", gone), ("replaced by another tensor", replaced)) if names]
            raise ConfigError(
                f"The model's trainable parameters changed after the PrivacyEngine was built ({'; '.join(what)}). The "
                "engine clips, noises and accounts the parameters it was built with. Change the model first, then "
                "build the engine and its optimizer (or build a new engine)."
            )
        if self.optimizer is not None:
            ids = {id(p) for p in ours.values()} | {id(p) for p in self.frozen_in_optimizer}
            if any(id(p) not in ids for group in self.optimizer.param_groups for p in group["params"]):
                raise ConfigError(
                    "The attached optimizer was given parameters that this engine does not clip after it was "
                    "attached (add_param_group?): they would be updated without noise. Build the optimizer over "
                    "engine.parameters.values() and do not add parameters to it."
                )

    def check_no_stray_gradient(self, current: Mapping[str, nn.Parameter]) -> None:
        """Checks second: where the engine owns the gradient, every trainable ``p.grad`` is None
        until this step writes it; one that is not came from somewhere else (a path the guards did
        not see, e.g. a training engine's own gradient hooks left in a broken state by an earlier
        refusal). Refused before anything moves."""
        if self.backend.owns_step:
            return  # the training engine holds its gradients in p.grad by design (DeepSpeed)
        stray = sorted(name for name, p in current.items() if p.grad is not None)
        frozen = [p for p in self.frozen_in_optimizer if p.grad is not None]
        if frozen:  # only by hand: autograd gives a frozen parameter no gradient
            stray.append(f"{len(frozen)} frozen parameter(s) the optimizer holds")
            for p in frozen:
                p.grad = None
        if stray:
            for name in stray:
                if name in current:
                    current[name].grad = None
            self.foreign.seen = True
            raise ForeignGradientError(
                f"Parameters {stray[:5]} hold gradients that engine.backward did not write (the engine "
                "keeps its clipped sums to itself until the optimizer's step): a backward other than "
                "engine.backward reached them. No step was taken. Back-propagate per-example losses only through "
                "engine.backward, and restart from the last checkpoint."
            )

    def check_drawn(self) -> None:
        if self.checks_sampling and self.drawn_step is None:
            raise SamplingError(
                "engine.backward ran on a batch that no dpscale loader bound to this engine drew, so the "
                "accountant's Poisson assumption would be unchecked. Draw the logical batches with "
                "loader = engine.make_data_loader(dataset, max_physical_batch_size=...) and iterate "
                "`for logical_batch in loader: for micro in logical_batch.micro_batches: ...`, or, if your "
                "own sampler really draws as DPConfig.sampling says, declare it with "
                "DPConfig(sampling_declared_by_user=True) (the privacy report then says so)."
            )

    # closing a step -------------------------------------------------------------------------------

    def attach(self, optimizer: torch.optim.Optimizer, frozen: Iterable[nn.Parameter] = ()) -> list:
        """Bind the step to ``optimizer``: its step pre-hook closes the step and writes the noised
        gradients, its post-hook releases them. Returns the removable handles.

        The optimizer may hold the model's frozen parameters (``frozen``: requires_grad False, as
        ``AdamW(model.parameters())`` does once LoRA or BiTFiT froze the rest): autograd never gives
        them a gradient, so the optimizer skips them, and a gradient found on one at a step is refused
        (``check_no_stray_gradient``). A parameter that is neither the engine's nor the model's is
        refused, and so is a trainable one the optimizer leaves out (clipped and noised, never
        trained: the model would not be the one the user asked for)."""
        if self.backend.owns_step:
            raise ConfigError(
                f"{type(self.backend).__name__} steps its training engine's own optimizer (its step adds the "
                "noise): do not attach another one; close each logical step with engine.step()."
            )
        if self.optimizer is not None:
            raise ConfigError("An optimizer is already attached to this engine: one optimizer per engine.")
        ours = {id(p) for p in self.parameters.values()}
        frozen = {id(p): p for p in frozen if id(p) not in ours}
        held = [p for group in optimizer.param_groups for p in group["params"]]
        foreign = [p for p in held if id(p) not in ours and id(p) not in frozen]
        if foreign:
            raise ConfigError(
                f"The optimizer updates {len(foreign)} parameter(s) that this engine does not clip (not part of "
                "the model, or unfrozen after the engine was built); their gradients would not be private. "
                "Build the optimizer over model.parameters() (frozen parameters are ignored) or "
                "engine.parameters.values()."
            )
        held_ids = {id(p) for p in held}
        missing = [name for name, p in self.parameters.items() if id(p) not in held_ids]
        if missing:
            raise ConfigError(
                f"The optimizer leaves out {len(missing)} trainable parameter(s) ({missing[:5]}): the engine "
                "would clip and noise them every step and never train them. Build the optimizer over "
                "model.parameters() or engine.parameters.values() after choosing what trains (dpscale.lora, "
                "dpscale.bitfit, requires_grad_(False)), or freeze these before building the engine."
            )
        self.optimizer = optimizer
        self.frozen_in_optimizer = tuple(p for p in held if id(p) in frozen)
        return [optimizer.register_step_pre_hook(lambda *_: self.backend.write_gradients(self.close())),
                optimizer.register_step_post_hook(lambda *_: self._after_step())]

    def _after_step(self) -> None:
        self.backend.release_gradients()
        self.draw_noise_ahead()

    def close(self) -> NoiseFn:
        """Check the step, record it with the accountant, and return its noise function (keyed by
        the step index, so no (key, step) pair is used twice)."""
        current = self._current_parameters()  # read once for both checks: the step's hot path
        self.check_model_unchanged(current)
        self.check_no_foreign_gradient()
        self.check_not_partial()
        self.check_no_stray_gradient(current)
        self.check_budget()
        if self.checks_sampling and self.drawn_step is None:
            raise SamplingError(
                f"Step {self.steps_taken} has no logical batch from the engine's loader: draw each step's batch "
                "with engine.make_data_loader(...) (an empty Poisson batch is still drawn, then stepped), or "
                "declare your own sampling with DPConfig(sampling_declared_by_user=True)."
            )
        step, key = self.steps_taken, self._noise_key
        std = self._std_of_step()
        if self.adaptive is not None:  # the sensitivity this step was clipped with; then the thresholds move
            self.adaptive.close(key, step)
        self.step_noise_std = std
        # keyed by this step's index: drawn ahead only if drawn for this very step and std (else at the step)
        add_noise = self.noise_ahead.noise_fn(step, std)
        if self.plan.accounts:
            self.accountant.step(*self.plan.step_event())
        self.steps_taken += 1
        self.step_norms = torch.cat(self._norms) if self._norms else torch.zeros(0)
        if self._nonfinite:
            logger.warning(
                "dpscale: step %d: %d %s(s) on this process had a non-finite loss or gradient norm and contributed "
                "zero (in every clipping group for a non-finite loss, else in the groups whose norm was not "
                "finite); the step went on and was charged to the budget as usual.",
                step, self._nonfinite, self.plan.sampling.privacy_unit,
            )
            self.nonfinite_examples += self._nonfinite
        self.reset_step()
        return add_noise
