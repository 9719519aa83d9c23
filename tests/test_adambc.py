"""DP-AdamBC (dpscale.optim): its update against a plain float64 loop over coordinates, and the
noise variance it subtracts against the noise the engine really adds."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dpscale import ConfigError, DPAdamBC, DPConfig, PrivacyEngine
from dpscale.noise import NoiseKey, gaussian

KEY = NoiseKey(bytes(range(32)))


def reference_adambc(params: list[list[float]], grads_by_step: list[list[list[float]]], stds: list[float], *,
                     lr: float, betas: tuple[float, float], floor: float, weight_decay: float):
    """The paper's update written out one coordinate at a time in Python floats (float64):
    theta <- theta (1 - lr wd) - lr m^ / sqrt(max(v^ - phi^, floor)), phi^ the bias-corrected running
    average of the per-step noise variances. Returns the parameters and how often the floor bound."""
    beta1, beta2 = betas
    params = [list(p) for p in params]
    m = [[0.0] * len(p) for p in params]
    v = [[0.0] * len(p) for p in params]
    phi = 0.0
    floored = unfloored = 0
    for t, (grads, std) in enumerate(zip(grads_by_step, stds), start=1):
        phi = beta2 * phi + (1 - beta2) * std * std
        phi_hat = phi / (1 - beta2 ** t)
        for k, (p, g) in enumerate(zip(params, grads)):
            for j in range(len(p)):
                m[k][j] = beta1 * m[k][j] + (1 - beta1) * g[j]
                v[k][j] = beta2 * v[k][j] + (1 - beta2) * g[j] * g[j]
                m_hat = m[k][j] / (1 - beta1 ** t)
                corrected = v[k][j] / (1 - beta2 ** t) - phi_hat
                if corrected < floor:
                    floored += 1
                    corrected = floor
                else:
                    unfloored += 1
                p[j] = p[j] * (1 - lr * weight_decay) - lr * m_hat / math.sqrt(corrected)
    return params, floored, unfloored


def test_update_matches_a_float64_loop_with_a_changing_noise_std():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(3, 4, dtype=torch.float64)), nn.Parameter(torch.randn(5, dtype=torch.float64))]
    start = [p.detach().flatten().tolist() for p in params]
    stds = [0.3, 0.3, 0.5, 0.2, 0.4, 0.4]  # adaptive clipping moves R, hence the std, between steps
    grads_by_step = [[(0.6 * torch.randn(p.numel(), dtype=torch.float64)).tolist() for p in params] for _ in stds]
    hyper = dict(lr=0.01, betas=(0.8, 0.95), floor=0.05, weight_decay=0.1)
    optimizer = DPAdamBC(params, **hyper)
    current = iter(stds)
    step_std = []
    optimizer.bind_noise_std(lambda: step_std[-1])
    for grads in grads_by_step:
        step_std.append(next(current))
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g, dtype=torch.float64).reshape(p.shape)
        optimizer.step()
    expected, floored, unfloored = reference_adambc(start, grads_by_step, stds, **hyper)
    assert floored and unfloored  # both sides of the floor were exercised
    for p, want in zip(params, expected):
        assert torch.allclose(p.detach().flatten(), torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)


def test_with_no_noise_and_a_tiny_floor_it_is_adam_without_epsilon():
    torch.manual_seed(1)
    ours = nn.Parameter(torch.randn(20, dtype=torch.float64))
    theirs = nn.Parameter(ours.detach().clone())
    optimizer = DPAdamBC([ours], lr=0.01, floor=1e-300)
    optimizer.bind_noise_std(lambda: 0.0)
    adam = torch.optim.Adam([theirs], lr=0.01, eps=0.0)
    for _ in range(4):
        g = torch.randn(20, dtype=torch.float64)
        ours.grad, theirs.grad = g.clone(), g.clone()
        optimizer.step()
        adam.step()
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-12)


def tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(40, 50), nn.Tanh(), nn.Linear(50, 30)).double()


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_the_variance_it_reads_is_that_of_the_noise_the_engine_adds(clipping):
    """Zero data gradient (the losses do not depend on the parameters' values through anything but a
    factor 0): the gradient the optimizer applies is the engine's noise alone, over two micro-batches
    per step. It must be the keyed noise times sigma R / B (R the total threshold, whatever the
    groups), and its empirical variance the std^2 DPAdamBC subtracts."""
    model = tiny()
    sigma, R, B = 1.7, 0.9, 12.0
    engine = PrivacyEngine(model, DPConfig(max_grad_norm=R, expected_batch_size=B, noise_multiplier=sigma,
                                           clipping=clipping), noise_key=KEY)
    optimizer = engine.attach_optimizer(DPAdamBC(engine.parameters.values(), lr=1e-3))
    seen = []
    optimizer.register_step_pre_hook(lambda *_: seen.append(
        ({n: p.grad.clone() for n, p in engine.parameters.items()}, optimizer._noise_std())))
    x = torch.randn(6, 40, dtype=torch.float64)
    for step in range(3):
        for half in (x[:3], x[3:]):
            engine.backward(model(half).sum(1) * 0.0)
        engine.step()
        grads, read = seen[step]
        std = sigma * R / B
        assert read == pytest.approx(std, rel=1e-15)
        flat = []
        for name, g in grads.items():
            keyed = gaussian(KEY, step, name, g.numel(), dtype=torch.float64).reshape(g.shape)
            assert torch.allclose(g, std * keyed, rtol=0, atol=1e-15), name
            flat.append(g.flatten())
        values = torch.cat(flat)
        # sample variance of n Gaussians: relative standard error sqrt(2 / n) (n = 3580: 2.4 %)
        assert values.var().item() == pytest.approx(std ** 2, rel=4 * math.sqrt(2 / values.numel()))


def test_an_optimizer_without_an_engine_is_refused():
    p = nn.Parameter(torch.zeros(3))
    optimizer = DPAdamBC([p], lr=1e-3)
    p.grad = torch.ones(3)
    with pytest.raises(ConfigError, match="attach_optimizer"):
        optimizer.step()
    with pytest.raises(ConfigError, match="floor"):
        DPAdamBC([p], floor=0.0)
