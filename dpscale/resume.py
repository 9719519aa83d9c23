"""Resume: what a privacy state holds, and what a run must share with the run it continues.

A state holds the step counter, the accountant's history, the data loader's position, the
mechanism, the noise schemes drawn under, the plan, adaptive clipping's thresholds and their
history (so that a resumed run clips as the uninterrupted one would), and the key's fingerprint, never the key nor
the sampling seed derived from it. A state is loaded only if it is of the same mechanism, model
(trainable parameters by name and logical shape), clipping and key; a refused state leaves the
engine and its loader as they were.
"""

from __future__ import annotations

import logging

from dpscale.errors import CheckpointError, ConfigError

__all__ = ["load_privacy_state", "privacy_state", "resume_check"]

logger = logging.getLogger(__name__)


def privacy_state(engine) -> dict:
    """Step counter, accountant history, the data loader's position, the mechanism and the key's
    fingerprint; never the key, nor the sampling seed derived from it."""
    state = {
        "format": 2,
        "steps_taken": engine.steps_taken,
        "accountant": engine.accountant.state_dict(),
        "mechanism": engine.plan.mechanism(),
        "key_fingerprint": engine.noise_key.fingerprint,
        "noise_schemes": [list(entry) for entry in engine.noise_schemes],
        "plan": engine.plan.as_dict(),
        "resume_check": resume_check(engine),
    }
    if engine.adaptive_clipping is not None:
        state["adaptive_clipping"] = engine.adaptive_clipping.state_dict()
    if engine.data_loader is not None:
        loader_state = dict(engine.data_loader.state_dict())
        loader_state.pop("seed", None)
        state["data_loader"] = loader_state
    return state


def resume_check(engine) -> dict:
    """What a resumed run must share with the run it continues beyond the accounted mechanism:
    the trainable parameters (names and logical shapes: the noise of each coordinate is keyed by
    them) and the clipping (function, groups, thresholds, gamma) and the examples a user may bring."""
    clipping = engine.plan.clipping
    return {
        "parameters": [[name, list(engine.backend.logical_shape(name))] for name in engine.parameters],
        "clip_fn": clipping.clip_fn,
        "clip_gamma": clipping.gamma if clipping.clip_fn != "abadi" else None,
        "clip_groups": [list(group) for group in clipping.groups],
        "clip_thresholds": list(clipping.thresholds),
        "examples_per_user": engine.plan.sampling.examples_per_user,
    }


