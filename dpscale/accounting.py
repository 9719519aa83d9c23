"""Epsilon and noise multiplier of DP-SGD, through Google's `dp_accounting` library.

The privacy loss of the subsampled Gaussian mechanism is never written here: every number comes
from `dp_accounting`'s own events and accountants, so a fix upstream reaches us by upgrading. This
module only decides which event describes a run, which accountant composes it, how finely, and
which inputs make no sense.

Two accountants:

- "pld" (default): privacy loss distributions, the tightest numbers dp_accounting gives. Every
  PLD here is built with pessimistic rounding, so whatever the discretization interval the
  epsilon is an upper bound on the true one; a finer interval only tightens it (see
  `_pld_epsilon`).
- "rdp": Renyi DP, looser (an epsilon of 8 under PLD reads about 8.6 to 9.5 under RDP) but the
  only one of the two that knows fixed-size batches drawn without replacement.

Two ways a batch is drawn:

- "poisson": each example joins each step with probability q (the DESIGN contract);
  `PoissonSampledDpEvent`, add-or-remove-one neighbours.
- "shuffle": each step draws a batch of exactly round(q * N) examples without replacement,
  independently of the other steps; `SampledWithoutReplacementDpEvent`, which dp_accounting 0.6
  accounts only under RDP and only for replace-one neighbours, so that epsilon protects against
  swapping one example for another (a different, not directly comparable, guarantee from the
  Poisson one). A loader that shuffles once per epoch and walks through the permutation is a
  different mechanism again: this accounting does not cover it (Chua et al., "How Private are
  DP-SGD Implementations?", ICML 2024, show its real loss can be much larger).
"""

from __future__ import annotations

import contextlib
import decimal
import logging
import math
import numbers
from collections.abc import Callable, Sequence

import dp_accounting
from dp_accounting import dp_event

from dpscale.errors import ConfigError, PrivacyBudgetError

logger = logging.getLogger(__name__)

ACCOUNTANTS = ("pld", "rdp")
SAMPLINGS = ("poisson", "shuffle")

# PLD discretization. Every PLD here is pessimistic, so any interval gives an upper bound; the
# interval only sets how far above the true epsilon it lands and what it costs (about linear in
# 1 / interval). At 1e-3 a 15000-step run costs about 0.1 s and overstates an epsilon near 8 by
# about 4e-4 relative, but the rounding error grows with the number of steps and about as the
# square of the interval, and weighs more on small epsilons (15000 steps at q = 0.01, sigma = 10
# read 0.464 for 0.427). So each epsilon is also computed at twice the interval, the error of the
# first pass estimated from the two (quadratic in the interval), and a finer pass run only where
# that error exceeds PLD_RELATIVE_ACCURACY; its interval never goes below 1/20 of the base, which
# bounds its cost to 20 base passes.
PLD_VALUE_DISCRETIZATION = 1e-3
PLD_RELATIVE_ACCURACY = 5e-4
PLD_FINEST_DISCRETIZATION = PLD_VALUE_DISCRETIZATION / 20

# The noise multipliers calibration searches. Above 1e4 the noise drowns any gradient; below 0.1
# epsilon is in the thousands for any realistic run, and a PLD there is slow to build.
MAX_NOISE_MULTIPLIER = 1e4
MIN_NOISE_MULTIPLIER = 0.1
DEFAULT_TOLERANCE = 1e-3
# Calibrated noise multipliers are rounded up to this many significant digits.
NOISE_MULTIPLIER_DIGITS = 5
# PLD calibration starts from the RDP answer (cheap at any sigma, and within about 10% of the
# PLD one), searched to this loose tolerance, and widens the bracket from there by 10%: PLDs
# of a sigma far below the answer (epsilon in the hundreds) are slow to build.
_GUIDE_TOLERANCE = 5e-2
_PLD_BRACKET_FACTOR = 1.1

STATE_VERSION = 1

_NeighborRel = dp_accounting.privacy_accountant.NeighboringRelation

