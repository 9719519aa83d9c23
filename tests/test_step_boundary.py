"""The DP step cannot be skipped or reinterpreted: the careless user's paths each end in a dpscale
error naming the fix, never in a weaker guarantee. An unattached optimizer, a foreign optimizer
stepping the clipped sums, a plain DataLoader, a skipped or doubled draw, more steps than the
budget, epsilon without a dataset size, a resume without the key."""

from __future__ import annotations

import logging
import math
import os

import pytest
import torch
from torch import nn

import dpscale
from dpscale import (
    ConfigError,
    DPConfig,
    ForeignGradientError,
    PrivacyBudgetExhausted,
    PrivacyEngine,
    SamplingError,
    StepBoundaryError,
    run_logical_step,
    run_steps,
)
from dpscale.accounting import compute_epsilon
from dpscale.checkpoint import load_state
from dpscale.noise import NoiseKey

KEY = NoiseKey(bytes(range(32)))
N, B = 64, 8


def data():
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randn(N, 5, generator=g), torch.randn(N, 3, generator=g))


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def losses_of(net):
    return lambda micro: (net(micro[0]) - micro[1]).pow(2).sum(1)


def config(**changes):
    return DPConfig(
        **{**dict(max_grad_norm=1.0, expected_batch_size=B, noise_multiplier=1.0, dataset_size=N), **changes}
    )


def snapshot(net):
    return [p.detach().clone() for p in net.parameters()]


# the boundary -----------------------------------------------------------------------------------


def test_an_optimizer_that_is_not_attached_never_moves_a_parameter():
    """The quickstart trap: SGD over engine.parameters, never attached. The first backward is
    refused, before the first optimizer step, and the optimizer's own step is refused by name:
    nothing trained, nothing accounted."""
    net = model()
    engine = PrivacyEngine(net, config(), noise_key=KEY)
    optimizer = torch.optim.SGD(engine.parameters.values(), lr=0.5)
    loader = engine.make_data_loader(data(), max_physical_batch_size=4)
    before = snapshot(net)
    batch = next(iter(loader))
    micro = batch.micro_batches[0]
    with pytest.raises(StepBoundaryError, match="attach_optimizer"):
        engine.backward(losses_of(net)(micro))
    with pytest.raises(ForeignGradientError, match="not attached"):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(net)))
    assert engine.steps_taken == 0 and engine.epsilon() == 0.0


def test_a_second_optimizer_finds_no_gradient_and_is_refused_by_name():
    """Optimizer A attached, optimizer B over the same parameters stepped after engine.backward:
    the clipped sums are the engine's (p.grad is None), so B has nothing to apply, and its step is
    refused by name before it runs. With the guard's hook removed, B still moves nothing; A's step
    then applies the noised sums once."""
    net = model()
    engine = PrivacyEngine(net, config(sampling_declared_by_user=True), noise_key=KEY)
    attached = engine.attach_optimizer(torch.optim.SGD(net.parameters(), lr=0.1))
    foreign = torch.optim.Adam(net.parameters(), lr=0.1, weight_decay=0.5)
    x, y = data().tensors
    engine.backward((net(x[:B]) - y[:B]).pow(2).sum(1))
    assert all(p.grad is None for p in net.parameters())
    before = snapshot(net)
    with pytest.raises(ForeignGradientError, match="Adam steps parameters of a PrivacyEngine that is not attached"):
        foreign.step()
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(net)))
    guard = next(h for h in engine._handles if type(h).__name__ == "_OptimizerGuard")
    guard.remove()  # by construction alone: no gradient to apply
    foreign.step()
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(net)))
    assert engine.steps_taken == 0
    attached.step()
    assert engine.steps_taken == 1
    assert not all(torch.equal(a, b) for a, b in zip(before, snapshot(net)))
    assert all(p.grad is None for p in net.parameters())


