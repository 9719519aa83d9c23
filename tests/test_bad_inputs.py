"""Every case of tests/bad_inputs.py raises its dpscale error, and docs/RELIABILITY.md's table is
the one those errors render; the inputs next to the refusals that look like them are accepted and
exact (a forward whose losses are never used, a per-example mean, a batch-wide constant)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from dpscale import DPConfig, DPScaleError, PrivacyEngine
from tests import bad_inputs
from tests.oracle import assert_close, clipped_sum, per_example_grads

CASES = {case.id: case for case in bad_inputs.CASES}


@pytest.fixture(scope="module")
def results():
    """Each case run once: the parametrized test and the table read the same errors."""
    logging.disable(logging.WARNING)
    try:
        return {case.id: bad_inputs.run(case) for case in bad_inputs.CASES}
    finally:
        logging.disable(logging.NOTSET)


def test_case_ids_are_unique():
    assert len(CASES) == len(bad_inputs.CASES)


@pytest.mark.parametrize("case_id", list(CASES))
def test_each_bad_input_is_refused_with_its_error(results, case_id):
    case, error = CASES[case_id], results[case_id]
    assert error is not None, f"{case.input}: nothing was raised"
    assert isinstance(error, case.error), f"{case.input}: {type(error).__name__}: {error}"
    assert isinstance(error, DPScaleError)
    assert case.fragment in str(error), f"{case.input}: {case.fragment!r} not in {str(error)!r}"


def test_the_documented_table_is_the_rendered_one(results):
    rendered = bad_inputs.render(results)
    assert bad_inputs.documented() == rendered, (
        "docs/RELIABILITY.md's bad-input table is stale: run `PYTHONPATH=. python -m tests.bad_inputs --write`"
    )


def test_render_shows_what_escapes():
    """The table would show an input that raises nothing, or raises something not ours."""
    case = CASES["R_zero"]
    results = {c.id: None for c in bad_inputs.CASES}
    results[case.id] = TypeError("boom")
    table = bad_inputs.render(results)
    assert "| `TypeError` | boom |" in table
    assert "(nothing raised)" in table


# what the refusals must not catch -----------------------------------------------------------


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


CONFIG = DPConfig(noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=4)


def engine_grads(model: nn.Module, losses_of) -> dict:
    engine = PrivacyEngine(model, CONFIG, optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    engine.backward(losses_of(model))
    grads = {name: g.clone() for name, g in engine.clipped_sums().items()}
    engine.detach()
    return grads, engine


def oracle(model: nn.Module, inputs: torch.Tensor, loss_fn, engine) -> dict:
    grads = per_example_grads(model, {"x": inputs}, lambda m, batch: loss_fn(m, batch["x"]), inputs.shape[0])
    grads = {name: g.unsqueeze(1) if g.dim() == 1 else g for name, g in grads.items()}  # 0-dim parameters
    sums = clipped_sum(grads, engine.clipping, CONFIG.expected_batch_size)[1]
    return {name: value.reshape(engine.parameters[name].shape) for name, value in sums.items()}


def test_a_superseded_forward_is_ignored_exactly():
    """A forward whose losses are never back-propagated (an evaluation with gradients on) is
    superseded: the backward of the next one equals the one-example oracle on that batch alone."""
    torch.manual_seed(1)
    first, second = torch.randn(5, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    model = mlp()

    def losses(m):
        m(first)  # superseded, never used
        return m(second).pow(2).sum(1)

    got, engine = engine_grads(model, losses)
    expected = oracle(model, second, lambda m, batch: m(batch).pow(2).sum(1), engine)
    for name, value in expected.items():
        assert_close(got[name], value, 1e-10, name)


@pytest.mark.parametrize("form", ["token_mean", "constant_scale", "scalar_parameter"])
def test_per_example_reductions_and_batch_constants_are_not_mixing(form):
    """Reductions within an example and scalars that do not depend on the batch's outputs (a
    constant tensor, a learned temperature) pass the mixing check and match the oracle."""
    torch.manual_seed(2)
    inputs = torch.randn(4, 4, dtype=torch.float64)
    model = mlp()
    temperature = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
    if form == "scalar_parameter":
        model.add_module("scale", _Scale(temperature))

    def loss_fn(m, batch):
        out = m(batch)
        if form == "token_mean":
            return out.pow(2).mean(1)
        if form == "constant_scale":
            scale = torch.tensor(7.0, dtype=out.dtype)  # a 0-dim tensor off the gradient path
            return out.pow(2).sum(1) / scale
        return out.pow(2).sum(1)

    got, engine = engine_grads(model, lambda m: loss_fn(m, inputs))
    expected = oracle(model, inputs, loss_fn, engine)
    for name, value in expected.items():
        assert_close(got[name], value, 1e-10, name)


class _Scale(nn.Module):
    def __init__(self, temperature: nn.Parameter):
        super().__init__()
        self.temperature = temperature

    def forward(self, inputs):
        return inputs / self.temperature.exp()
