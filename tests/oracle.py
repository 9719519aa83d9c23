"""The reference every engine test is checked against: a plain loop over single examples in
float64, autograd on one example at a time, then clipping and summing by the book."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from dpscale.clipping import ClippingPlan


def per_example_grads(model: nn.Module, inputs: dict, loss_fn: Callable, batch: int) -> dict[str, Tensor]:
    """{name: [B, *shape]} by running the model on each example alone."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows = {n: [] for n in params}
    for i in range(batch):
        single = {
            k: (v[i : i + 1] if isinstance(v, Tensor) and v.dim() and v.shape[0] == batch else v)
            for k, v in inputs.items()
        }
        loss = loss_fn(model, single)
        assert loss.shape == (1,), loss.shape
        grads = torch.autograd.grad(loss[0], list(params.values()), allow_unused=True)
        for (n, p), g in zip(params.items(), grads):
            rows[n].append(torch.zeros_like(p) if g is None else g)
    return {n: torch.stack(r) for n, r in rows.items()}


def clipped_sum(grads: dict[str, Tensor], plan: ClippingPlan, expected_batch_size: float):
    """(total per-example norms [B], {name: sum_i clip(g_i) / B})."""
    group_norms = []
    for group in plan.groups:
        squares = sum(grads[n].flatten(1).pow(2).sum(1) for n in group)
        group_norms.append(squares.sqrt())
    sums = {}
    totals = torch.stack(group_norms).pow(2).sum(0).sqrt()
    for group, threshold, norms in zip(plan.groups, plan.thresholds, group_norms):
        if plan.clip_fn == "abadi":
            factors = torch.tensor(
                [min(1.0, threshold / float(v)) if float(v) > 0 else 1.0 for v in norms], dtype=torch.float64
            )
        else:
            factors = torch.tensor([threshold / (float(v) + plan.gamma) for v in norms], dtype=torch.float64)
        for n in group:
            g = grads[n]
            sums[n] = (factors.reshape(-1, *([1] * (g.dim() - 1))) * g).sum(0) / expected_batch_size
    return totals, sums


def per_group_clipped_sum(grads: dict[str, Tensor], bad_loss: list[bool], groups: list[list[str]],
                          thresholds, clip_fn: str, gamma: float, expected_batch_size: float):
    """By the book, unit by unit, with the non-finite rule (docs/RELIABILITY.md): a unit whose loss
    is not finite (``bad_loss``) is zeroed in every group, a unit whose norm in group k is not finite
    in group k only. From per-unit gradients ({name: [U, ...]}, NaN or inf where the unit's
    gradient is): (group norms [K, U], factors applied [K, U], {name: clipped sum / B}, centred
    unclipped counts [K], a zeroed unit counting as clipped)."""
    units = len(bad_loss)
    norms = torch.zeros(len(groups), units, dtype=torch.float64)
    factors = torch.zeros_like(norms)
    centred = [0.0] * len(groups)
    for k, group in enumerate(groups):
        for u in range(units):
            norm = math.sqrt(sum(float(grads[n][u].pow(2).sum()) for n in group))
            norms[k, u] = norm
            if bad_loss[u] or not math.isfinite(norm):
                centred[k] -= 0.5  # zeroed in this group, counted as clipped there
                continue
            if clip_fn == "abadi":
                factors[k, u] = min(1.0, thresholds[k] / norm) if norm > 0 else 1.0
            else:
                factors[k, u] = thresholds[k] / (norm + gamma)
            centred[k] += 0.5 if norm <= thresholds[k] else -0.5
    sums = {}
    for k, group in enumerate(groups):
        for n in group:
            g = grads[n]
            terms = [factors[k, u] * g[u] for u in range(units) if factors[k, u] != 0]
            sums[n] = (sum(terms) if terms else torch.zeros_like(g[0])) / expected_batch_size
    return norms, factors, sums, centred


def assert_close(actual: Tensor, expected: Tensor, rtol: float = 1e-6, what: str = "") -> None:
    """Relative agreement measured against the scale of the expected tensor."""
    scale = expected.abs().max().clamp(min=1e-12)
    err = (actual.to(expected.dtype) - expected).abs().max() / scale
    assert err <= rtol, f"{what}: relative error {float(err):.3g} > {rtol}"


def check_engine(model: nn.Module, batches: list[dict], loss_fn: Callable, config, rtol: float = 1e-6, rules=None):
    """Run ``engine.backward`` over ``batches`` (accumulating), then the oracle, and compare the
    per-example norms of every backward call and the accumulated p.grad."""
    from dpscale import PrivacyEngine

    model.zero_grad(set_to_none=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine = PrivacyEngine(model, config, rules=rules, optimizer=torch.optim.SGD(trainable, lr=0.0))
    engine_norms = []
    for inputs in batches:
        losses = loss_fn(model, inputs)
        engine.backward(losses)
        engine_norms.append(engine.last_norms.clone())
    engine_grads = {n: g.clone() for n, g in engine.clipped_sums().items()}
    engine.detach()
    model.zero_grad(set_to_none=True)
    expected = {n: torch.zeros_like(p) for n, p in engine.parameters.items()}
    for inputs, norms in zip(batches, engine_norms):
        batch = norms.shape[0]
        grads = per_example_grads(model, inputs, loss_fn, batch)
        totals, sums = clipped_sum(grads, engine.clipping, config.expected_batch_size)
        assert_close(norms, totals, rtol, "per-example norms")
        for n in expected:
            expected[n] += sums[n]
    for n, g in expected.items():
        assert_close(engine_grads[n], g, rtol, f"clipped sum of {n}")
    return engine
