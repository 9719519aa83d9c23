"""Random inputs, valid and not: DPConfig fields (NaN, infinities, zero, negatives, booleans,
strings, None, lists), small models with losses of random shapes and forms, and the loader's
arguments. A valid input trains one step; an invalid one raises a dpscale error; nothing else
escapes (TypeError, IndexError, a torch RuntimeError) and no example runs past the deadline."""

from __future__ import annotations

import logging
import math
import os
from datetime import timedelta

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

from dpscale import DPConfig, DPDataLoader, DPScaleError, PrivacyEngine, run_logical_step

nan, inf = float("nan"), float("inf")
JUNK = st.sampled_from([nan, inf, -inf, 0, 0.0, -1, -0.5, True, False, "1", "", None, [], [1.0], {"a": 1}])
# Tens of seconds in CI; HYPOTHESIS_PROFILE=thorough (tests/conftest.py) runs ten times more.
FAST = settings(max_examples=300 if os.environ.get("HYPOTHESIS_PROFILE") == "thorough" else 30,
                deadline=timedelta(seconds=30), suppress_health_check=list(HealthCheck))


def junk_or(valid: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(valid, valid, JUNK)  # valid values twice as often


FIELDS = ["max_grad_norm", "expected_batch_size", "noise_multiplier", "target_epsilon", "target_delta", "dataset_size",
          "steps", "epochs", "accountant", "sampling", "clipping", "group_max_grad_norms", "clip_fn", "automatic_gamma",
          "sampling_declared_by_user", "allow_budget_overrun", "privacy_unit", "examples_per_user"]
# What a field may be set to by mistake: junk, or a plausible value that contradicts the others.
WRONG = st.one_of(JUNK, st.floats(-2.0, 40.0), st.integers(-2, 40), st.sampled_from(
    ["pld", "rdp", "poisson", "shuffle", "flat", "per_layer", "abadi", "automatic", "user", "example", [["0.*"]],
     [[]], ["0.*"], [0.5, 0.5]]))


@st.composite
def config_fields(draw) -> dict:
    """A consistent DPConfig, then up to two fields set to something wrong (or right by chance)."""
    fields = {"max_grad_norm": draw(st.floats(0.01, 10.0)), "expected_batch_size": draw(st.integers(1, 6))}
    if draw(st.booleans()):  # accounted: the loader draws the batch
        fields["dataset_size"] = draw(st.integers(fields["expected_batch_size"], 24))
        if draw(st.booleans()):
            fields["target_epsilon"] = draw(st.floats(1.0, 8.0))
            fields["accountant"] = draw(st.sampled_from(["pld", "rdp"]))
            length = draw(st.sampled_from(["steps", "epochs"]))
            fields[length] = draw(st.integers(1, 4)) if length == "steps" else draw(st.floats(0.2, 1.0))
        else:
            fields["noise_multiplier"] = draw(st.floats(0.0, 3.0))
        if draw(st.booleans()):
            fields["privacy_unit"] = "user"
            fields["examples_per_user"] = draw(st.integers(1, 2))
    else:
        fields["noise_multiplier"] = draw(st.floats(0.0, 3.0))
    fields["clipping"] = draw(st.sampled_from(["flat", "per_layer", [["0.*"], ["2.*"]]]))
    fields["clip_fn"] = draw(st.sampled_from(["abadi", "automatic"]))
    for name, value in draw(st.lists(st.tuples(st.sampled_from(FIELDS), WRONG), max_size=2)):
        fields[name] = value
    return fields


@pytest.fixture(autouse=True)
def _quiet():
    logging.disable(logging.WARNING)  # sigma 0 and calibration notes, once per example
    yield
    logging.disable(logging.NOTSET)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def train_one_step(fields: dict, micro: int) -> str:
    """'trained' (and checked) or 'refused'; anything but a dpscale error escapes."""
    try:
        config = DPConfig(**fields)
        model = mlp()
        engine = PrivacyEngine(model, config, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        before = [p.detach().clone() for p in model.parameters()]
        inputs = torch.randn(max(config.dataset_size or 4, 1), 4)
        if config.dataset_size is None:
            engine.backward(model(inputs).pow(2).sum(1))
            engine.step()
        else:
            users = list(range(config.dataset_size)) if config.privacy_unit == "user" else None
            loader = engine.make_data_loader(list(range(config.dataset_size)), max_physical_batch_size=micro,
                                             collate_fn=torch.tensor, user_ids=users)
            batch = next(iter(loader))
            run_logical_step(engine, batch, lambda idx: model(inputs[idx]).pow(2).sum(1))
    except DPScaleError:
        return "refused"
    assert engine.steps_taken == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if engine.noise_multiplier > 0:  # the noise moves every parameter, whatever the batch held
        assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    return "trained"


@FAST
@given(fields=config_fields(), micro=st.integers(2, 6))
def test_random_configs_train_or_are_refused(fields, micro):
    event(train_one_step(fields, micro))


@pytest.mark.parametrize(
    "fields",
    [
        {"max_grad_norm": 1.0, "expected_batch_size": 4, "noise_multiplier": 1.0},
        {"max_grad_norm": 0.5, "expected_batch_size": 3, "noise_multiplier": 0.5, "dataset_size": 12, "steps": 3},
        {"max_grad_norm": 1.0, "expected_batch_size": 4, "target_epsilon": 4.0, "dataset_size": 16, "epochs": 1.0,
         "accountant": "rdp", "clipping": "per_layer", "clip_fn": "automatic"},
        {"max_grad_norm": 1.0, "expected_batch_size": 2, "noise_multiplier": 1.0, "dataset_size": 8,
         "privacy_unit": "user", "examples_per_user": 1, "sampling": "poisson"},
    ],
)
def test_valid_configs_train(fields):
    """The property above would pass if everything were refused: these must train."""
    assert train_one_step(fields, micro=2) == "trained"


# models and losses ----------------------------------------------------------------------------

LOSS_FORMS = ["per_example", "scalar", "unreduced", "short", "plus_mean", "over_norm", "detached", "list",
              "integer", "two_forwards", "stale", "unrelated"]


def tiny_model(kind: str) -> tuple[nn.Module, callable]:
    """(model, inputs of B examples) for a few layer families."""
    torch.manual_seed(0)
    if kind == "mlp":
        return mlp(), lambda b: torch.randn(b, 4)
    if kind == "embedding":
        model = nn.Sequential(nn.Embedding(11, 4), nn.Flatten(), nn.Linear(12, 2))
        return model, lambda b: torch.randint(0, 11, (b, 3))
    if kind == "conv":
        model = nn.Sequential(nn.Conv1d(2, 3, 2), nn.GroupNorm(1, 3), nn.Flatten(), nn.Linear(9, 2))
        return model, lambda b: torch.randn(b, 2, 4)
    model = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4))
    return model, lambda b: torch.randn(b, 5, 4)


