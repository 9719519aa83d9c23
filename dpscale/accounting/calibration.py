"""Calibration: the least noise multiplier whose epsilon meets a target, found by a bracketed
search that builds as few PLDs as it can (they are slow far from the answer)."""

from __future__ import annotations

import decimal
import logging
import math
import numbers
from collections.abc import Callable

from dpscale.accounting.epsilon import epsilon_of
from dpscale.accounting.inputs import (
    check_delta,
    check_kinds,
    check_sample_rate,
    check_steps,
)
from dpscale.accounting.limits import PLDOutOfRange, least_pld_sigma
from dpscale.errors import PrivacyBudgetError

__all__ = [
    "DEFAULT_TOLERANCE",
    "MAX_NOISE_MULTIPLIER",
    "MIN_NOISE_MULTIPLIER",
    "NOISE_MULTIPLIER_DIGITS",
    "calibrate_noise_multiplier",
]

logger = logging.getLogger(__package__)  # "dpscale.accounting", whichever module of it logs

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
    check_kinds(accountant, sampling, dataset_size)
    check_delta(delta, dataset_size)
    check_sample_rate(sample_rate, sampling, dataset_size)
    check_steps(steps)
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

    reach: list[float] = []  # the least sigma a PLD of this run holds (limits.py), once looked up

    def past_pld_limit() -> float:
        """A sigma whose PLD would not fit: above the target if the least sigma that fits is (then
        the search moves to more noise), else the target is out of the PLD accountant's reach."""
        if not reach:
            least = least_pld_sigma(q, steps, delta)
            reach.extend([least, epsilon_of([(least, q, steps)], delta, "pld", sampling, dataset_size)])
        least, most = reach
        if most < target * (1.0 - tolerance):
            raise PrivacyBudgetError(
                f"{describe} is past what the PLD accountant computes in bounded memory: for this run it reaches "
                f"epsilon {most:.4g} at most (at sigma={least:.4g}), and an epsilon that large promises next to "
                "nothing. Give a target epsilon of at most that, or accountant='rdp' (--accountant rdp)."
            )
        return math.inf

    def eps_with(kind: str) -> Callable[[float], float]:
        def eps_at(sigma: float) -> float:
            try:
                value = epsilon_of([(sigma, q, steps)], delta, kind, sampling, dataset_size)
            except PLDOutOfRange:
                value = past_pld_limit()
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
