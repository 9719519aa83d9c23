"""Edge noise multipliers and epsilons: what the accountants cannot compute is refused with a
dpscale error naming the range that works, fast and in bounded memory, for `dpscale epsilon`,
`dpscale calibrate` and the engine's plan; what they can compute matches dp_accounting itself.

Without the PLD limit, sigma = 1e-6 ends in numpy's "Unable to allocate 3.55 PiB" and sigma = 1e-3
allocates gigabytes: the command-line cases run in a subprocess capped at 3 GiB of address space, so
that a lost limit fails them (exit 1, a MemoryError) instead of exhausting the machine."""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
import time

import dp_accounting
import pytest
import torch
from dp_accounting import dp_event
from torch import nn

from dpscale import DPConfig, PrivacyBudgetError, PrivacyEngine
from dpscale.accounting import PrivacyAccountant, compute_epsilon, default_delta
from dpscale.accounting.limits import PLD_MAX_EPSILON, PLDOutOfRange
from dpscale.cli import main as cli

DELTA = 1e-5
SHAPE = ["--sample-rate", "0.05", "--steps", "300", "--delta", "1e-5"]  # a PLD at its limit costs ~2 s here


def _capped():
    resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))


def dpscale(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpscale.cli", *args], capture_output=True, text=True, timeout=300,
                          check=False, preexec_fn=_capped)


def least_named(message: str) -> float:
    return float(re.search(r"noise_multiplier >= ([0-9.e+-]+)", message).group(1))


@pytest.mark.slow  # two fresh processes under a memory cap
def test_dpscale_epsilon_refuses_a_sigma_the_pld_cannot_hold_and_names_the_least_that_works():
    started = time.perf_counter()
    results = [dpscale("epsilon", "--sigma", sigma, *SHAPE) for sigma in ("1e-6", "1e-3")]
    assert time.perf_counter() - started < 120
    for result in results:
        assert result.returncode == 2, result.stderr[-2000:]
        assert "Traceback" not in result.stderr and "allocate" not in result.stderr
        assert "no meaningful guarantee" in result.stderr and "--accountant rdp" in result.stderr
    least = least_named(results[0].stderr)
    assert least_named(results[1].stderr) == least  # the range depends on the run, not on the sigma refused
    # the range it names is the one that works: at the least sigma the PLD is computed, just below it is refused
    assert 0 < compute_epsilon(least, 0.05, 300, DELTA) <= PLD_MAX_EPSILON
    with pytest.raises(PLDOutOfRange):
        compute_epsilon(least * 0.999, 0.05, 300, DELTA)


def test_dpscale_epsilon_at_sigma_1e3_is_dp_accountings_value(capsys):
    assert cli(["epsilon", "--sigma", "1e3", *SHAPE, "--json"]) == 0
    reference = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-5)
    reference.compose(dp_event.PoissonSampledDpEvent(0.05, dp_event.GaussianDpEvent(1e3)), 300)
    rdp = dp_accounting.rdp.RdpAccountant()
    rdp.compose(dp_event.PoissonSampledDpEvent(0.05, dp_event.GaussianDpEvent(1e3)), 300)
    # an upper bound (pessimistic grid; dpscale refines it down to 5e-5, not 1e-5) and tighter than RDP's
    epsilon = json.loads(capsys.readouterr().out)["epsilon"]
    assert reference.get_epsilon(DELTA) * (1 - 1e-3) <= epsilon <= rdp.get_epsilon(DELTA)


@pytest.mark.parametrize("sigma", [1e-6, 1e-3, 1e3])
def test_the_rdp_accountant_computes_any_sigma_in_range_as_dp_accounting_does(sigma):
    reference = dp_accounting.rdp.RdpAccountant()
    reference.compose(dp_event.PoissonSampledDpEvent(0.05, dp_event.GaussianDpEvent(sigma)), 300)
    assert compute_epsilon(sigma, 0.05, 300, DELTA, accountant="rdp") == pytest.approx(reference.get_epsilon(DELTA))


