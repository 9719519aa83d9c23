"""One accounted run in phases that train different parameters: linear probing, then fine-tuning
(LP-FT, Kumar et al. 2022), under one privacy budget.

    config = DPConfig(..., steps=k + t)                 # sigma calibrated for the whole run
    full = [n for n, p in model.named_parameters() if p.requires_grad]   # phase 2: subset + head
    set_trainable(model, head_parameter_names(model))   # phase 1: the head alone
    engine = PrivacyEngine(model, config, optimizer=AdamW(head params), noise_key=key)
    loader = engine.make_data_loader(train_set, max_physical_batch_size=16)
    run_steps(engine, loader, losses_fn, max_steps=k)
    first = engine
    first.detach()
    set_trainable(model, full)
    engine = PrivacyEngine(model, config, optimizer=AdamW(full params), noise_key=key)
    continue_run(engine, first)                         # same accountant, step counter and loader
    run_steps(engine, engine.data_loader, losses_fn)    # t more steps; epsilon ends at the target

Why two engines and a hand-over, not one engine over every parameter from the start. An engine
clips, noises and accounts a fixed set of parameters, and refuses a step after that set changed
(``StepBoundary.check_model_unchanged``): that check is what keeps a parameter from being trained
without noise. Owning the phase-2 parameters from the start and giving them a zero learning rate
in phase 1 would be private, but wasteful twice over: their per-example gradients would share the
clipping budget R with the head (so the head's signal would be clipped harder), and noise would be
drawn for millions of coordinates nobody uses. So each phase is its own engine over exactly the
parameters it trains, and ``continue_run`` makes the second the continuation of the first:

* the mechanism is the same by construction: both engines are built from one plan (the same
  sampling rate q, noise multiplier sigma, sensitivity R, batch size, accountant, delta, planned
  steps and budget; checked field by field), so every step of either phase is one Poisson-
  subsampled Gaussian step of (q, sigma) with sensitivity R over the parameters it releases;
* one accountant history: the new engine takes the previous one's, so epsilon is that of the
  k + t composed steps, and the budget check counts them all (the run stops at the target);
* one step counter and one key: the noise of step s is keyed by (key, s, name, index), and s
  continues, so no noise draw is reused;
* one loader: the same Poisson stream, at the position the first phase left it.

Which parameters a step releases is fixed before training (k is a setting, not a function of the
data), so the composition is the ordinary adaptive composition of the steps, as for one engine.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from torch import nn

from dpscale.errors import ConfigError, StepBoundaryError

__all__ = ["continue_run", "set_trainable"]

logger = logging.getLogger(__name__)


def set_trainable(model: nn.Module, names: Iterable[str]) -> nn.Module:
    """Exactly the parameters named (as ``model.named_parameters()`` names them) train; a name the
    model does not have is refused (a typo would otherwise train less than asked)."""
    names = set(names)
    known = {name for name, _ in model.named_parameters()}
    unknown = sorted(names - known)
    if unknown or not names:
        raise ConfigError(f"set_trainable: the model has no parameter {unknown[:3] or 'in an empty list'}; names "
                          f"look like {sorted(known)[:3]}")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in names)
    return model


def continue_run(engine, previous) -> None:
    """Make ``engine`` (new, built over the next phase's parameters, no step taken) continue the
    run of ``previous`` (detached at a step boundary): its accountant history, step counter, noise
    schemes and data loader. Refused, before anything moves, unless both engines run one mechanism
    (the same plan but for the parameters' names) with the same key."""
    if previous._handles:
        raise StepBoundaryError("continue_run: call previous.detach() first (after its last step), so that its hooks "
                                "leave the model before the next phase's parameters are chosen.")
    boundary = previous._boundary
    if boundary.drawn_step is not None or boundary._norms:
        raise StepBoundaryError(
            "continue_run: the previous engine is in the middle of a step (a batch was drawn or a backward ran "
            "without its step); finish that step (engine.step()) before handing over.")
    if engine.steps_taken or engine._boundary.drawn_step is not None or engine.data_loader is not None:
        raise StepBoundaryError("continue_run: the new engine has already drawn or taken steps, or has its own "
                                "loader; build it fresh and let continue_run hand it the previous loader.")
    ours, theirs = engine.plan, previous.plan
    different = [part for part in ("sampling", "noise", "accounting") if getattr(ours, part) != getattr(theirs, part)]
    clipping = (ours.clipping.clip_fn, ours.clipping.gamma, ours.clipping.sensitivity)
    if clipping != (theirs.clipping.clip_fn, theirs.clipping.gamma, theirs.clipping.sensitivity):
        different.append("clipping (function, gamma, sensitivity)")
    if different:
        detail = "; ".join(f"{part}: {getattr(theirs, part, None)} then {getattr(ours, part, None)}"
                           for part in different if part in ("sampling", "noise", "accounting"))
        raise ConfigError(
            f"continue_run: the new engine's plan differs in {different} ({detail}). Both phases must be one "
            "mechanism under one budget: build both engines from the same DPConfig (its steps or epochs the whole "
            "run's) and the same noise key.")
    loader = previous.data_loader
    if loader is None and ours.accounts and not ours.sampling.declared_by_user:
        raise ConfigError("continue_run: the previous engine has no loader to continue; draw its batches with "
                          "engine.make_data_loader.")
    engine.accountant.load_state_dict(previous.accountant.state_dict())
    engine._boundary.steps_taken = previous.steps_taken
    engine.noise_schemes = [list(entry) for entry in previous.noise_schemes]
    if loader is not None:
        engine.bind_data_loader(loader)  # previous.detach() unbound it
    logger.info("dpscale: the run continues at step %d over %d trainable tensors (was %d).",
                engine.steps_taken, len(engine.parameters), len(previous.parameters))