def load_privacy_state(engine, state: dict, *, fresh_key: bool = False, new_noise_scheme: bool = False) -> None:
    """Resume: the step counter continues, so no (key, step) pair is ever used twice.

        The key must be the one the run started with (its fingerprint is checked), so that the
        batches and the noise continue the same draw; ``fresh_key=True`` resumes with another key
        on purpose (the rest of the run draws fresh batches and noise). Likewise the noise scheme
        (dpscale.noise.SCHEME): a state written under another one (by an older dpscale) is refused,
        because the rest of the run would add other noise than the run it continues; the guarantee
        would hold (each step's noise is a fresh draw under either scheme, and the schemes' streams
        are independent), so ``new_noise_scheme=True`` continues under this dpscale's scheme on
        purpose, says so in the log, and the state and the privacy report record from which step.
        A state of another mechanism or model is refused, and a refused state leaves the engine
        (and its loader) as they were: everything is checked first, and a part that fails to load
        rolls the others back."""
    if not isinstance(state, dict) or state.get("format") != 2:
        raise CheckpointError("Not a dpscale privacy state (format 2): point to the privacy.pt the run wrote.")
    missing = sorted({"steps_taken", "accountant", "mechanism", "key_fingerprint"} - set(state))
    if missing or not isinstance(state["mechanism"], dict):
        raise CheckpointError(f"The privacy state lacks {missing or ['mechanism']}: it is damaged; start over.")
    saved, ours = state["mechanism"], engine.plan.mechanism()
    legacy = {"privacy_unit": "example"}  # checkpoints written before the field existed
    for field, value in ours.items():
        if saved.get(field, legacy.get(field)) != value:
            raise CheckpointError(
                f"The checkpoint was written with {field}={saved.get(field)!r} but this engine has "
                f"{value!r}; resuming would change the mechanism the accountant composed."
            )
    # absent from states written before it existed; those resume as they did
    for field, value in resume_check(engine).items():
        recorded = state.get("resume_check", {}).get(field, value)
        if recorded != value:
            shown = _first_difference(recorded, value) if field in ("parameters", "clip_groups") else \
                f"{recorded!r} but this engine has {value!r}"
            raise CheckpointError(
                f"The checkpoint was written with another {field}: {shown}. Resume with the model, trainable "
                "parameters and DPConfig the run began with, or start a new run in another folder."
            )
    if state["key_fingerprint"] != engine.noise_key.fingerprint and not fresh_key:
        raise CheckpointError(
            f"The checkpoint was written with noise key {state['key_fingerprint']} but this engine holds "
            f"{engine.noise_key.fingerprint}: resume with the key file the run started with (noise_key=path). "
            "To continue with a new key on purpose (fresh batches and noise from here on), pass fresh_key=True."
        )
    schemes = _recorded_noise_schemes(state)
    previous, ours = schemes[-1][0], engine.plan.noise.scheme
    if previous != ours:
        if not new_noise_scheme:
            raise CheckpointError(
                f"The checkpoint was written under noise scheme {previous!r} but this dpscale draws "
                f"{ours!r}: the rest of the run would add other noise than the run it continues (the "
                "guarantee would hold, the reproducibility of the run would not). Resume with the dpscale "
                "version that wrote it, or pass new_noise_scheme=True to continue under the new scheme on "
                "purpose (the privacy report then records both)."
            )
        schemes = [*schemes, [ours, int(state["steps_taken"])]]
    if "data_loader" in state and engine.data_loader is None:
        raise ConfigError("The checkpoint has a data loader position: build it with engine.make_data_loader first.")
    if engine.adaptive_clipping is not None and "adaptive_clipping" not in state:
        raise CheckpointError("The checkpoint has no adaptive clipping state (thresholds): it is damaged; start over.")
    boundary, adaptive = engine._boundary, engine.adaptive_clipping
    before = (engine.accountant.state_dict(), boundary.steps_taken,
              None if engine.data_loader is None else engine.data_loader.state_dict(),
              None if adaptive is None else adaptive.state_dict())
    try:
        if adaptive is not None:
            adaptive.load_state_dict(state["adaptive_clipping"])
        engine.accountant.load_state_dict(state["accountant"])
        boundary.steps_taken = int(state["steps_taken"])
        if "data_loader" in state:
            engine.data_loader.load_state_dict(
                {**state["data_loader"], "seed": list(engine.noise_key.derive_seed("sampling"))})
    except BaseException:
        engine.accountant.load_state_dict(before[0])
        boundary.steps_taken = before[1]
        if before[2] is not None:
            engine.data_loader.load_state_dict(before[2])
        if adaptive is not None:
            adaptive.load_state_dict(before[3])
        raise
    if previous != ours:
        logger.warning(
            "Resumed at step %d under noise scheme %s; the steps before it drew their noise under %s. The "
            "accounting is unaffected; the noise from here on is not what the run would have drawn without "
            "the change.", boundary.steps_taken, ours, previous,
        )
    engine.noise_schemes = schemes
    boundary.reset_step()


_FIRST_NOISE_SCHEME = "dpscale.noise.gaussian.v1"  # every state written before states recorded a scheme


def _recorded_noise_schemes(state: dict) -> list[list]:
    """The noise schemes a saved run drew under, as [scheme, first step] pairs: its "noise_schemes"
    record; for a state written before that record existed, the scheme of its plan (then, as
    before the plan was saved, the first scheme, the only one there was)."""
    recorded = state.get("noise_schemes")
    if recorded is None:
        plan = state.get("plan")
        noise = plan.get("noise") if isinstance(plan, dict) else None
        scheme = noise.get("scheme") if isinstance(noise, dict) else None
        return [[scheme if isinstance(scheme, str) else _FIRST_NOISE_SCHEME, 0]]
    if not (isinstance(recorded, list) and recorded and all(
            isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)
            and isinstance(entry[1], int) for entry in recorded)):
        raise CheckpointError("The privacy state's noise_schemes record is damaged; start over.")
    return [list(entry) for entry in recorded]


def _first_difference(recorded: list, ours: list) -> str:
    """Where two lists (of parameters or clipping groups) part, in words short enough for a message."""
    for index, (theirs, mine) in enumerate(zip(recorded, ours)):
        if theirs != mine:
            return f"entry {index} is {theirs!r} in the checkpoint, {mine!r} here"
    return f"the checkpoint has {len(recorded)} entries, this engine {len(ours)}"