@pytest.mark.parametrize("sigma", [1e-9, 1e9, 1e300])
@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_a_sigma_outside_every_accountants_range_is_refused(sigma, accountant):
    with pytest.raises(PrivacyBudgetError, match=r"outside \[1e-08, 1e\+08\]"):
        compute_epsilon(sigma, 0.05, 300, DELTA, accountant=accountant)
    with pytest.raises(PrivacyBudgetError, match=r"outside \[1e-08, 1e\+08\]"):
        PrivacyAccountant(accountant=accountant).step(sigma, 0.05)


def test_the_accountant_refuses_a_history_past_the_pld_limit_but_keeps_its_curve():
    accountant = PrivacyAccountant()
    accountant.step(1.0, 0.05, 300)
    curve = accountant.epsilon_curve(DELTA, points=3)
    assert curve[-1] == (300, accountant.epsilon(DELTA)) and [e for _, e in curve] == sorted(e for _, e in curve)
    accountant.step(1e-3, 0.05, 1)
    with pytest.raises(PLDOutOfRange, match="accountant='rdp'"):
        accountant.epsilon(DELTA)
    with pytest.raises(PLDOutOfRange):
        accountant.epsilon_curve(DELTA, points=3)


@pytest.mark.parametrize("target", ["6e7", "6e13"])  # epsilons of sigma 1e-3 and 1e-6 over this run (RDP)
@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_dpscale_calibrate_refuses_targets_of_vanishing_noise(target, accountant, capsys):
    assert cli(["calibrate", "--epsilon", target, *SHAPE, "--accountant", accountant]) == 2
    assert "promises next to nothing" in capsys.readouterr().err


def test_dpscale_calibrate_finds_sigma_near_1e3(capsys):
    epsilon = compute_epsilon(1e3, 0.05, 300, DELTA)
    assert cli(["calibrate", "--epsilon", repr(epsilon), *SHAPE, "--json"]) == 0
    sigma = json.loads(capsys.readouterr().out)["noise_multiplier"]
    assert sigma == pytest.approx(1e3, rel=0.01) and compute_epsilon(sigma, 0.05, 300, DELTA) <= epsilon


def _engine(**changes) -> PrivacyEngine:
    model = nn.Linear(4, 2)
    config = DPConfig(**{"max_grad_norm": 1.0, "expected_batch_size": 50, "dataset_size": 1000, "steps": 300,
                         **changes})
    return PrivacyEngine(model, config, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.parametrize("sigma", [1e-6, 1e-3])
def test_the_engine_refuses_a_noise_multiplier_its_accountant_cannot_compute_when_built(sigma):
    started = time.perf_counter()
    with pytest.raises(PLDOutOfRange, match="noise_multiplier >="):
        _engine(noise_multiplier=sigma)
    assert time.perf_counter() - started < 60
    engine = _engine(noise_multiplier=sigma, accountant="rdp")  # RDP computes it: a vacuous but true bound
    assert engine.noise_multiplier == sigma


def test_the_engine_at_sigma_1e3_builds_and_accounts():
    engine = _engine(noise_multiplier=1e3)
    engine.accountant.step(engine.noise_multiplier, engine.sample_rate, 300)
    assert engine.epsilon() == compute_epsilon(1e3, 0.05, 300, engine.delta)


def test_the_engine_refuses_a_target_past_the_pld_limit_naming_what_it_reaches():
    # RDP's answer for 150 lies past the PLD limit; the PLD accountant reaches about 97 on this run
    with pytest.raises(PrivacyBudgetError, match=r"reaches epsilon [0-9.]+ at most \(at sigma=") as error:
        _engine(target_epsilon=150.0)
    found = re.search(r"reaches epsilon ([0-9.]+) at most \(at sigma=([0-9.]+)\)", str(error.value))
    reached, sigma = float(found.group(1)), float(found.group(2))
    assert reached < 150 and compute_epsilon(sigma, 0.05, 300, default_delta(1000)) == pytest.approx(reached, rel=1e-3)