# One segment of a run's history: `count` consecutive steps at (noise_multiplier, sample_rate).
Segment = tuple[float, float, int]


# --------------------------------------------------------------------------------------------
# Validation: every message says what to change.


def _check_kinds(accountant: str, sampling: str, dataset_size: int | None) -> None:
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"accountant={accountant!r} is unknown; use one of {ACCOUNTANTS}.")
    if sampling not in SAMPLINGS:
        raise ConfigError(f"sampling={sampling!r} is unknown; use one of {SAMPLINGS}.")
    if dataset_size is not None and (
        not isinstance(dataset_size, numbers.Integral)
        or isinstance(dataset_size, bool)
        or dataset_size < 1
    ):
        raise ConfigError(
            f"dataset_size={dataset_size!r} must be a positive whole number of examples "
            "(or None when it is not known)."
        )
    if sampling == "shuffle":
        if dataset_size is None:
            raise ConfigError(
                'sampling="shuffle" accounts batches of round(sample_rate * dataset_size) '
                "examples; pass dataset_size."
            )
        if accountant != "rdp":
            raise ConfigError(
                'sampling="shuffle" (fixed-size batches drawn without replacement) is not '
                'supported by dp_accounting\'s PLD accountant; use accountant="rdp", or '
                'sampling="poisson" to keep PLD.'
            )


def _check_delta(delta: float, dataset_size: int | None) -> None:
    if not isinstance(delta, numbers.Real) or not 0.0 < delta < 1.0:
        raise PrivacyBudgetError(
            f"delta={delta!r} must lie strictly between 0 and 1; use a delta below "
            "1/dataset_size, e.g. dpscale.accounting.default_delta(dataset_size)."
        )
    if dataset_size is not None and delta >= 1.0 / dataset_size:
        raise PrivacyBudgetError(
            f"delta={delta!r} is not below 1/dataset_size = {1.0 / dataset_size:.3g}: with a "
            "delta that large a mechanism may publish one example outright. Use a smaller "
            f"delta, e.g. default_delta({dataset_size}) = {default_delta(dataset_size):.3g}."
        )


def _check_sample_rate(sample_rate: float, sampling: str, dataset_size: int | None) -> None:
    if not isinstance(sample_rate, numbers.Real) or not 0.0 < sample_rate <= 1.0:
        raise PrivacyBudgetError(
            f"sample_rate={sample_rate!r} must lie in (0, 1]: it is the chance that one "
            "example joins a step's batch (expected batch size / dataset size)."
        )
    if sampling == "shuffle" and dataset_size is not None:
        if round(sample_rate * dataset_size) < 1:
            raise PrivacyBudgetError(
                f"sample_rate={sample_rate!r} with dataset_size={dataset_size} gives batches of "
                "0 examples; raise the sample rate to at least 1/dataset_size."
            )


def _check_noise_multiplier(noise_multiplier: float) -> None:
    if not isinstance(noise_multiplier, numbers.Real) or not (
        0.0 <= noise_multiplier < math.inf
    ):
        raise PrivacyBudgetError(
            f"noise_multiplier={noise_multiplier!r} must be a finite number >= 0 (the noise "
            "standard deviation over the clipping norm); 0 means no privacy."
        )


def _check_steps(steps: int, name: str = "steps") -> None:
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 0:
        raise PrivacyBudgetError(f"{name}={steps!r} must be a whole number >= 0.")


# --------------------------------------------------------------------------------------------
# Events and accountants: the only place dp_accounting is spoken to.


def _event(
    noise_multiplier: float, sample_rate: float, sampling: str, dataset_size: int | None
) -> dp_event.DpEvent:
    """The dp_accounting event of one step."""
    if noise_multiplier == 0:
        # The library's own name for a release with no noise: epsilon is infinite.
        return dp_event.NonPrivateDpEvent()
    gaussian = dp_event.GaussianDpEvent(noise_multiplier)
    if sampling == "shuffle":
        assert dataset_size is not None  # _check_kinds
        return dp_event.SampledWithoutReplacementDpEvent(
            dataset_size, int(round(sample_rate * dataset_size)), gaussian
        )
    if sample_rate == 1.0:
        # Full batches: the plain Gaussian, which the PLD accountant composes exactly
        # (sigma / sqrt(count)) instead of discretizing each step.
        return gaussian
    return dp_event.PoissonSampledDpEvent(sample_rate, gaussian)


