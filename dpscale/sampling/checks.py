"""The argument checks the samplers and the loader share, so that a size, a step or a rate is
refused with the same words wherever it is given."""

from __future__ import annotations

import math
import numbers
from typing import Any

from dpscale.errors import ConfigError

__all__ = ["int_arg", "sample_rate_arg"]


def int_arg(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an int, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{name} must be {bound}, got {value}")
    return value


def sample_rate_arg(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"sample_rate must be a float in (0, 1], got {value!r}")
    rate = float(value)
    if not 0.0 < rate <= 1.0:
        raise ConfigError(
            f"sample_rate must be in (0, 1], got {rate}; it is the expected batch size over the "
            "dataset size"
        )
    if rate < 1.0 and math.floor(rate * 2.0**64) == 0:
        raise ConfigError(f"sample_rate {rate} is below 2**-64 and would never sample anything")
    return rate