def test_one_optimizer_per_engine_and_none_over_deepspeed_like_backends():
    net = model()
    engine = PrivacyEngine(net, config(), optimizer=torch.optim.SGD(net.parameters(), lr=0.1), noise_key=KEY)
    with pytest.raises(ConfigError, match="already attached"):
        engine.attach_optimizer(torch.optim.SGD(net.parameters(), lr=0.1))

    class OwnsItsStep(dpscale.LocalBackend):  # as DeepSpeed: the training engine runs the optimizer
        owns_step = True

    other = model()
    engine = PrivacyEngine(other, config(), backend=OwnsItsStep(), noise_key=KEY)
    with pytest.raises(ConfigError, match="do not attach"):
        engine.attach_optimizer(torch.optim.SGD(other.parameters(), lr=0.1))


# the sampling claim -----------------------------------------------------------------------------


def test_a_plain_dataloader_is_refused():
    net = model()
    engine = PrivacyEngine(net, config(), optimizer=torch.optim.SGD(net.parameters(), lr=0.1), noise_key=KEY)
    x, y = next(iter(torch.utils.data.DataLoader(data(), batch_size=B, shuffle=True)))
    with pytest.raises(SamplingError, match="make_data_loader"):
        engine.backward((net(x) - y).pow(2).sum(1))
    with pytest.raises(SamplingError):  # an "empty" step without a draw is not accounted either
        engine.step()
    assert engine.steps_taken == 0 and engine.accountant.steps == 0


