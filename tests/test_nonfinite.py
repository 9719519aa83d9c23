"""The non-finite rule (docs/RELIABILITY.md): an example (or user) whose loss is not finite
contributes exactly zero, and one whose per-example norm in a clipping group is not finite
contributes zero in that group; the step goes on with its noise, is charged to the budget, and no
parameter becomes NaN. Checked against the float64 oracle run on the batch without the bad
examples, with the same divisor (under flat clipping, and for a bad loss, the example is gone
whole), and against the loop clipped group by group under that rule (``per_group_clipped_sum``)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import tests.distributed_worker as worker
from dpscale import DPConfig, PrivacyEngine
from dpscale.accounting import compute_epsilon
from dpscale.noise import NoiseKey
from tests.launcher import launch_workers
from tests.oracle import assert_close, clipped_sum, per_example_grads, per_group_clipped_sum
from tests.test_models import gpt2

KEY = NoiseKey(bytes(range(32)))
WORKER = Path(__file__).resolve().parent / "distributed_worker.py"


def config(clipping: str = "flat", **changes) -> DPConfig:
    base = dict(max_grad_norm=1.0, expected_batch_size=3.0, noise_multiplier=0.0, clipping=clipping,
                dataset_size=100, sampling_declared_by_user=True)
    return DPConfig(**{**base, **changes})


def keep(inputs: dict, rows: list[int]) -> dict:
    return {k: v[rows] for k, v in inputs.items()}


def oracle_without(model, inputs, loss_fn, engine, bad: list[int]) -> dict[str, torch.Tensor]:
    """sum over the good examples of clip(g_i) / B, B the engine's (the bad ones are simply absent)."""
    rows = [i for i in range(inputs["input_ids"].shape[0]) if i not in bad]
    grads = per_example_grads(model, keep(inputs, rows), loss_fn, len(rows))
    return clipped_sum(grads, engine.clipping, engine.config.expected_batch_size)[1]


# how an example goes bad: a NaN loss with a NaN gradient, an infinite loss whose gradient is
# finite (the rule looks at the loss too), an infinite loss whose gradient is infinite
POISONS = {
    "nan": lambda losses, bad: losses * torch.where(bad, torch.nan, 1.0).to(losses.dtype),
    "inf-loss-finite-grad": lambda losses, bad: losses + torch.where(bad, math.inf, 0.0).to(losses.dtype),
    "inf": lambda losses, bad: losses * torch.where(bad, math.inf, 1.0).to(losses.dtype),
}


