"""``dpscale.run_steps`` as a user meets it: a progress bar with epsilon, a callback after each step
with the step, epsilon and the sampled loss, and a plain DataLoader refused before the first step
with the fix named."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dpscale
from dpscale import DPConfig, PrivacyEngine, SamplingError, StepOutcome
from dpscale.accounting import compute_epsilon
from dpscale.noise import NoiseKey

KEY = NoiseKey(bytes(range(32)))
N, B = 64, 8


def setup(**changes):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    config = DPConfig(**{**dict(max_grad_norm=1.0, expected_batch_size=B, noise_multiplier=1.0, dataset_size=N),
                         **changes})
    engine = PrivacyEngine(net, config, noise_key=KEY, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(N, 5, generator=g), torch.randn(N, 3, generator=g))
    return net, engine, data


def test_the_callback_gets_each_step_with_its_epsilon_and_sampled_loss():
    net, engine, data = setup()
    loader = engine.make_data_loader(data, max_physical_batch_size=3)
    seen_losses: list[list[float]] = []

    def losses(micro):
        out = (net(micro[0]) - micro[1]).pow(2).sum(1)
        seen_losses[-1].extend(out.tolist())
        return out

    outcomes: list[StepOutcome] = []

    def on_step(outcome):
        outcomes.append(outcome)
        seen_losses.append([])

    seen_losses.append([])
    result = dpscale.run_steps(engine, loader, losses, max_steps=4, on_step=on_step, progress=False)
    assert result.steps == 4 and [o.step for o in outcomes] == [0, 1, 2, 3]
    for k, outcome in enumerate(outcomes):
        assert outcome.epsilon == pytest.approx(compute_epsilon(1.0, B / N, k + 1, engine.delta), rel=1e-6)
        drawn = seen_losses[k]
        assert outcome.examples == len(drawn)
        assert outcome.loss == (pytest.approx(sum(drawn) / len(drawn), rel=1e-6) if drawn else None)


def test_the_progress_bar_shows_the_steps_and_epsilon(capsys):
    net, engine, data = setup()
    loader = engine.make_data_loader(data, max_physical_batch_size=4)
    dpscale.run_steps(engine, loader, lambda micro: (net(micro[0]) - micro[1]).pow(2).sum(1), max_steps=3)
    shown = capsys.readouterr().err
    assert "dpscale" in shown and "3/3" in shown, shown
    assert f"eps={engine.epsilon():.3g}" in shown, shown
    dpscale.run_steps(engine, loader, lambda micro: (net(micro[0]) - micro[1]).pow(2).sum(1), max_steps=1,
                      progress=False)
    assert capsys.readouterr().err == ""


def test_a_plain_data_loader_is_refused_before_the_first_step_naming_the_fix():
    net, engine, data = setup()
    before = [p.detach().clone() for p in net.parameters()]
    plain = torch.utils.data.DataLoader(data, batch_size=8)
    with pytest.raises(SamplingError, match=r"engine\.make_data_loader\(dataset"):
        dpscale.run_steps(engine, plain, lambda micro: (net(micro[0]) - micro[1]).pow(2).sum(1))
    other = PrivacyEngine(nn.Linear(5, 3), engine.config, noise_key=KEY).make_data_loader(data,
                                                                                         max_physical_batch_size=4)
    with pytest.raises(SamplingError, match="not the engine's loader"):  # another engine's loader
        dpscale.run_steps(engine, other, lambda micro: (net(micro[0]) - micro[1]).pow(2).sum(1))
    assert engine.steps_taken == 0 and all(torch.equal(p, q) for p, q in zip(net.parameters(), before))


def test_with_declared_sampling_a_loader_of_plain_batches_is_refused_too():
    net, engine, data = setup(sampling_declared_by_user=True)
    plain = torch.utils.data.DataLoader(data, batch_size=8)
    with pytest.raises(SamplingError, match="logical batch"):
        dpscale.run_steps(engine, plain, lambda micro: (net(micro[0]) - micro[1]).pow(2).sum(1), progress=False)
    assert engine.steps_taken == 0


def test_epsilon_is_composed_only_when_read_not_at_every_step(monkeypatch, capsys):
    """Composing T steps in the accountant costs more than a small model's step: computed at every
    step (as the bar once did) a 10,000-step run of a tiny model took 50 times longer. The bar
    refreshes epsilon at most every few seconds and once at the end; an outcome's epsilon is
    composed when read, and is still that step's."""
    import dpscale.accounting.accountant as accountant

    calls = []
    real = accountant.epsilon_of
    monkeypatch.setattr(accountant, "epsilon_of", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    net, engine, data = setup()
    loader = engine.make_data_loader(data, max_physical_batch_size=4)
    outcomes = []
    dpscale.run_steps(engine, loader, lambda micro: (net(micro[0]) - micro[1]).pow(2).sum(1), max_steps=30,
                      on_step=outcomes.append)
    assert len(calls) <= 3, len(calls)  # the bar: the first step, the end (and a refresh on a slow machine)
    assert f"eps={engine.epsilon():.3g}" in capsys.readouterr().err
    calls.clear()
    assert outcomes[9].epsilon == pytest.approx(compute_epsilon(1.0, B / N, 10, engine.delta), rel=1e-9)
    assert outcomes[9].epsilon == outcomes[9].epsilon and len(calls) == 1  # read once, then kept