def test_declared_sampling_is_accounted_and_reported_as_the_users_claim():
    net = model()
    engine = PrivacyEngine(net, config(sampling_declared_by_user=True), noise_key=KEY,
                           optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    for x, y in torch.utils.data.DataLoader(data(), batch_size=B):
        engine.backward((net(x) - y).pow(2).sum(1))
        engine.step()
    report = engine.privacy_report()
    assert report["steps"] == N // B and report["epsilon"] == pytest.approx(
        compute_epsilon(1.0, B / N, N // B, engine.delta), rel=1e-9)
    assert "declared by the user" in report["sampling_source"]


def test_each_drawn_batch_is_stepped_exactly_once():
    net = model()
    engine = PrivacyEngine(net, config(), optimizer=torch.optim.SGD(net.parameters(), lr=0.1), noise_key=KEY)
    loader = engine.make_data_loader(data(), max_physical_batch_size=4)
    batches = iter(loader)
    next(batches)
    with pytest.raises(SamplingError, match="never stepped"):  # skipped without a step
        next(batches)
    assert loader.batch_sampler.next_step == 1  # the refused draw left the loader where it was
    engine.step()
    run_logical_step(engine, next(iter(loader)), losses_of(net))
    assert engine.steps_taken == 2 and engine.accountant.steps == 2


def test_a_loader_bound_to_the_engine_must_match_its_plan():
    net = model()
    engine = PrivacyEngine(net, config(), noise_key=KEY)
    other = dpscale.DPDataLoader(data(), sample_rate=B / N / 2, max_physical_batch_size=4, seed=1)
    with pytest.raises(ConfigError, match="plan"):
        engine.bind_data_loader(other)


# epsilon and the budget -------------------------------------------------------------------------


def test_epsilon_is_never_a_silent_zero():
    net = model()
    engine = PrivacyEngine(net, DPConfig(max_grad_norm=1.0, expected_batch_size=B, noise_multiplier=1.0),
                           optimizer=torch.optim.SGD(net.parameters(), lr=0.1), noise_key=KEY)
    x, y = data().tensors
    engine.backward((net(x[:B]) - y[:B]).pow(2).sum(1))
    engine.step()
    with pytest.raises(ConfigError, match="dataset_size"):
        engine.epsilon()
    assert engine.privacy_report()["epsilon"] is None
    unnoised = PrivacyEngine(model(), config(noise_multiplier=0.0), noise_key=KEY)
    unnoised.attach_optimizer(torch.optim.SGD(unnoised.parameters.values(), lr=0.1))
    unnoised.make_data_loader(data(), max_physical_batch_size=4)
    run_steps(unnoised, unnoised.data_loader, losses_of(unnoised.model), max_steps=1)
    assert unnoised.epsilon() == math.inf


def test_the_budget_is_the_last_step_within_the_target():
    engine = PrivacyEngine(model(), config(noise_multiplier=None, target_epsilon=1.0, steps=5), noise_key=KEY)
    budget, sigma, q = engine.budget_steps, engine.noise_multiplier, engine.sample_rate
    assert budget >= 5
    assert compute_epsilon(sigma, q, budget, engine.delta) <= 1.0 < compute_epsilon(sigma, q, budget + 1, engine.delta)


def test_overrunning_the_target_is_refused():
    """target_epsilon=1 over 5 steps, then 20 steps asked for: the step past the budget is refused
    before any parameter moves, epsilon stays within the target."""
    net = model()
    engine = PrivacyEngine(net, config(noise_multiplier=None, target_epsilon=1.0, steps=5), noise_key=KEY,
                           optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    loader = engine.make_data_loader(data(), max_physical_batch_size=4)
    taken = 0
    with pytest.raises(PrivacyBudgetExhausted, match="allow_budget_overrun"):
        for _ in range(4):  # passes over the loader
            for batch in loader:
                run_logical_step(engine, batch, losses_of(net))
                taken += 1
    assert taken == engine.steps_taken == engine.budget_steps
    assert engine.epsilon() <= 1.0
    before = snapshot(net)
    with pytest.raises(PrivacyBudgetExhausted):
        engine.step()
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(net)))


def test_overrun_only_when_asked_and_then_reported():
    net = model()
    engine = PrivacyEngine(net, config(noise_multiplier=None, target_epsilon=1.0, steps=5, allow_budget_overrun=True),
                           noise_key=KEY, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    loader = engine.make_data_loader(data(), max_physical_batch_size=4)
    outcome = run_steps(engine, loader, losses_of(net), max_steps=engine.budget_steps + 3)
    assert outcome.stopped == "max_steps" and engine.steps_taken == engine.budget_steps + 3
    assert engine.epsilon() > 1.0 and engine.privacy_report()["allow_budget_overrun"] is True


def test_the_loop_helper_stops_cleanly_at_the_budget_and_saves(tmp_path, caplog):
    net = model()
    engine = PrivacyEngine(net, config(noise_multiplier=None, target_epsilon=1.0, steps=5), noise_key=KEY,
                           optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    loader = engine.make_data_loader(data(), max_physical_batch_size=4)
    stops = []

    def save(outcome):
        stops.append(outcome)
        engine.save_checkpoint(tmp_path / "privacy.pt")

    with caplog.at_level(logging.WARNING, logger="dpscale.driver"):
        outcome = run_steps(engine, loader, losses_of(net), max_steps=20, on_stop=save)
    assert outcome.stopped == "budget" and outcome.steps == engine.budget_steps and stops == [outcome]
    assert "Privacy budget reached" in caplog.text
    state = load_state(tmp_path / "privacy.pt")
    assert state["steps_taken"] == engine.budget_steps


@pytest.mark.slow
def test_launch_train_stops_at_the_budget_and_saves(tmp_path):
    """launch/train.py (the `dpscale train` job) calibrated for half an epoch, capped at 100 steps:
    it stops at the budget, says so and leaves its checkpoint."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from tests.tiny_models import save_tiny_causal_lm, write_e2e_csv

    root = Path(__file__).resolve().parent.parent
    model, data = save_tiny_causal_lm(tmp_path / "model"), write_e2e_csv(tmp_path / "e2e.csv")
    command = [sys.executable, str(root / "launch" / "train.py"), "--model", str(model), "--data", str(data),
               "--trainable", "all", "--epsilon", "3", "--epochs", "0.5", "--max-steps", "100", "--batch-size", "8",
               "--micro-batch", "8", "--generations", "0", "--output-dir", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=root,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Privacy budget reached" in done.stdout, done.stdout[-2000:]
    state = load_state(tmp_path / "out" / "checkpoint" / "privacy.pt")
    report = json.loads((tmp_path / "out" / "privacy_report.json").read_text())
    assert 4 <= state["steps_taken"] == report["steps"] == report["budget_steps"] < 100
    assert report["epsilon"] <= 3.0


# what the user sees, and resume ----------------------------------------------------------------


def test_the_plan_is_public_and_logged_once(caplog):
    with caplog.at_level(logging.INFO, logger="dpscale.engine"):
        engine = PrivacyEngine(model(), config(noise_multiplier=None, target_epsilon=2.0, epochs=2), noise_key=KEY)
    plan = engine.plan
    assert engine.noise_multiplier == plan.noise.noise_multiplier > 0
    assert engine.noise_std == pytest.approx(engine.noise_multiplier * 1.0 / B)
    assert engine.sample_rate == B / N and engine.planned_steps == math.ceil(2 / (B / N)) == plan.sampling.steps
    assert engine.delta == plan.accounting.delta < 1 / N
    assert plan.noise.key_fingerprint == KEY.fingerprint
    lines = [r.getMessage() for r in caplog.records if r.name == "dpscale.engine"]
    assert len(lines) == 1 and "sigma" in lines[0] and "budget" in lines[0]


def test_dp_accounting_warnings_go_to_debug(caplog):
    from absl import logging as absl_logging

    from dpscale.accounting.epsilon import _absl_warnings_as_debug

    with caplog.at_level(logging.DEBUG):
        with _absl_warnings_as_debug():
            absl_logging.warning("Negative Renyi divergence of %s", -1e-9)
        absl_logging.warning("outside: left alone")
    ours = [r for r in caplog.records if "Negative Renyi" in r.getMessage()]
    assert [r.name for r in ours] == ["dpscale.accounting"] and ours[0].levelno == logging.DEBUG
    assert any("left alone" in r.getMessage() and r.name == "absl" for r in caplog.records)


def test_a_resume_without_the_key_is_refused_unless_a_fresh_key_is_asked_for(tmp_path):
    net = model()
    engine = PrivacyEngine(net, config(), noise_key=KEY, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    loader = engine.make_data_loader(data(), max_physical_batch_size=4)
    run_steps(engine, loader, losses_of(net), max_steps=2)
    engine.save_checkpoint(tmp_path / "privacy.pt")

    def resumed(key):
        other = PrivacyEngine(model(), config(), noise_key=key)
        other.make_data_loader(data(), max_physical_batch_size=4)
        return other

    with pytest.raises(ConfigError, match="fresh_key=True"):
        resumed(None).load_checkpoint(tmp_path / "privacy.pt")
    fresh = resumed(None)
    fresh.load_checkpoint(tmp_path / "privacy.pt", fresh_key=True)
    same = resumed(KEY)
    same.load_checkpoint(tmp_path / "privacy.pt")
    assert fresh.steps_taken == same.steps_taken == 2 and same.data_loader.batch_sampler.next_step == 2


def test_a_loader_out_of_step_with_the_engine_is_refused(tmp_path):
    net = model()
    engine = PrivacyEngine(net, config(), noise_key=KEY, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    loader = engine.make_data_loader(data(), max_physical_batch_size=4)
    run_steps(engine, loader, losses_of(net), max_steps=2)
    engine.save_checkpoint(tmp_path / "privacy.pt")
    restarted = PrivacyEngine(model(), config(), noise_key=KEY)
    fresh_loader = restarted.make_data_loader(data(), max_physical_batch_size=4)
    restarted.load_checkpoint(tmp_path / "privacy.pt")
    assert next(iter(fresh_loader)).step == 2  # restored together: continues
    lone = PrivacyEngine(model(), config(), noise_key=KEY)
    lone.make_data_loader(data(), max_physical_batch_size=4).batch_sampler._next_step = 3  # moved on alone
    with pytest.raises(SamplingError, match="same checkpoint"):
        next(iter(lone.data_loader))


# one place for each piece ---------------------------------------------------------------------


def test_one_key_loader_one_epochs_conversion_one_padding_loop():
    """The acceptance greps, as a test: each piece of the step lives in one place in dpscale/."""
    from pathlib import Path

    root = Path(dpscale.__file__).resolve().parent
    sources = {path.relative_to(root).as_posix(): path.read_text() for path in root.rglob("*.py")}

    def where(needle):
        return sorted(name for name, text in sources.items() if needle in text)

    assert where("NoiseKey.from_file(key") == ["noise/key.py"]
    assert where(".generate()") == ["noise/key.py"]
    assert where("round(epochs / ") == ["accounting/inputs.py"]  # steps_for_epochs
    # the protocol, the two backends whose engines gather in every pass, and the one caller
    assert where("micro_batch_count(") == [
        "backends/base.py", "backends/deepspeed.py", "backends/fsdp2.py", "driver.py"
    ]
    assert where(".padding_batch()") == ["driver.py"]