def _neighboring_relation(sampling: str) -> _NeighborRel:
    # dp_accounting accounts sampling without replacement only for replace-one neighbours.
    return _NeighborRel.REPLACE_ONE if sampling == "shuffle" else _NeighborRel.ADD_OR_REMOVE_ONE


def _composed_accountant(
    segments: Sequence[Segment],
    accountant: str,
    sampling: str,
    dataset_size: int | None,
    value_discretization_interval: float = PLD_VALUE_DISCRETIZATION,
) -> dp_accounting.PrivacyAccountant:
    relation = _neighboring_relation(sampling)
    if accountant == "pld":
        acc: dp_accounting.PrivacyAccountant = dp_accounting.pld.PLDAccountant(
            neighboring_relation=relation,
            value_discretization_interval=value_discretization_interval,
        )
    else:
        acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
    for noise_multiplier, sample_rate, count in segments:
        if count == 0:
            continue
        event = _event(noise_multiplier, sample_rate, sampling, dataset_size)
        if not acc.supports(event):
            raise ConfigError(
                f"dp_accounting's {accountant!r} accountant cannot compose {event}; use "
                'accountant="rdp" or sampling="poisson".'
            )
        acc.compose(event, count)
    return acc


def _pld_epsilon(
    segments: Sequence[Segment], delta: float, sampling: str, dataset_size: int | None
) -> float:
    """PLD epsilon, refined where the base grid is too coarse (see PLD_VALUE_DISCRETIZATION).

    Every pass is a pessimistic upper bound, so the smallest is one too.
    """

    def at(interval: float) -> float:
        acc = _composed_accountant(segments, "pld", sampling, dataset_size, interval)
        return float(acc.get_epsilon(delta))

    base = PLD_VALUE_DISCRETIZATION
    epsilon = at(base)
    if not math.isfinite(epsilon) or epsilon == 0.0:
        return epsilon
    # Rounding error ~ C * interval**2, so at(2 * base) - at(base) ~ 3 * error(base).
    error = abs(at(2.0 * base) - epsilon) / 3.0
    if error <= PLD_RELATIVE_ACCURACY * epsilon:
        return epsilon
    interval = max(
        base * math.sqrt(PLD_RELATIVE_ACCURACY * epsilon / error), PLD_FINEST_DISCRETIZATION
    )
    return min(epsilon, at(interval))


def _epsilon(
    segments: Sequence[Segment],
    delta: float,
    accountant: str,
    sampling: str,
    dataset_size: int | None,
) -> float:
    """Epsilon of already validated segments."""
    if not any(count for _, _, count in segments):
        return 0.0
    with _absl_warnings_as_debug():
        if accountant == "pld":
            return _pld_epsilon(segments, delta, sampling, dataset_size)
        acc = _composed_accountant(segments, accountant, sampling, dataset_size)
        return float(acc.get_epsilon(delta))


class _ToDebug(logging.Filter):
    """Drops a record from absl's logger and logs it again at DEBUG on ours."""

    def filter(self, record: logging.LogRecord) -> bool:
        logger.debug("dp_accounting: %s", record.getMessage())
        return False


@contextlib.contextmanager
def _absl_warnings_as_debug():
    """dp_accounting warns through absl for every extreme order or sigma the calibration search
    visits ("_compute_log_a_frac failed to converge", "Negative Renyi divergence"): expected there,
    and harmless (the order is excluded, the bound stays valid), but they flood a user's output.
    For the duration of our calls only, they go to dpscale's logger at DEBUG; the filter is removed
    afterwards, so absl's logger is left as it was found."""
    absl_logger = logging.getLogger("absl")
    quiet = _ToDebug()
    absl_logger.addFilter(quiet)
    try:
        yield
    finally:
        absl_logger.removeFilter(quiet)


