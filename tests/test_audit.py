"""`dpscale audit`: the one-run lower bound (Steinke, Nasr, Jagielski 2023) stays below the
accountant's epsilon on a correct run, and clearly exceeds the claim when the noise is off or the
clipping is broken; the tail bound itself against values computed by hand."""

import itertools
import json
import math

import pytest

import dpscale
import dpscale.group_clipping
from dpscale.audit import (
    audit_one_run,
    audit_p_value,
    binomial_tail,
    epsilon_lower_bound,
)
from dpscale.cli import main
from dpscale.errors import ConfigError
from dpscale.noise import NoiseKey

KEY = NoiseKey(bytes(range(32)))
# 400 canaries (about 200 included) among 2000 examples, 50 steps at q = 0.1; 50 + 50 guesses.
RUN = {"steps": 50, "sample_rate": 0.1, "canaries": 400, "guesses": 50, "examples": 2000, "seed": 1,
       "noise_key": KEY}
SIGMA = 2.5  # the correct run's sigma; its accountant epsilon is the claim the broken runs are held to


@pytest.fixture(scope="module")
def correct_run():
    return audit_one_run(noise_multiplier=SIGMA, **RUN)


# (a) a correct run ------------------------------------------------------------------------------

def test_a_correct_run_stays_below_the_accountant(correct_run):
    result = correct_run
    assert math.isfinite(result.accountant_epsilon) and result.accountant_epsilon == result.claimed_epsilon
    assert (result.canaries, result.guesses, result.guesses_member, result.guesses_non_member) == (400, 100, 50, 50)
    assert 0 < result.canaries_included < 400 and result.dataset_size == 2000 + result.canaries_included
    assert result.epsilon_lower_bound <= result.epsilon_lower_bound_pure < result.accountant_epsilon
    assert not result.refutes_claim
    assert result.delta == pytest.approx(result.dataset_size ** -1.1)


def test_the_run_is_deterministic_under_a_fixed_key_and_seed(correct_run):
    assert audit_one_run(noise_multiplier=SIGMA, **RUN) == correct_run


# (b) broken runs ---------------------------------------------------------------------------------

def test_without_noise_the_bound_clearly_exceeds_the_correct_claim(correct_run):
    result = audit_one_run(noise_multiplier=0.0, **RUN)
    assert result.accountant_epsilon == math.inf  # the accountant is honest about it
    assert result.correct == result.guesses == 100
    assert result.epsilon_lower_bound > 2 * correct_run.accountant_epsilon
    # the same run claiming the correct run's sigma is refuted
    claimed = audit_one_run(noise_multiplier=0.0, claimed_noise_multiplier=SIGMA, **RUN)
    assert claimed.claimed_epsilon == pytest.approx(correct_run.accountant_epsilon)
    assert claimed.refutes_claim


def test_broken_clipping_is_caught(correct_run, monkeypatch):
    # Test-only breakage: the engine under-reports every per-example squared norm 10^4-fold, so
    # nothing is clipped and the canaries (raw norm 10 R) enter at ten times the sensitivity the
    # accountant assumes. Noise and accounting are untouched.
    real = dpscale.group_clipping.total_squared_norm
    monkeypatch.setattr(dpscale.group_clipping, "total_squared_norm", lambda *a, **k: real(*a, **k) / 1e4)
    result = audit_one_run(noise_multiplier=SIGMA, **RUN)
    assert result.accountant_epsilon == pytest.approx(correct_run.accountant_epsilon)
    assert result.refutes_claim
    assert result.epsilon_lower_bound > 2 * result.accountant_epsilon


# (c) the bound -----------------------------------------------------------------------------------

def _tail_by_hand(r, v, eps):
    p = math.exp(eps) / (1 + math.exp(eps))
    return sum(math.comb(r, k) * p**k * (1 - p) ** (r - k) for k in range(v, r + 1))


@pytest.mark.parametrize("r,v,eps", [(10, 7, 0.5), (100, 80, 1.3), (50, 50, 3.0), (20, 0, 1.0), (30, 12, 0.0)])
def test_binomial_tail_by_hand(r, v, eps):
    assert binomial_tail(r, v, eps) == pytest.approx(_tail_by_hand(r, v, eps), rel=1e-10)


@pytest.mark.parametrize("r", [5, 10, 100, 1000])
def test_all_guesses_correct_gives_the_randomised_response_edge(r):
    # P[Bin(r, p) >= r] = p^r = 0.05  =>  eps = ln(p / (1 - p)), p = 0.05^(1/r)
    p = 0.05 ** (1 / r)
    assert epsilon_lower_bound(r, r, r) == pytest.approx(math.log(p / (1 - p)), rel=1e-9)


def test_too_few_guesses_refute_nothing():
    # four right guesses out of four happen by chance with probability 1/16 > 5%
    assert epsilon_lower_bound(4, 4, 4) == 0.0 < epsilon_lower_bound(5, 5, 5)


def test_the_bound_grows_with_correct_guesses_and_vanishes_at_chance():
    bounds = [epsilon_lower_bound(200, 100, v) for v in range(101)]
    assert all(a <= b for a, b in itertools.pairwise(bounds))
    assert bounds[50] == bounds[55] == 0.0  # at or near chance, nothing is refuted
    assert bounds[100] > bounds[90] > bounds[70] > 0
    # the (eps, delta) bound is never above the pure one, and equals it at delta = 0
    for v in (70, 90, 100):
        assert epsilon_lower_bound(200, 100, v, delta=1e-4) <= bounds[v]
        assert epsilon_lower_bound(200, 100, v, delta=0.0) == bounds[v]
    # a higher confidence refutes less
    assert epsilon_lower_bound(200, 100, 90, confidence=0.99) < bounds[90]


def test_the_delta_term_by_hand():
    # beta + 2 m delta max_{1<=i<=v} P[v - i <= Bin(r, p) < v] / i
    m, r, v, eps, delta = 40, 20, 15, 0.7, 1e-3
    p = math.exp(eps) / (1 + math.exp(eps))
    pmf = [math.comb(r, k) * p**k * (1 - p) ** (r - k) for k in range(r + 1)]
    alpha = max(sum(pmf[v - i:v]) / i for i in range(1, v + 1))
    expected = sum(pmf[v:]) + 2 * m * delta * alpha
    assert audit_p_value(m, r, v, eps, delta) == pytest.approx(expected, rel=1e-10)
    assert audit_p_value(m, r, v, eps) == pytest.approx(sum(pmf[v:]), rel=1e-10)


def test_bad_counts_and_guesses_are_refused():
    with pytest.raises(ConfigError, match="correct <= guesses <= canaries"):
        audit_p_value(10, 20, 5, 1.0)
    with pytest.raises(ConfigError, match="add up to at most"):
        audit_one_run(noise_multiplier=1.0, canaries=10, guesses=6)


# CLI and the public face -------------------------------------------------------------------------

def test_cli_audit_json(capsys):
    args = ["audit", "--sigma", "0", "--claim-sigma", str(SIGMA), "--steps", "20", "--sample-rate", "0.2",
            "--canaries", "100", "--guesses", "20", "--examples", "300", "--json"]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["accountant_epsilon"] == math.inf and data["refutes_claim"] is True
    assert (data["canaries"], data["guesses"]) == (100, 40)


def test_exported_lazily():
    assert dpscale.audit_one_run is audit_one_run and "AuditResult" in dir(dpscale)