@pytest.mark.parametrize("poison", list(POISONS))
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_a_bad_example_contributes_zero_on_a_real_architecture(poison, clipping, caplog):
    model, loss_fn, batch = gpt2(tied=True)
    inputs = batch(0)
    bad = torch.tensor([False, True, False])
    engine = PrivacyEngine(model, config(clipping), noise_key=KEY,
                           optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    losses = POISONS[poison](loss_fn(model, inputs), bad)
    assert not torch.isfinite(losses[1]) and torch.isfinite(losses[[0, 2]]).all()
    engine.backward(losses)
    got = {n: g.clone() for n, g in engine.clipped_sums().items()}
    engine.detach()
    model.zero_grad(set_to_none=True)
    expected = oracle_without(model, inputs, loss_fn, engine, [1])
    for name, value in expected.items():
        assert torch.isfinite(got[name]).all(), name
        assert_close(got[name], value, 1e-6, name)


def mlp_with_a_dead_unit():
    """Linear(4, 6) -> ReLU -> Linear(6, 2), float64. An input of +inf in feature 0 drives every
    hidden unit to -inf (column 0 of the first weight is negative), so ReLU gives zeros: the loss
    and the second layer's gradient are finite, but the first weight's per-example gradient is
    0 * inf = NaN. The NaN is in one layer's norm only."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).double()
    with torch.no_grad():
        model[0].weight[:, 0] = -model[0].weight[:, 0].abs() - 0.1
    x = torch.randn(4, 4, dtype=torch.float64)
    y = torch.randn(4, 2, dtype=torch.float64)
    x[2, 0] = math.inf
    return model, {"input_ids": x, "labels": y}


def mlp_losses(model, inputs):
    return (model(inputs["input_ids"]) - inputs["labels"]).pow(2).sum(1)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_a_nan_in_one_layers_norm_zeroes_the_example_there(clipping, caplog):
    """Flat: the one group's norm is NaN, the example is dropped. Per layer: only the first weight's
    norm is NaN; the example is zeroed in that group and clipped as usual in the others (its
    first-layer bias and second-layer weight gradients are 0 there, its second-layer bias is not)."""
    model, inputs = mlp_with_a_dead_unit()
    engine = PrivacyEngine(model, config(clipping, noise_multiplier=2.0), noise_key=KEY,
                           optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    losses = mlp_losses(model, inputs)
    assert torch.isfinite(losses).all()  # the loss is fine: only a norm can say
    engine.backward(losses)
    group_norms = engine.last_group_norms
    if clipping == "per_layer":
        finite = torch.isfinite(group_norms[:, 2])
        assert not finite.all() and finite.any(), group_norms[:, 2]  # one layer's norm only
    got = {n: g.clone() for n, g in engine.clipped_sums().items()}
    with caplog.at_level(logging.WARNING, logger="dpscale.engine"):
        engine.step()
    assert engine.nonfinite_examples == 1
    assert any("step 0: 1 example(s)" in r.getMessage() for r in caplog.records), caplog.text
    # the step was taken with its noise and charged like any other
    assert engine.steps_taken == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert engine.epsilon() == pytest.approx(compute_epsilon(2.0, 3.0 / 100, 1, engine.delta), rel=1e-9)
    engine.detach()
    model.zero_grad(set_to_none=True)
    model_ref, inputs_ref = mlp_with_a_dead_unit()  # the oracle from the same start
    if clipping == "flat":  # without example 2
        grads = per_example_grads(model_ref, keep(inputs_ref, [0, 1, 3]), mlp_losses, 3)
        expected = clipped_sum(grads, engine.clipping, 3.0)[1]
    else:  # example 2 zeroed in the group whose norm is NaN only
        grads = per_example_grads(model_ref, inputs_ref, mlp_losses, 4)
        plan = engine.clipping
        expected = per_group_clipped_sum(grads, [False] * 4, [list(g) for g in plan.groups], plan.thresholds,
                                         plan.clip_fn, plan.gamma, 3.0)[2]
        assert expected["2.bias"].ne(clipped_sum(
            per_example_grads(model_ref, keep(inputs_ref, [0, 1, 3]), mlp_losses, 3), plan, 3.0)[1]["2.bias"]).any()
    for name, value in expected.items():
        assert torch.isfinite(got[name]).all(), name
        assert_close(got[name], value, 1e-9, name)


def test_a_clean_step_counts_nothing(caplog):
    model, loss_fn, batch = gpt2(tied=True)
    engine = PrivacyEngine(model, config(noise_multiplier=1.0), noise_key=KEY,
                           optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with caplog.at_level(logging.WARNING, logger="dpscale.engine"):
        engine.backward(loss_fn(model, batch(0)))
        engine.step()
    assert engine.nonfinite_examples == 0
    assert "non-finite" not in caplog.text


def test_a_user_with_one_bad_example_contributes_zero():
    """User level: the unit clipped is the user, so one bad example drops its whole user."""
    cfg = dict(privacy_unit="user", examples_per_user=2)
    model, inputs = mlp_with_a_dead_unit()
    twin, _ = mlp_with_a_dead_unit()
    engine = PrivacyEngine(model, config(**cfg), noise_key=KEY, optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    clean = PrivacyEngine(twin, config(**cfg), noise_key=KEY, optimizer=torch.optim.SGD(twin.parameters(), lr=0.0))
    users = [10, 11, 12, 11]  # example 2 (bad) is user 12's only one; then poison user 11 through its loss
    losses = mlp_losses(model, inputs)
    losses = losses * torch.tensor([1.0, math.nan, 1.0, 1.0], dtype=losses.dtype)
    engine.backward(losses, users=users)
    clean.backward(mlp_losses(twin, keep(inputs, [0])), users=[10])
    got, expected = engine.clipped_sums(), clean.clipped_sums()
    for name in engine.parameters:
        assert torch.isfinite(got[name]).all(), name
        assert torch.allclose(got[name], expected[name], rtol=1e-12, atol=1e-14), name
    engine.step()
    assert engine.nonfinite_examples == 2  # users 11 and 12


@pytest.mark.slow
@pytest.mark.parametrize("bad", [2, 1])  # rank r takes batch[r::2]: example 2 is on rank 1, example 1 on rank 0
def test_two_processes_with_a_nan_example_match_one_process(tmp_path, bad):
    """DDP over gloo: a NaN input on one rank. The ranks' parameters equal the one-process run on
    the batch without that example (same divisor), and the rank that held it says so."""
    batches = [[1, 2, 3, 4], [5, 6, 7, 9]]
    spec = {"case": "ddp", "model": "mlp", "clipping": "flat", "batches": batches, "nan_example": bad}
    results = launch_workers(WORKER, spec, tmp_path, timeout=90)
    for rank, (code, err) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{err[-3000:]}"
    holder = [1, 2, 3, 4].index(bad) % 2
    assert "step 0: 1 example(s)" in results[holder][1], results[holder][1][-2000:]
    assert "non-finite" not in results[1 - holder][1]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    reference = worker.run({**spec, "batches": [[i for i in b if i != bad] for b in batches]}, 0, 1)
    for name, value in reference.items():
        assert torch.isfinite(ranks[0][name]).all(), name
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert torch.allclose(ranks[0][name], value, rtol=1e-5, atol=1e-5), (
            f"{name}: max difference {float((ranks[0][name] - value).abs().max()):.3g}")