# --------------------------------------------------------------------------------------------
# Public functions.


def steps_for_epochs(epochs: float, sample_rate: float) -> int:
    """Steps that make ``epochs`` passes at rate q: ceil(epochs / q), at least 1. The quotient is
    rounded to 9 digits first, so that 3 epochs at q = 0.04 are 75 steps, not 76 from float noise.
    The one conversion of epochs to steps in dpscale (the engine, the CLI and the loaders use it)."""
    if not (isinstance(epochs, numbers.Real) and 0 < epochs < math.inf):
        raise ConfigError(f"epochs={epochs!r} must be a finite number > 0.")
    if not (isinstance(sample_rate, numbers.Real) and 0 < sample_rate <= 1):
        raise ConfigError(f"sample_rate={sample_rate!r} must lie in (0, 1].")
    return max(1, math.ceil(round(epochs / sample_rate, 9)))


def default_delta(dataset_size: int) -> float:
    """A delta for a dataset of `dataset_size` examples: 1 / N**1.1.

    Delta is the chance that the guarantee fails outright, and a mechanism that publishes one
    random example in full has delta = 1/N, so delta must sit well below 1/N. 1/N**1.1 shrinks
    faster than 1/N as the data grows (the o(1/N) the DP literature asks for), where 0.1/N stays
    a fixed fraction of it; for N = 60000 it is 5.5e-6, near the customary 1e-5.
    """
    if (
        not isinstance(dataset_size, numbers.Integral)
        or isinstance(dataset_size, bool)
        or dataset_size < 2
    ):
        raise PrivacyBudgetError(
            f"dataset_size={dataset_size!r}: a meaningful delta needs a whole number of at "
            "least 2 examples."
        )
    return float(dataset_size) ** -1.1


def compute_epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "pld",
    sampling: str = "poisson",
    dataset_size: int | None = None,
) -> float:
    """Epsilon at `delta` after `steps` steps of DP-SGD with noise `noise_multiplier` (sigma:
    noise std over the clipping norm) and sample rate `sample_rate` (q).

    `dataset_size`, when given, also refuses a delta of 1/N or more; it is required for
    sampling="shuffle". A noise multiplier of 0 gives infinity; 0 steps give 0.
    """
    _check_kinds(accountant, sampling, dataset_size)
    _check_delta(delta, dataset_size)
    _check_sample_rate(sample_rate, sampling, dataset_size)
    _check_noise_multiplier(noise_multiplier)
    _check_steps(steps)
    return _epsilon(
        [(float(noise_multiplier), float(sample_rate), int(steps))],
        float(delta),
        accountant,
        sampling,
        dataset_size,
    )


def _round_up(value: float, digits: int) -> float:
    """`value` rounded up to `digits` significant digits; never below `value`."""
    exponent = math.floor(math.log10(value)) - digits + 1
    quantum = decimal.Decimal(1).scaleb(exponent)
    rounded = decimal.Decimal(value).quantize(quantum, rounding=decimal.ROUND_CEILING)
    # float() picks the float nearest the decimal, and `value` itself is a float no greater than
    # it, so the result cannot fall below `value`.
    return float(rounded)


def _split(lo: float, eps_lo: float, hi: float, eps_hi: float, aim: float) -> float:
    """Where log(epsilon), linear in log(sigma) between the bracket's ends, meets `aim`; kept
    inside the middle 80% of the bracket."""
    if lo <= 0.0 or not math.isfinite(eps_lo) or eps_hi <= 0.0:
        return 0.5 * (lo + hi)
    fraction = (math.log(eps_lo) - math.log(aim)) / (math.log(eps_lo) - math.log(eps_hi))
    fraction = min(max(fraction, 0.1), 0.9)
    return math.exp(math.log(lo) + fraction * (math.log(hi) - math.log(lo)))


class _TargetTooLarge(PrivacyBudgetError):
    """The target epsilon is met already at the least noise calibrated."""


