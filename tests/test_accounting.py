"""dpscale.accounting against values pinned from dp-accounting 0.6.0 and against the properties
any accountant must have (monotone, resumable, never above the target)."""

import json
import math

import dp_accounting
import pytest
from dp_accounting import dp_event

from dpscale.accounting import (
    PrivacyAccountant,
    calibrate_noise_multiplier,
    compute_epsilon,
    default_delta,
)
from dpscale.errors import ConfigError, PrivacyBudgetError

DELTA = 1e-5

# (sample rate, steps, sigma under PLD, sigma under RDP) for epsilon 8 at delta 1e-5.
PINNED = [
    (0.04, 2250, 1.347, 1.416),
    (256 / 60000, 14062, 0.656, 0.678),
    (1024 / 50000, 146, 0.562, 0.599),
]
CALIBRATIONS = [(q, steps, "pld", pld) for q, steps, pld, _ in PINNED] + [
    (q, steps, "rdp", rdp) for q, steps, _, rdp in PINNED
]


@pytest.mark.parametrize("sample_rate,steps,accountant,pinned", CALIBRATIONS)
def test_calibration_matches_pinned_sigma_and_meets_target(sample_rate, steps, accountant, pinned):
    sigma = calibrate_noise_multiplier(8.0, DELTA, sample_rate, steps, accountant=accountant)
    assert sigma == pytest.approx(pinned, abs=0.005)
    epsilon = compute_epsilon(sigma, sample_rate, steps, DELTA, accountant=accountant)
    assert epsilon <= 8.0
    assert epsilon >= 8.0 * (1 - 2e-3)


def test_calibrated_sigma_is_rounded_up_to_five_digits():
    sigma = calibrate_noise_multiplier(3.0, DELTA, 0.01, 1000, accountant="rdp")
    assert sigma == float(f"{sigma:.5g}")
    assert compute_epsilon(sigma, 0.01, 1000, DELTA, accountant="rdp") <= 3.0
    # A noise one rounding unit smaller would overshoot or sit at the edge of the tolerance.
    below = sigma - 10 ** (math.floor(math.log10(sigma)) - 4)
    assert compute_epsilon(below, 0.01, 1000, DELTA, accountant="rdp") > 3.0 * (1 - 2e-3)


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_epsilon_grows_with_steps_and_falls_with_sigma(accountant):
    kind = {"accountant": accountant}
    by_steps = [compute_epsilon(1.0, 0.01, t, DELTA, **kind) for t in (10, 100, 1000)]
    assert by_steps == sorted(by_steps) and len(set(by_steps)) == 3
    by_sigma = [compute_epsilon(s, 0.01, 500, DELTA, **kind) for s in (0.7, 1.0, 2.0)]
    assert by_sigma == sorted(by_sigma, reverse=True) and len(set(by_sigma)) == 3


def test_pld_is_tighter_than_rdp():
    pld = compute_epsilon(1.0, 0.01, 1000, DELTA, accountant="pld")
    rdp = compute_epsilon(1.0, 0.01, 1000, DELTA, accountant="rdp")
    assert pld < rdp


def test_pld_small_epsilon_is_refined_but_never_understated():
    # At the default grid (1e-3) this run reads 0.464; a grid of 1e-5 gives the reference.
    reference = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-5)
    reference.compose(dp_event.PoissonSampledDpEvent(0.01, dp_event.GaussianDpEvent(10.0)), 15000)
    expected = reference.get_epsilon(DELTA)
    epsilon = compute_epsilon(10.0, 0.01, 15000, DELTA)
    assert expected * (1 - 1e-4) <= epsilon <= expected * (1 + 1e-3)


def test_zero_steps_and_zero_noise():
    assert compute_epsilon(1.0, 0.01, 0, DELTA) == 0.0
    assert compute_epsilon(0.0, 0.01, 10, DELTA) == math.inf
    assert compute_epsilon(0.0, 0.01, 10, DELTA, accountant="rdp") == math.inf


def test_full_batch_is_the_plain_gaussian():
    # q = 1 composes T Gaussians of sigma, i.e. one of sigma / sqrt(T).
    one = compute_epsilon(10.0 / math.sqrt(100), 1.0, 1, DELTA, accountant="rdp")
    many = compute_epsilon(10.0, 1.0, 100, DELTA, accountant="rdp")
    assert many == pytest.approx(one, rel=1e-9)


# --- sampling without replacement -------------------------------------------------------------


