"""The DP step end to end on one process: noise once per optimizer step from the keyed generator,
the accountant's epsilon, and privacy state that survives a resume."""

from __future__ import annotations

import json
import logging
import pickle

import pytest
import torch
from torch import nn

from dpscale import ConfigError, DPConfig, PrivacyEngine
from dpscale.accounting import compute_epsilon
from dpscale.checkpoint import load_state, save_atomic
from dpscale.errors import CheckpointError
from dpscale.noise import SCHEME, NoiseKey, gaussian

KEY = NoiseKey(bytes(range(32)))
N, B = 200, 8


def model_and_data(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    return model, x


def config(**changes):
    """These tests feed their own batches (they test noise, accounting and state, not sampling):
    the sampling is declared, as a user with their own Poisson sampler would."""
    base = dict(max_grad_norm=0.7, expected_batch_size=B, noise_multiplier=1.3, dataset_size=N,
                sampling_declared_by_user=True)
    return DPConfig(**{**base, **changes})


def test_noise_is_added_once_per_step_whatever_the_number_of_backwards():
    model, x = model_and_data()
    twin, _ = model_and_data()
    engine = PrivacyEngine(model, config(), noise_key=KEY)
    clean = PrivacyEngine(
        twin, config(noise_multiplier=0.0), noise_key=KEY, optimizer=torch.optim.SGD(twin.parameters(), lr=0.0)
    )
    seen = {}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    engine.attach_optimizer(optimizer)
    optimizer.register_step_pre_hook(lambda *_: seen.update({n: p.grad.clone() for n, p in engine.parameters.items()}))
    for half in (x[:3], x[3:]):  # two micro-batches, one logical step
        engine.backward(model(half).pow(2).sum(1))
        clean.backward(twin(half).pow(2).sum(1))
    optimizer.step()
    std = engine.noise_std
    assert std == pytest.approx(1.3 * 0.7 / B)
    sums = clean.clipped_sums()
    for name, p in clean.parameters.items():
        noise = gaussian(KEY, 0, name, p.numel(), dtype=torch.float64).reshape(p.shape)
        assert torch.allclose(seen[name], sums[name] + std * noise, rtol=0, atol=1e-12), name
    assert all(p.grad is None for p in model.parameters())  # released after the step
    assert engine.steps_taken == 1


def test_an_empty_step_still_gets_noise_and_costs_privacy():
    model, _ = model_and_data()
    engine = PrivacyEngine(model, config(), noise_key=KEY)
    before = {n: p.detach().clone() for n, p in engine.parameters.items()}
    optimizer = engine.attach_optimizer(torch.optim.SGD(model.parameters(), lr=1.0))
    optimizer.step()  # no backward at all: an empty Poisson batch
    for name, p in engine.parameters.items():
        noise = gaussian(KEY, 0, name, p.numel(), dtype=torch.float64).reshape(p.shape)
        assert torch.allclose(before[name] - p.detach(), engine.noise_std * noise, atol=1e-12)
    assert engine.accountant.steps == 1 and engine.epsilon() > 0


def test_each_step_draws_new_noise():
    model, _ = model_and_data()
    engine = PrivacyEngine(model, config(), noise_key=KEY)
    optimizer = engine.attach_optimizer(torch.optim.SGD(model.parameters(), lr=0.0))
    grads = []
    optimizer.register_step_pre_hook(lambda *_: grads.append(model[0].weight.grad.clone()))
    for _ in range(2):
        optimizer.step()
    assert not hasattr(engine, "finish_step")  # no public call accounts a step that updates nothing
    assert not torch.allclose(grads[0], grads[1])


def trained_engine(steps: int) -> PrivacyEngine:
    """``steps`` logical steps of one backward each, noised at lr 0.1."""
    model, x = model_and_data()
    engine = PrivacyEngine(model, config(), noise_key=KEY)
    optimizer = engine.attach_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(steps):
        engine.backward(model(x).pow(2).sum(1))
        optimizer.step()
        optimizer.zero_grad()
    return engine


def test_epsilon_matches_the_accountant_library():
    engine = trained_engine(7)
    expected = compute_epsilon(1.3, B / N, 7, engine.delta)
    assert engine.epsilon() == pytest.approx(expected, rel=1e-9)
    assert engine.delta < 1 / N


def test_target_epsilon_is_calibrated_and_reached():
    model, _ = model_and_data()
    engine = PrivacyEngine(model, config(noise_multiplier=None, target_epsilon=2.0, epochs=3), noise_key=KEY)
    assert engine.planned_steps == 75
    assert engine.plan.planned_epsilon() <= 2.0
    assert engine.plan.planned_epsilon() == pytest.approx(2.0, rel=5e-3)


def test_unreachable_epsilon_is_refused_before_training():
    model, _ = model_and_data()
    from dpscale import PrivacyBudgetError

    with pytest.raises(PrivacyBudgetError):
        PrivacyEngine(model, config(noise_multiplier=None, target_epsilon=1e-4, target_delta=1e-10, steps=10_000))


def test_resume_gives_identical_parameters_and_epsilon(tmp_path):
    def run(steps, resume_from=None, save_at=None):
        model, x = model_and_data()
        if resume_from is not None:
            model.load_state_dict(torch.load(resume_from / "model.pt", weights_only=True))
        engine = PrivacyEngine(model, config(), noise_key=KEY)
        optimizer = engine.attach_optimizer(torch.optim.SGD(model.parameters(), lr=0.5))
        if resume_from is not None:
            engine.load_checkpoint(resume_from / "privacy.pt")
        while engine.steps_taken < steps:
            engine.backward(model(x).pow(2).sum(1))
            optimizer.step()
            optimizer.zero_grad()
            if engine.steps_taken == save_at:
                torch.save(model.state_dict(), tmp_path / "model.pt")
                engine.save_checkpoint(tmp_path / "privacy.pt")
        return model, engine

    whole, whole_engine = run(5)
    run(3, save_at=3)
    resumed, resumed_engine = run(5, resume_from=tmp_path)
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert resumed_engine.epsilon() == whole_engine.epsilon()
    assert resumed_engine.steps_taken == 5


def test_the_key_never_reaches_the_state(tmp_path):
    secret = bytes(range(100, 132))
    model, x = model_and_data()
    engine = PrivacyEngine(model, config(), noise_key=NoiseKey(secret))
    engine.make_data_loader(torch.utils.data.TensorDataset(torch.randn(N, 5)), max_physical_batch_size=4)
    engine.save_checkpoint(tmp_path / "state.pt")
    raw = (tmp_path / "state.pt").read_bytes()
    assert secret not in raw and engine.noise_key.derive_seed("sampling") not in raw
    assert "seed" not in engine.state_dict()["data_loader"]
    with pytest.raises(ConfigError, match="cannot be pickled"):
        pickle.dumps(engine.noise_key)
    state = load_state(tmp_path / "state.pt")
    assert state["steps_taken"] == 0


def test_resuming_with_another_mechanism_is_refused(tmp_path):
    model, _ = model_and_data()
    engine = PrivacyEngine(model, config(), noise_key=KEY)
    engine.save_checkpoint(tmp_path / "state.pt")
    other = PrivacyEngine(model_and_data()[0], config(noise_multiplier=2.0), noise_key=KEY)
    with pytest.raises(ConfigError, match="noise_multiplier"):
        other.load_checkpoint(tmp_path / "state.pt")


V1 = "dpscale.noise.gaussian.v1"  # the scheme before the log and sine became shared polynomials


def as_written_by_v1(state: dict, *, recorded: bool = True) -> dict:
    """A privacy state as dpscale wrote it under scheme v1: the scheme in its plan only (no
    noise_schemes record), or, for the oldest states, nowhere."""
    state = {key: value for key, value in state.items() if key != "noise_schemes"}
    if recorded:
        state["plan"] = {**state["plan"], "noise": {**state["plan"]["noise"], "scheme": V1}}
    else:
        del state["plan"]
    return state


@pytest.mark.parametrize("recorded", [True, False])
def test_a_checkpoint_of_another_noise_scheme_is_refused_unless_asked_for(tmp_path, caplog, recorded):
    """A run drawn under v1 and resumed by this dpscale would add v2's noise from then on: not a
    privacy loss (fresh noise either way), but not the run it continues, so it is refused by name;
    new_noise_scheme=True continues on purpose, logs it, and the state and report keep the record."""
    save_atomic(as_written_by_v1(trained_engine(3).state_dict(), recorded=recorded), tmp_path / "v1.pt")
    resumed = PrivacyEngine(model_and_data()[0], config(), noise_key=KEY)
    with pytest.raises(CheckpointError, match="noise scheme 'dpscale.noise.gaussian.v1'.*new_noise_scheme=True"):
        resumed.load_checkpoint(tmp_path / "v1.pt")
    assert resumed.steps_taken == 0 and resumed.state_dict()["noise_schemes"] == [[SCHEME, 0]]
    with caplog.at_level(logging.WARNING, logger="dpscale.engine"):
        resumed.load_checkpoint(tmp_path / "v1.pt", new_noise_scheme=True)
    assert resumed.steps_taken == 3 and any(V1 in r.getMessage() and "step 3" in r.getMessage() for r in caplog.records)
    history = [[V1, 0], [SCHEME, 3]]
    assert resumed.state_dict()["noise_schemes"] == history
    assert resumed.privacy_report()["noise"]["schemes_by_first_step"] == history
    resumed.save_checkpoint(tmp_path / "v2.pt")  # from here on the scheme is ours: no flag needed
    again = PrivacyEngine(model_and_data()[0], config(), noise_key=KEY)
    again.load_checkpoint(tmp_path / "v2.pt")
    assert again.steps_taken == 3 and again.state_dict()["noise_schemes"] == history


def test_a_resume_under_the_same_scheme_keeps_one_record(tmp_path):
    engine = trained_engine(2)
    engine.save_checkpoint(tmp_path / "privacy.pt")
    assert trained_engine(0).privacy_report()["noise"] == {
        "scheme": SCHEME, "key_fingerprint": KEY.fingerprint, "schemes_by_first_step": [[SCHEME, 0]]}
    resumed = PrivacyEngine(model_and_data()[0], config(), noise_key=KEY)
    resumed.load_checkpoint(tmp_path / "privacy.pt")
    assert resumed.state_dict()["noise_schemes"] == [[SCHEME, 0]]
    damaged = {**engine.state_dict(), "noise_schemes": [["x"]]}
    with pytest.raises(CheckpointError, match="damaged"):
        resumed.load_state_dict(damaged)


def test_optimizer_over_foreign_parameters_is_refused():
    model, _ = model_and_data()
    model[0].requires_grad_(False)  # frozen parameters of the model are ignored (tests/test_optimizer_attach.py)
    engine = PrivacyEngine(model, config(), noise_key=KEY)
    with pytest.raises(ConfigError, match="does not clip"):
        engine.attach_optimizer(torch.optim.SGD([*model.parameters(), nn.Parameter(torch.ones(2))], lr=0.1))


def test_data_loader_follows_the_plan():
    model, _ = model_and_data()
    engine = PrivacyEngine(model, config(), noise_key=KEY)
    with pytest.raises(ConfigError, match="dataset_size"):
        engine.make_data_loader(torch.utils.data.TensorDataset(torch.randn(N + 1, 5)), max_physical_batch_size=4)
    loader = engine.make_data_loader(torch.utils.data.TensorDataset(torch.randn(N, 5)), max_physical_batch_size=3)
    assert loader.sample_rate == pytest.approx(B / N) and loader.sampling == "poisson"
    engine.attach_optimizer(torch.optim.SGD(model.parameters(), lr=0.0))
    sizes = []
    for _, batch in zip(range(60), loader):
        sizes.append(batch.size)
        engine.step()  # every drawn batch is stepped (here with noise only)
    assert min(sizes) < B < max(sizes)  # Poisson: sizes vary around B


def test_privacy_report_files(tmp_path):
    engine = trained_engine(3)
    report = engine.privacy_report(tmp_path)
    saved = json.loads((tmp_path / "privacy_report.json").read_text())
    assert saved["epsilon"] == report["epsilon"] == engine.epsilon()
    assert saved["steps"] == 3 and saved["epsilon_curve"][-1][1] == pytest.approx(report["epsilon"])
    assert (tmp_path / "epsilon.png").read_bytes()[:4] == b"\x89PNG"
    assert "key" not in json.dumps(saved).replace("key_fingerprint", "")