def losses_of(form: str, model: nn.Module, make, batch: int):
    def per_example(out):
        return out.pow(2).flatten(1).sum(1)

    if form == "stale":
        stale = per_example(model(make(batch)))
        model(make(batch))
        return stale
    if form == "two_forwards":
        return per_example(model(make(batch))) + per_example(model(make(batch)))
    out = model(make(batch))
    if form == "per_example":
        return per_example(out)
    if form == "scalar":
        return per_example(out).mean()
    if form == "unreduced":
        return out
    if form == "short":
        return per_example(out)[1:]
    if form == "plus_mean":
        losses = per_example(out)
        return losses + losses.mean()
    if form == "over_norm":
        return per_example(out / out.norm())
    if form == "detached":
        return per_example(out).detach()
    if form == "list":
        return per_example(out).tolist()
    if form == "integer":
        return torch.ones(batch, dtype=torch.long)
    return torch.randn(batch, requires_grad=True) * 2  # unrelated to the model


@FAST
@given(kind=st.sampled_from(["mlp", "embedding", "conv", "tokens"]), batch=st.integers(1, 5),
       form=st.sampled_from(LOSS_FORMS), clipping=st.sampled_from(["flat", "per_layer"]))
def test_random_models_and_losses_train_or_are_refused(kind, batch, form, clipping):
    model, make = tiny_model(kind)
    config = DPConfig(max_grad_norm=1.0, expected_batch_size=batch, noise_multiplier=0.0, clipping=clipping)
    engine = PrivacyEngine(model, config, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    try:
        engine.backward(losses_of(form, model, make, batch))
        engine.step()
    except DPScaleError:
        assert form != "per_example", "a per-example loss was refused"
        event("refused")
        return
    event("trained")
    assert form == "per_example", f"losses of form {form!r} were accepted"
    assert engine.steps_taken == 1 and engine.last_norms.shape == (batch,)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# the loader ----------------------------------------------------------------------------------


LOADER_WRONG = st.one_of(JUNK, st.integers(-2, 30), st.floats(-1.0, 2.0), st.sampled_from(["poisson", "shuffle"]))


@st.composite
def loader_arguments(draw) -> dict:
    """Consistent loader arguments, then up to two set to something wrong (or right by chance)."""
    world_size = draw(st.integers(1, 2))
    arguments = {
        "dataset": list(range(draw(st.integers(1, 20)))),
        "sample_rate": draw(st.floats(1e-3, 1.0)),
        "max_physical_batch_size": draw(st.integers(1, 6)),
        "steps": draw(st.one_of(st.none(), st.integers(1, 4))),
        "seed": draw(st.integers(0, 2**70)) if world_size > 1 else draw(st.one_of(st.none(), st.integers(0, 2**70))),
        "rank": draw(st.integers(0, world_size - 1)),
        "world_size": world_size,
        "sampling": "poisson",
    }
    for name, value in draw(st.lists(st.tuples(st.sampled_from(sorted(arguments)), LOADER_WRONG), max_size=2)):
        arguments[name] = list(range(value)) if name == "dataset" and isinstance(value, int) and value >= 0 else value
    return arguments


@FAST
@given(arguments=loader_arguments())
def test_random_loader_arguments_draw_or_are_refused(arguments):
    micro = arguments["max_physical_batch_size"]
    size = len(arguments["dataset"]) if hasattr(arguments["dataset"], "__len__") else None
    try:
        loader = DPDataLoader(collate_fn=lambda rows: rows, **arguments)
        batches = iter(loader)
        drawn = [next(batches) for _ in range(min(len(loader), 3))]
    except DPScaleError:
        event("refused")
        return
    event("drew")
    assert 0 < loader.sample_rate <= 1 and not math.isnan(loader.sample_rate)
    for batch in drawn:
        sizes = [len(batch.micro_batches[j]) for j in range(len(batch.micro_batches))]
        assert all(0 < n <= micro for n in sizes) and sum(sizes) == len(batch.indices)
        assert all(0 <= i < size for i in batch.indices)
