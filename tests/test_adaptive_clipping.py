"""Adaptive clipping (dpscale.adaptive_clipping) against a plain float64 loop over single examples:
norms, clipped sums, the centred count with its keyed noise, the geometric update of R, the
gradient noise at sigma_delta R_t / B, over several steps, flat and per layer; the accounting it
leaves unchanged; resume; and Opacus's update rule where the two are comparable."""

from __future__ import annotations

import math

import dp_accounting
import pytest
import torch
from torch import nn

from dpscale import CheckpointError, ConfigError, DPAdamBC, DPConfig, PrivacyEngine
from dpscale.accounting import compute_epsilon
from dpscale.adaptive_clipping import COUNT_NOISE_NAME, next_threshold, noisy_unclipped_fraction
from dpscale.backends import LocalBackend
from dpscale.noise import NoiseKey, gaussian
from tests.test_adambc import reference_adambc

KEY = NoiseKey(bytes(range(32)))
SIGMA, B, N = 1.1, 6.0, 60
SIZES = [5, 7, 0, 6, 4]  # realised Poisson sizes, an empty step among them


def model_and_batches(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    batches = [(torch.randn(n, 3, dtype=torch.float64) * (1 + torch.arange(n)[:, None] % 3),
                torch.randint(0, 2, (n,))) for n in SIZES]
    return model, batches


def losses_of(model, x, y):
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def dp_config(clipping, **changes):
    base = dict(max_grad_norm=0.8, expected_batch_size=B, noise_multiplier=SIGMA, dataset_size=N,
                sampling_declared_by_user=True, clipping=clipping, clip_quantile=0.6, clip_quantile_lr=0.3,
                clip_count_std=3.0)
    return DPConfig(**{**base, **changes})


def reference(model, batches, clipping, *, quantile=0.6, eta=0.3, count_std=3.0, adambc=None, lr=0.5):
    """One example at a time, in float64: returns the final parameters, the R_t of every step, the
    clipped/unclipped tally, and the gradients applied."""
    names = [n for n, _ in model.named_parameters()]
    groups = [names] if clipping == "flat" else [[n] for n in names]
    K = len(groups)
    thresholds = [0.8 / math.sqrt(K)] * K
    sigma_delta = 1.0 / math.sqrt(SIGMA ** -2 - K / (2 * count_std) ** 2)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    history, tally, applied, stds = [], [0, 0], [], []
    for t, (x, y) in enumerate(batches):
        total = {n: torch.zeros_like(p) for n, p in params.items()}
        centred = [0.0] * K
        for i in range(x.shape[0]):
            with torch.enable_grad():
                live = {n: p.clone().requires_grad_() for n, p in params.items()}
                logits = torch.func.functional_call(model, live, (x[i:i + 1],))
                loss = nn.functional.cross_entropy(logits, y[i:i + 1], reduction="none")
                grads = dict(zip(live, torch.autograd.grad(loss[0], list(live.values()))))
            for k, group in enumerate(groups):
                norm = math.sqrt(sum(float(grads[n].pow(2).sum()) for n in group))
                unclipped = norm <= thresholds[k]
                tally[unclipped] += 1
                centred[k] += (1.0 if unclipped else 0.0) - 0.5
                factor = min(1.0, thresholds[k] / norm)
                for n in group:
                    total[n] += factor * grads[n]
        R_t = math.sqrt(sum(r * r for r in thresholds))
        history.append(R_t)
        std = sigma_delta * R_t / B
        stds.append(std)
        grad = {n: total[n] / B + std * gaussian(KEY, t, n, p.numel(), dtype=torch.float64).reshape(p.shape)
                for n, p in params.items()}
        applied.append(grad)
        z = gaussian(KEY, t, COUNT_NOISE_NAME, K, dtype=torch.float64).tolist()
        for k in range(K):
            b = min(1.0, max(0.0, (centred[k] + count_std * z[k]) / B + 0.5))
            thresholds[k] = thresholds[k] * math.exp(-eta * (b - quantile))
        if adambc is None:
            params = {n: p - lr * grad[n] for n, p in params.items()}
        else:  # the AdamBC trajectory so far, replayed from the start (it depends on the gradients and stds only)
            start = [p.detach().flatten().tolist() for p in model.parameters()]
            steps = [[g[n].flatten().tolist() for n in names] for g in applied]
            flat, _, _ = reference_adambc(start, steps, stds, **adambc)
            params = {n: torch.tensor(f, dtype=torch.float64).reshape(params[n].shape) for n, f in zip(names, flat)}
    return params, history, thresholds, tally


def run_engine(model, batches, config, optimizer_fn=None, engine_state=None, steps=None, start=0):
    engine = PrivacyEngine(model, config, noise_key=KEY)
    optimizer = engine.attach_optimizer((optimizer_fn or (lambda ps: torch.optim.SGD(ps, lr=0.5)))(
        list(engine.parameters.values())))
    if engine_state is not None:
        engine.load_state_dict(engine_state[0])
        optimizer.load_state_dict(engine_state[1])
    for x, y in batches[start:steps]:
        for part in (slice(0, 3), slice(3, None)):  # two micro-batches per step
            if x[part].shape[0]:
                engine.backward(losses_of(model, x[part], y[part]))
        engine.step()
    return engine, optimizer


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_steps_match_a_single_example_loop(clipping):
    model, batches = model_and_batches()
    want, history, thresholds, tally = reference(model, batches, clipping)
    assert tally[0] and tally[1]  # examples on both sides of R
    assert len(set(round(r, 9) for r in history)) == len(history)  # R moved at every step
    engine, _ = run_engine(model, batches, dp_config(clipping))
    for name, p in model.named_parameters():
        assert torch.allclose(p.detach(), want[name], rtol=0, atol=1e-12), name
    assert engine.adaptive_clipping.history == pytest.approx(history, rel=1e-12)
    assert engine.clip_thresholds == pytest.approx(tuple(thresholds), rel=1e-12)
    report = engine.privacy_report()["adaptive_clipping"]
    assert [r for _, r in report["clip_norm_by_step"]] == pytest.approx(history, rel=1e-12)


def test_with_dpadambc_the_std_subtracted_follows_r():
    model, batches = model_and_batches(1)
    hyper = dict(lr=0.01, betas=(0.9, 0.99), floor=1e-4, weight_decay=0.0)
    want, _, _, _ = reference(model, batches, "flat", adambc=hyper)
    run_engine(model, batches, dp_config("flat"), optimizer_fn=lambda ps: DPAdamBC(ps, **hyper))
    for name, p in model.named_parameters():
        assert torch.allclose(p.detach(), want[name], rtol=0, atol=1e-12), name


def test_the_accountant_sees_sigma_and_the_composition_is_exactly_sigma():
    model, batches = model_and_batches()
    config = dp_config("per_layer")
    engine, _ = run_engine(model, batches, config)
    assert engine.epsilon() == compute_epsilon(SIGMA, B / N, len(batches), engine.delta)
    # one unsampled step: the gradient Gaussian (sigma_delta, sensitivity 1) and K counts (noise sigma_b,
    # sensitivity 1/2 each, i.e. multiplier 2 sigma_b) compose, under RDP, to exactly a Gaussian of sigma
    K = len(engine.plan.clipping.groups)
    sigma_delta = engine.plan.adaptive.gradient_noise_multiplier
    parts = [dp_accounting.GaussianDpEvent(sigma_delta)] + [dp_accounting.GaussianDpEvent(2 * 3.0)] * K
    orders = [1.5, 2, 4, 8, 32]
    composed = dp_accounting.rdp.RdpAccountant(orders).compose(dp_accounting.ComposedDpEvent(parts))
    single = dp_accounting.rdp.RdpAccountant(orders).compose(dp_accounting.GaussianDpEvent(SIGMA))
    assert composed.get_epsilon(1e-5) == pytest.approx(single.get_epsilon(1e-5), rel=1e-9)
    assert sigma_delta > SIGMA


def test_resume_continues_r_and_the_parameters_exactly():
    model, batches = model_and_batches(2)
    whole, _ = run_engine(model, batches, dp_config("flat"))
    model_a, _ = model_and_batches(2)
    first, optimizer = run_engine(model_a, batches, dp_config("flat"), steps=2)
    state = (first.state_dict(), optimizer.state_dict())
    first.detach()
    resumed, _ = run_engine(model_a, batches, dp_config("flat"), engine_state=state, start=2)
    for (name, p), q in zip(model.named_parameters(), model_a.parameters()):
        assert torch.equal(p, q), name
    assert resumed.clip_thresholds == whole.clip_thresholds
    assert resumed.adaptive_clipping.history == whole.adaptive_clipping.history
    other, _ = model_and_batches(2)
    engine = PrivacyEngine(other, dp_config("flat", clip_quantile=0.5), noise_key=KEY)
    with pytest.raises(CheckpointError, match="adaptive_clipping"):
        engine.load_state_dict(state[0])
    assert engine.clip_thresholds == (0.8,)  # refused: left as it was


@pytest.mark.parametrize("unclipped", [0, 2, 5, 6])
def test_the_r_update_is_opacus_adaclip_given_the_same_count_and_no_noise(unclipped):
    """Comparable where the realised batch is the expected one (Opacus divides by the realised size)
    and without noise; Opacus's clamp of R to [min, max] is set wide open."""
    from opacus.optimizers import AdaClipDPOptimizer

    p = nn.Parameter(torch.zeros(2))
    theirs = AdaClipDPOptimizer(torch.optim.SGD([p], lr=0.1), noise_multiplier=1.0, target_unclipped_quantile=0.6,
                                clipbound_learning_rate=0.3, max_clipbound=1e9, min_clipbound=1e-9,
                                unclipped_num_std=10.0, max_grad_norm=0.8, expected_batch_size=int(B))
    theirs.unclipped_num, theirs.sample_size = torch.tensor(float(unclipped)), int(B)
    theirs.update_max_grad_norm()
    ours = next_threshold(0.8, noisy_unclipped_fraction(unclipped - B / 2, 0.0, B), 0.6, 0.3)
    assert float(theirs.max_grad_norm) == pytest.approx(ours, rel=1e-6)


def test_incompatible_options_are_refused_naming_the_fix():
    with pytest.raises(ConfigError, match="clip_fn='abadi'"):
        dp_config("flat", clip_fn="automatic")
    with pytest.raises(ConfigError, match="sampling='poisson'"):
        dp_config("flat", sampling="shuffle")
    with pytest.raises(ConfigError, match="clip_count_std must exceed"):
        PrivacyEngine(model_and_batches()[0], dp_config("per_layer", clip_count_std=1.0), noise_key=KEY)
    with pytest.raises(ConfigError, match="clip_quantile"):
        DPConfig(max_grad_norm=1.0, expected_batch_size=B, noise_multiplier=1.0, clip_count_std=3.0)

    class TwoRanks(LocalBackend):
        world_size = 2

    with pytest.raises(ConfigError, match="one data-parallel process"):
        PrivacyEngine(model_and_batches()[0], dp_config("flat"), noise_key=KEY, backend=TwoRanks())
