"""What the accounting accepts: the accountants and samplings it knows, the checks every public
entry runs (each message says what to change), and the two conversions of a run's settings that
the engine, the CLI and the loaders share (epochs to steps, dataset size to delta)."""

from __future__ import annotations

import math
import numbers

from dpscale.accounting.limits import NOISE_MULTIPLIER_RANGE
from dpscale.errors import ConfigError, PrivacyBudgetError

__all__ = [
    "ACCOUNTANTS",
    "SAMPLINGS",
    "check_delta",
    "check_kinds",
    "check_noise_multiplier",
    "check_sample_rate",
    "check_steps",
    "default_delta",
    "steps_for_epochs",
]

ACCOUNTANTS = ("pld", "rdp")
SAMPLINGS = ("poisson", "shuffle")


def check_kinds(accountant: str, sampling: str, dataset_size: int | None) -> None:
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"accountant={accountant!r} is unknown; use one of {ACCOUNTANTS}.")
    if sampling not in SAMPLINGS:
        raise ConfigError(f"sampling={sampling!r} is unknown; use one of {SAMPLINGS}.")
    if dataset_size is not None and not _whole_number_at_least(dataset_size, 1):
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


def check_delta(delta: float, dataset_size: int | None) -> None:
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


def check_sample_rate(sample_rate: float, sampling: str, dataset_size: int | None) -> None:
    if not isinstance(sample_rate, numbers.Real) or not 0.0 < sample_rate <= 1.0:
        raise PrivacyBudgetError(
            f"sample_rate={sample_rate!r} must lie in (0, 1]: it is the chance that one "
            "example joins a step's batch (expected batch size / dataset size)."
        )
    if sampling == "shuffle" and dataset_size is not None and round(sample_rate * dataset_size) < 1:
        raise PrivacyBudgetError(
            f"sample_rate={sample_rate!r} with dataset_size={dataset_size} gives batches of "
            "0 examples; raise the sample rate to at least 1/dataset_size."
        )


def check_noise_multiplier(noise_multiplier: float) -> None:
    if not isinstance(noise_multiplier, numbers.Real) or not (
        0.0 <= noise_multiplier < math.inf
    ):
        raise PrivacyBudgetError(
            f"noise_multiplier={noise_multiplier!r} must be a finite number >= 0 (the noise "
            "standard deviation over the clipping norm); 0 means no privacy."
        )
    low, high = NOISE_MULTIPLIER_RANGE
    if noise_multiplier != 0 and not low <= noise_multiplier <= high:
        raise PrivacyBudgetError(
            f"noise_multiplier={noise_multiplier!r} is outside [{low:g}, {high:g}], the noise multipliers "
            "the accountants compute (dp_accounting overflows or divides by zero beyond); 0 means no noise "
            "(no privacy). Give a noise multiplier in that range."
        )


def check_steps(steps: int, name: str = "steps") -> None:
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 0:
        raise PrivacyBudgetError(f"{name}={steps!r} must be a whole number >= 0.")


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
    if not _whole_number_at_least(dataset_size, 2):
        raise PrivacyBudgetError(
            f"dataset_size={dataset_size!r}: a meaningful delta needs a whole number of at "
            "least 2 examples."
        )
    return float(dataset_size) ** -1.1


def _whole_number_at_least(value, minimum: int) -> bool:
    """An integer (numpy's included, bool excluded) of at least ``minimum``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum
