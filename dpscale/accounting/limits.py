"""What the accountants can compute in bounded time and memory, and the refusal that says so.

dp_accounting's PLD accountant discretizes the privacy loss on a grid of
``PLD_VALUE_DISCRETIZATION``. One Gaussian step spans about 10 / sigma + 1 / (2 sigma^2) in loss,
so sigma = 1e-3 needs 5e8 grid points (3.8 GiB) and sigma = 1e-6 needs 5e14 (numpy's "Unable to
allocate 3.55 PiB"); a composition spans about its epsilon. Neither is a run anyone means: such
epsilons (hundreds and more) promise nothing. So before a PLD is built, a coarse RDP bound of the
same history (``_COARSE_ORDERS``, about 0.03 s) is compared with ``PLD_MAX_EPSILON``: a PLD is
built only below it. Measured at the limit on 2 loaded cores, over q from 0.001 to 1 and 1 to
10000 steps: at most 13 s and 260 MB for one epsilon. Beyond it the refusal names the least noise
multiplier that works for the run and the RDP accountant, which bounds any noise multiplier in
``NOISE_MULTIPLIER_RANGE``.

Both accountants: a noise multiplier outside ``NOISE_MULTIPLIER_RANGE`` (other than 0, no noise,
whose epsilon is infinite) is refused; dp_accounting overflows at 1e300 and divides by zero at
1e-300, and no run has a sigma there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import dp_accounting
from dp_accounting import dp_event

from dpscale.errors import PrivacyBudgetError

__all__ = ["NOISE_MULTIPLIER_RANGE", "PLD_MAX_EPSILON", "PLDOutOfRange", "check_pld_computable", "least_pld_sigma"]

NOISE_MULTIPLIER_RANGE = (1e-8, 1e8)
PLD_MAX_EPSILON = 200.0
# Few orders keep the bound cheap; fewer orders only loosen it (the gate then errs towards refusing).
_COARSE_ORDERS = (1.25, 1.5, 1.75, 2, 2.5, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 128, 256, 512, 1024)
_SEARCH_ROUNDS = 24  # halvings of log(sigma) over NOISE_MULTIPLIER_RANGE: a ratio of 1.000003


class PLDOutOfRange(PrivacyBudgetError):
    """A history whose PLD would not fit in bounded memory (its epsilon is in the hundreds or more)."""


def coarse_rdp_epsilon(segments: Sequence[tuple[float, float, int]], delta: float) -> float:
    """An RDP upper bound on epsilon of Poisson-sampled Gaussian ``segments`` over few orders."""
    accountant = dp_accounting.rdp.RdpAccountant(orders=list(_COARSE_ORDERS))
    for sigma, q, count in segments:
        if count:
            gaussian = dp_event.GaussianDpEvent(sigma)
            accountant.compose(gaussian if q == 1.0 else dp_event.PoissonSampledDpEvent(q, gaussian), count)
    return float(accountant.get_epsilon(delta))


def check_pld_computable(segments: Sequence[tuple[float, float, int]], delta: float) -> None:
    """Raise PLDOutOfRange, naming what works, where a PLD of ``segments`` would not fit in bounded
    memory; a history with a noiseless step (epsilon infinite, no PLD built) passes."""
    if any(sigma == 0 and count for sigma, _, count in segments):
        return
    bound = coarse_rdp_epsilon(segments, delta)
    if bound <= PLD_MAX_EPSILON:
        return
    rdp = f"accountant='rdp' (--accountant rdp), which bounds any noise multiplier in {_range()}"
    active = [(sigma, q, count) for sigma, q, count in segments if count]
    if len(active) == 1:
        sigma, q, count = active[0]
        least = least_pld_sigma(q, count, delta)
        raise PLDOutOfRange(
            f"noise_multiplier={sigma:g} with sample_rate={q:g} over {count} steps gives an epsilon of about "
            f"{bound:.3g} at delta={delta:g}: no meaningful guarantee, and past what the PLD accountant computes in "
            f"bounded memory (its grid grows as 1/sigma^2 and with epsilon). For this run the PLD accountant works "
            f"for noise_multiplier >= {least:.4g} (epsilon up to about {PLD_MAX_EPSILON:g}): give at least that "
            f"(dpscale calibrate finds the least one for a target epsilon), or use {rdp}."
        )
    raise PLDOutOfRange(
        f"This history's epsilon is about {bound:.3g} at delta={delta:g}: no meaningful guarantee, and past what the "
        f"PLD accountant computes in bounded memory (epsilon up to about {PLD_MAX_EPSILON:g}). Use more noise, or "
        f"{rdp}."
    )


def least_pld_sigma(q: float, count: int, delta: float) -> float:
    """The least noise multiplier (rounded up to 4 digits) at which a PLD of ``count`` steps at rate
    ``q`` is computed: its coarse RDP bound is within PLD_MAX_EPSILON."""
    low, high = (math.log(bound) for bound in NOISE_MULTIPLIER_RANGE)
    for _ in range(_SEARCH_ROUNDS):
        middle = 0.5 * (low + high)
        if coarse_rdp_epsilon([(math.exp(middle), q, count)], delta) > PLD_MAX_EPSILON:
            low = middle
        else:
            high = middle
    least = math.exp(high)
    quantum = 10.0 ** (math.floor(math.log10(least)) - 3)
    return math.ceil(least / quantum) * quantum


def _range() -> str:
    return f"[{NOISE_MULTIPLIER_RANGE[0]:g}, {NOISE_MULTIPLIER_RANGE[1]:g}]"
