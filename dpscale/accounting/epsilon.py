"""Epsilon of a run's history, through dp_accounting: which event describes a step, which
accountant composes the steps and how finely (PLDs are refined where their grid is too coarse).
The only place dp_accounting is spoken to."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence

import dp_accounting
from dp_accounting import dp_event

from dpscale.accounting.inputs import (
    check_delta,
    check_kinds,
    check_noise_multiplier,
    check_sample_rate,
    check_steps,
)
from dpscale.accounting.limits import check_pld_computable
from dpscale.errors import ConfigError

__all__ = ["PLD_VALUE_DISCRETIZATION", "Segment", "compute_epsilon", "epsilon_of"]

logger = logging.getLogger(__package__)  # "dpscale.accounting", whichever module of it logs

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

_NeighborRel = dp_accounting.privacy_accountant.NeighboringRelation

# One segment of a run's history: `count` consecutive steps at (noise_multiplier, sample_rate).
Segment = tuple[float, float, int]


def _event(
    noise_multiplier: float, sample_rate: float, sampling: str, dataset_size: int | None
) -> dp_event.DpEvent:
    """The dp_accounting event of one step."""
    if noise_multiplier == 0:
        # The library's own name for a release with no noise: epsilon is infinite.
        return dp_event.NonPrivateDpEvent()
    gaussian = dp_event.GaussianDpEvent(noise_multiplier)
    if sampling == "shuffle":
        assert dataset_size is not None  # check_kinds
        return dp_event.SampledWithoutReplacementDpEvent(
            # int(): under numpy 1.x, round() of a numpy integer's product stays a numpy float
            dataset_size, int(round(sample_rate * dataset_size)), gaussian  # noqa: RUF046
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


def epsilon_of(
    segments: Sequence[Segment],
    delta: float,
    accountant: str,
    sampling: str,
    dataset_size: int | None,
    *,
    gate: bool = True,
) -> float:
    """Epsilon of already validated segments. Under PLD a history past what a PLD holds in bounded
    memory is refused first (``limits.check_pld_computable``); ``gate=False`` skips that check for
    a prefix of a history already checked (its epsilon is no larger)."""
    if not any(count for _, _, count in segments):
        return 0.0
    with _absl_warnings_as_debug():
        if accountant == "pld":
            if gate:
                check_pld_computable(segments, delta)
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
    check_kinds(accountant, sampling, dataset_size)
    check_delta(delta, dataset_size)
    check_sample_rate(sample_rate, sampling, dataset_size)
    check_noise_multiplier(noise_multiplier)
    check_steps(steps)
    return epsilon_of(
        [(float(noise_multiplier), float(sample_rate), int(steps))],
        float(delta),
        accountant,
        sampling,
        dataset_size,
    )