def _search(
    eps_at: Callable[[float], float],
    target: float,
    start: float,
    factor: float,
    tolerance: float,
    describe: str,
) -> float:
    """Smallest sigma with eps_at(sigma) <= target, to `tolerance` relative on epsilon.

    The bracket [lo, hi], eps_at(lo) > target >= eps_at(hi), grows from `start` by `factor`
    (up to MAX_NOISE_MULTIPLIER, down to MIN_NOISE_MULTIPLIER), then shrinks by bisection until
    eps_at(hi) is within `tolerance` below the target. The split point is interpolated (log
    epsilon is nearly linear in log sigma, so it often lands in the window at once) and every
    split that misses the window is followed by a plain midpoint, so the bracket at least halves
    every two evaluations whatever the curve. Returns `hi`.
    """
    lo, eps_lo, hi = 0.0, math.inf, start
    eps_hi = eps_at(hi)
    if eps_hi > target:
        while eps_hi > target:
            if hi >= MAX_NOISE_MULTIPLIER:
                raise PrivacyBudgetError(
                    f"No noise multiplier up to {MAX_NOISE_MULTIPLIER:g} reaches {describe} (at "
                    f"sigma={MAX_NOISE_MULTIPLIER:g} epsilon is still {eps_hi:.4g}). Allow a "
                    "larger epsilon, train fewer steps, use a smaller sample rate (smaller "
                    "batches), or use more data."
                )
            lo, eps_lo = hi, eps_hi
            hi = min(factor * hi, MAX_NOISE_MULTIPLIER)
            eps_hi = eps_at(hi)
    else:
        while True:
            candidate = hi / factor
            if candidate < MIN_NOISE_MULTIPLIER:
                raise _TargetTooLarge(
                    f"{describe} is met already at sigma={hi:g} (epsilon there {eps_hi:.4g}), near the "
                    f"least noise dpscale calibrates (sigma={MIN_NOISE_MULTIPLIER:g}): a target this "
                    "large promises next to nothing, and the step budget it allows could not be "
                    "computed in useful time. Give a smaller target_epsilon, or give "
                    "noise_multiplier directly (the epsilon it costs is reported)."
                )
            eps_candidate = eps_at(candidate)
            if eps_candidate > target:
                lo, eps_lo = candidate, eps_candidate
                break
            hi, eps_hi = candidate, eps_candidate
    floor = target * (1.0 - tolerance)
    resolution = 10.0 ** -(NOISE_MULTIPLIER_DIGITS + 1)
    interpolate = True
    while eps_hi < floor and hi - lo > hi * resolution:
        if interpolate:
            mid = _split(lo, eps_lo, hi, eps_hi, target * (1.0 - 0.5 * tolerance))
        else:
            mid = 0.5 * (lo + hi)
        eps_mid = eps_at(mid)
        if eps_mid <= target:
            hi, eps_hi = mid, eps_mid
        else:
            lo, eps_lo = mid, eps_mid
        interpolate = not interpolate or floor <= eps_mid <= target
    return hi


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "pld",
    sampling: str = "poisson",
    dataset_size: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> float:
    """The smallest noise multiplier whose epsilon at `delta` is at most `target_epsilon`.

    Bisection on sigma (epsilon falls as sigma grows; split points interpolated, see `_search`)
    inside a bracket that grows until it holds the answer: from 1 by doubling under RDP; under
    PLD from the RDP answer by steps of 10%, so that no slow PLD is built far from the answer.
    The search stops once the epsilon of the bracket's upper end is within `tolerance`
    (relative) below the target, and returns that end rounded up to NOISE_MULTIPLIER_DIGITS
    significant digits: `compute_epsilon` at the result never exceeds the target.

    Raises PrivacyBudgetError when no sigma up to MAX_NOISE_MULTIPLIER reaches the target, or when
    the target is met already near MIN_NOISE_MULTIPLIER (a vacuous epsilon).
    """
    _check_kinds(accountant, sampling, dataset_size)
    _check_delta(delta, dataset_size)
    _check_sample_rate(sample_rate, sampling, dataset_size)
    _check_steps(steps)
    if steps < 1:
        raise PrivacyBudgetError("steps=0: there is nothing to calibrate; give steps >= 1.")
    if not isinstance(target_epsilon, numbers.Real) or not 0.0 < target_epsilon < math.inf:
        raise PrivacyBudgetError(
            f"target_epsilon={target_epsilon!r} must be a finite number > 0 (epsilon 0 would "
            "need infinite noise)."
        )
    if not isinstance(tolerance, numbers.Real) or not 0.0 < tolerance < 1.0:
        raise PrivacyBudgetError(
            f"tolerance={tolerance!r} must lie in (0, 1); it is relative to the target epsilon."
        )
    q, delta, target, steps = float(sample_rate), float(delta), float(target_epsilon), int(steps)
    describe = f"epsilon={target:g} at delta={delta:g} with sample_rate={q:g} over {steps} steps"

    def eps_with(kind: str) -> Callable[[float], float]:
        def eps_at(sigma: float) -> float:
            value = _epsilon([(sigma, q, steps)], delta, kind, sampling, dataset_size)
            logger.debug("calibration (%s): sigma=%.6g -> epsilon=%.6g", kind, sigma, value)
            return value

        return eps_at

    guide_tolerance = max(tolerance, _GUIDE_TOLERANCE) if accountant == "pld" else tolerance
    try:
        guess = _search(eps_with("rdp"), target, 1.0, 2.0, guide_tolerance, describe)
    except _TargetTooLarge as error:  # RDP bounds PLD from above: PLD meets it there too
        raise PrivacyBudgetError(str(error)) from None
    except PrivacyBudgetError:
        if accountant == "rdp":
            raise
        guess = MAX_NOISE_MULTIPLIER  # PLD is tighter: it may still reach what RDP cannot.
    eps_at = eps_with(accountant)
    if accountant == "rdp":
        hi = guess
    else:
        try:
            hi = _search(eps_at, target, guess, _PLD_BRACKET_FACTOR, tolerance, describe)
        except _TargetTooLarge as error:
            raise PrivacyBudgetError(str(error)) from None

    rounded = _round_up(hi, NOISE_MULTIPLIER_DIGITS)
    # Epsilon falls with sigma, but a discretized PLD may wobble by a grid step; `hi` itself was
    # checked, so fall back to it rather than ever return a sigma above the budget.
    if rounded != hi and eps_at(rounded) > target:
        return hi
    return rounded