def test_shuffle_needs_rdp_and_dataset_size():
    with pytest.raises(ConfigError, match='accountant="rdp"'):
        compute_epsilon(1.0, 0.01, 100, DELTA, sampling="shuffle", dataset_size=10000)
    with pytest.raises(ConfigError, match="dataset_size"):
        compute_epsilon(1.0, 0.01, 100, DELTA, accountant="rdp", sampling="shuffle")
    with pytest.raises(ConfigError, match='accountant="rdp"'):
        PrivacyAccountant(sampling="shuffle", dataset_size=10000)


def test_shuffle_under_rdp_is_accounted():
    kinds = {"accountant": "rdp", "sampling": "shuffle", "dataset_size": 10000}
    epsilon = compute_epsilon(1.0, 0.01, 100, DELTA, **kinds)
    # Replace-one neighbours and fixed-size batches: not the Poisson number, but finite.
    assert 0 < epsilon < math.inf
    assert epsilon != compute_epsilon(1.0, 0.01, 100, DELTA, accountant="rdp")
    with pytest.raises(PrivacyBudgetError, match="0 examples"):
        compute_epsilon(1.0, 1e-5, 100, DELTA, **kinds)


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 2.0, float("nan")])
def test_delta_outside_unit_interval_is_refused(delta):
    with pytest.raises(PrivacyBudgetError, match="delta"):
        compute_epsilon(1.0, 0.01, 10, delta)


def test_delta_at_or_above_one_over_n_is_refused():
    with pytest.raises(PrivacyBudgetError, match="1/dataset_size"):
        compute_epsilon(1.0, 0.01, 10, 1e-3, dataset_size=1000)
    with pytest.raises(PrivacyBudgetError, match="default_delta"):
        calibrate_noise_multiplier(8.0, 1e-4, 0.01, 10, dataset_size=10000)
    accountant = PrivacyAccountant(dataset_size=1000)
    accountant.step(1.0, 0.01)
    with pytest.raises(PrivacyBudgetError):
        accountant.epsilon(1e-3)
    assert compute_epsilon(1.0, 0.01, 10, 0.99e-3, dataset_size=1000) > 0


@pytest.mark.parametrize("sample_rate", [0.0, -0.1, 1.5, float("nan")])
def test_sample_rate_outside_zero_one_is_refused(sample_rate):
    with pytest.raises(PrivacyBudgetError, match="sample_rate"):
        compute_epsilon(1.0, sample_rate, 10, DELTA)


def test_bad_steps_noise_and_names_are_refused():
    with pytest.raises(PrivacyBudgetError, match="steps"):
        compute_epsilon(1.0, 0.01, -1, DELTA)
    with pytest.raises(PrivacyBudgetError, match="steps"):
        compute_epsilon(1.0, 0.01, 2.5, DELTA)
    with pytest.raises(PrivacyBudgetError, match="noise_multiplier"):
        compute_epsilon(-1.0, 0.01, 10, DELTA)
    with pytest.raises(ConfigError, match="accountant"):
        compute_epsilon(1.0, 0.01, 10, DELTA, accountant="moments")
    with pytest.raises(ConfigError, match="sampling"):
        compute_epsilon(1.0, 0.01, 10, DELTA, sampling="uniform")


@pytest.mark.parametrize("target", [0.0, -1.0, float("inf")])
def test_non_positive_target_epsilon_is_refused(target):
    with pytest.raises(PrivacyBudgetError, match="target_epsilon"):
        calibrate_noise_multiplier(target, DELTA, 0.01, 100)


def test_unreachable_epsilon_is_refused_with_what_to_change():
    # Full-batch steps: even sigma = 1e4 leaves epsilon near 0.034 after 15000 steps.
    with pytest.raises(PrivacyBudgetError, match="larger epsilon.*fewer steps.*more data"):
        calibrate_noise_multiplier(0.01, DELTA, 1.0, 15000)


def test_default_delta_is_below_one_over_n():
    for n in (2, 1000, 60000, 10**9):
        assert default_delta(n) == pytest.approx(n**-1.1)
        assert default_delta(n) < 1.0 / n
    assert compute_epsilon(1.0, 0.01, 10, default_delta(60000), dataset_size=60000) > 0
    with pytest.raises(PrivacyBudgetError):
        default_delta(1)


# --- PrivacyAccountant -------------------------------------------------------------------------


def _schedule():
    """A run whose noise and sample rate change: (sigma, q, count) per call."""
    return [(1.0, 0.01, 1)] * 30 + [(1.0, 0.01, 20), (1.5, 0.02, 1), (1.5, 0.02, 9)] + [
        (0.9, 0.01, 1)
    ] * 40