# --------------------------------------------------------------------------------------------
# The run's privacy state.


class PrivacyAccountant:
    """The privacy history of one training run, and its epsilon.

    The history is a list of (noise_multiplier, sample_rate, count) segments, consecutive steps
    with identical parameters merged: a run at fixed settings is one segment whatever its
    length, which keeps checkpoints small and lets dp_accounting compose `count` steps at once.

    A step counts when it is taken, whatever its batch held: under Poisson sampling a step whose
    batch came out empty still released a noised update, and the accountant sees only
    (sigma, q), never the batch.
    """

    def __init__(
        self,
        accountant: str = "pld",
        sampling: str = "poisson",
        dataset_size: int | None = None,
    ) -> None:
        _check_kinds(accountant, sampling, dataset_size)
        self.accountant = accountant
        self.sampling = sampling
        self.dataset_size = dataset_size
        self._segments: list[list] = []

    def __repr__(self) -> str:
        return (
            f"PrivacyAccountant(accountant={self.accountant!r}, sampling={self.sampling!r}, "
            f"dataset_size={self.dataset_size!r}, steps={self.steps})"
        )

    def step(self, noise_multiplier: float, sample_rate: float, count: int = 1) -> None:
        """Record `count` steps at (noise_multiplier, sample_rate)."""
        _check_noise_multiplier(noise_multiplier)
        _check_sample_rate(sample_rate, self.sampling, self.dataset_size)
        _check_steps(count, "count")
        if count == 0:
            return
        sigma, q = float(noise_multiplier), float(sample_rate)
        if self._segments and self._segments[-1][0] == sigma and self._segments[-1][1] == q:
            self._segments[-1][2] += int(count)
        else:
            self._segments.append([sigma, q, int(count)])

    @property
    def steps(self) -> int:
        """Steps recorded so far."""
        return sum(count for _, _, count in self._segments)

    @property
    def segments(self) -> list[Segment]:
        """A copy of the history: (noise_multiplier, sample_rate, count), merged."""
        return [(sigma, q, count) for sigma, q, count in self._segments]

    def epsilon(self, delta: float) -> float:
        """Epsilon at `delta` of all steps recorded so far."""
        _check_delta(delta, self.dataset_size)
        return _epsilon(
            self.segments, float(delta), self.accountant, self.sampling, self.dataset_size
        )

    def epsilon_curve(self, delta: float, points: int = 50) -> list[tuple[int, float]]:
        """(step, epsilon) at up to `points` step counts spread evenly up to the last step.

        Each point composes the history from scratch, so the last one equals `epsilon(delta)`;
        it costs one epsilon evaluation per point.
        """
        _check_delta(delta, self.dataset_size)
        if not isinstance(points, numbers.Integral) or isinstance(points, bool) or points < 1:
            raise ConfigError(f"points={points!r} must be a whole number >= 1.")
        total = self.steps
        if total == 0:
            return []
        count = min(points, total)
        marks = sorted({math.ceil(total * (i + 1) / count) for i in range(count)})
        return [(mark, self._epsilon_after(mark, float(delta))) for mark in marks]

    def _epsilon_after(self, steps: int, delta: float) -> float:
        prefix: list[Segment] = []
        remaining = steps
        for sigma, q, count in self._segments:
            if remaining <= 0:
                break
            prefix.append((sigma, q, min(count, remaining)))
            remaining -= count
        return _epsilon(prefix, delta, self.accountant, self.sampling, self.dataset_size)

    def state_dict(self) -> dict:
        """The history as plain Python values (JSON, and torch.load(weights_only=True))."""
        return {
            "version": STATE_VERSION,
            "accountant": self.accountant,
            "sampling": self.sampling,
            "dataset_size": self.dataset_size,
            "segments": [list(segment) for segment in self._segments],
        }

    def load_state_dict(self, state: dict) -> None:
        """Replace the history with `state`'s; the kinds must match this accountant's, since
        resuming under another accountant or sampling would change what epsilon means."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ConfigError(
                "This is not a PrivacyAccountant state of version "
                f"{STATE_VERSION}; pass what PrivacyAccountant.state_dict() returned."
            )
        recorded = (state.get("accountant"), state.get("sampling"), state.get("dataset_size"))
        ours = (self.accountant, self.sampling, self.dataset_size)
        if recorded != ours:
            raise ConfigError(
                f"The state was recorded with (accountant, sampling, dataset_size)={recorded}, "
                f"this accountant uses {ours}; build it with the recorded settings, or use "
                "PrivacyAccountant.from_state_dict(state)."
            )
        segments = []
        for segment in state.get("segments", ()):
            if not isinstance(segment, (list, tuple)) or len(segment) != 3:
                raise ConfigError(
                    f"Segment {segment!r} is not [noise_multiplier, sample_rate, count]; the "
                    "state is corrupt."
                )
            sigma, q, count = segment
            _check_noise_multiplier(sigma)
            _check_sample_rate(q, self.sampling, self.dataset_size)
            _check_steps(count, "count")
            segments.append([float(sigma), float(q), int(count)])
        self._segments = segments

    @classmethod
    def from_state_dict(cls, state: dict) -> PrivacyAccountant:
        """A new accountant with the settings and history recorded in `state`."""
        if not isinstance(state, dict):
            raise ConfigError("Pass the dict that PrivacyAccountant.state_dict() returned.")
        new = cls(
            accountant=state.get("accountant", "pld"),
            sampling=state.get("sampling", "poisson"),
            dataset_size=state.get("dataset_size"),
        )
        new.load_state_dict(state)
        return new