def test_history_merges_consecutive_identical_steps():
    accountant = PrivacyAccountant()
    for sigma, q, count in _schedule():
        accountant.step(sigma, q, count)
    accountant.step(0.9, 0.01, count=0)
    assert accountant.segments == [(1.0, 0.01, 50), (1.5, 0.02, 10), (0.9, 0.01, 40)]
    assert accountant.steps == 100


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_single_segment_epsilon_equals_compute_epsilon(kind):
    accountant = PrivacyAccountant(accountant=kind)
    for _ in range(50):
        accountant.step(1.1, 0.02)
    assert accountant.epsilon(DELTA) == compute_epsilon(1.1, 0.02, 50, DELTA, accountant=kind)


def test_composition_of_segments_lies_between_its_extremes():
    accountant = PrivacyAccountant(accountant="rdp")
    accountant.step(1.0, 0.01, 100)
    accountant.step(2.0, 0.01, 100)
    mixed = accountant.epsilon(DELTA)
    assert compute_epsilon(2.0, 0.01, 200, DELTA, accountant="rdp") < mixed
    assert mixed < compute_epsilon(1.0, 0.01, 200, DELTA, accountant="rdp")


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_resumed_accountant_equals_uninterrupted(kind):
    schedule = _schedule()
    whole = PrivacyAccountant(accountant=kind)
    for sigma, q, count in schedule:
        whole.step(sigma, q, count)

    first = PrivacyAccountant(accountant=kind)
    # Interrupted in the middle of the last segment: the resumed run must merge into it.
    for sigma, q, count in schedule[:40]:
        first.step(sigma, q, count)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = PrivacyAccountant(accountant=kind)
    resumed.load_state_dict(state)
    for sigma, q, count in schedule[40:]:
        resumed.step(sigma, q, count)

    assert resumed.segments == whole.segments
    assert resumed.epsilon(DELTA) == whole.epsilon(DELTA)


def test_state_dict_round_trips_through_torch_weights_only(tmp_path):
    torch = pytest.importorskip("torch")
    accountant = PrivacyAccountant(accountant="rdp", dataset_size=5000)
    for sigma, q, count in _schedule():
        accountant.step(sigma, q, count)
    path = tmp_path / "privacy.pt"
    torch.save(accountant.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert state == accountant.state_dict()
    restored = PrivacyAccountant.from_state_dict(state)
    kinds = (restored.accountant, restored.sampling, restored.dataset_size)
    assert kinds == ("rdp", "poisson", 5000)
    assert restored.epsilon(DELTA) == accountant.epsilon(DELTA)


def test_loading_a_state_of_another_kind_is_refused():
    state = PrivacyAccountant(accountant="rdp").state_dict()
    with pytest.raises(ConfigError, match="from_state_dict"):
        PrivacyAccountant(accountant="pld").load_state_dict(state)
    with pytest.raises(ConfigError):
        PrivacyAccountant().load_state_dict({"segments": []})


def test_empty_batches_still_count():
    # The accountant sees (sigma, q) per step, never the batch; an empty one is still a step.
    accountant = PrivacyAccountant(accountant="rdp")
    assert accountant.epsilon(DELTA) == 0.0
    accountant.step(1.0, 0.001)
    assert accountant.steps == 1 and accountant.epsilon(DELTA) > 0


def test_epsilon_curve_rises_to_the_final_epsilon():
    accountant = PrivacyAccountant(accountant="rdp")
    for sigma, q, count in _schedule():
        accountant.step(sigma, q, count)
    curve = accountant.epsilon_curve(DELTA, points=7)
    assert 1 <= len(curve) <= 7
    steps = [step for step, _ in curve]
    epsilons = [epsilon for _, epsilon in curve]
    assert steps == sorted(set(steps)) and steps[-1] == 100
    assert epsilons == sorted(epsilons)
    assert epsilons[-1] == accountant.epsilon(DELTA)
    assert PrivacyAccountant().epsilon_curve(DELTA) == []


def test_epsilon_curve_pld_and_more_points_than_steps():
    accountant = PrivacyAccountant()
    accountant.step(1.0, 0.05, 3)
    curve = accountant.epsilon_curve(DELTA, points=50)
    assert [step for step, _ in curve] == [1, 2, 3]
    assert curve[-1][1] == accountant.epsilon(DELTA)
