"""The calls that make noise: every request is checked here once, then handed to the generator
that `select_generator` picks (the host one or the torch one), which produce the same bits.

The floating-point attacks, and what resists them
-------------------------------------------------
Mironov (2012, "On significance of the least significant bits for differential privacy") showed
that a Laplace sampler in floating point releases values whose low-order bits betray the exact
input: the set of values the sampler can output near y - x is porous, and differs between
neighbouring inputs x and x'. Holohan and Braghin (2021, "Secure random sampling in differential
privacy") carried this to Box-Muller and polar Gaussian samplers in float64 and proposed
drawing each Gaussian as a normalised sum of independent ones (diffprivlib uses two). Both attacks
need the released value to carry the sampler's full precision. We answer with the other remedy
the literature offers, coarser granularity, which costs nothing here: `add_gaussian_noise_`
computes `x + std * z` in float64 from the float64 sample and rounds once to the tensor's dtype
(float32 or bfloat16). Rounding is a data-independent post-processing of `x + std * Z`, so up to
the small deviations listed in dpscale.noise.scheme ("Why this is exact enough") the released
value is exactly the rounding of a Gaussian mechanism's output; 29 (float32) or 45 (bfloat16)
low-order bits of the sample never leave the float64 computation, and every float32 value near x
is a possible output whatever x is. Summing k Gaussians would cost k times the keystream and
transcendentals and buy no more once the output is rounded this way.

What is not claimed
-------------------
- No formal (epsilon, delta) proof for the floating-point implementation, as an exact discrete
  Gaussian sampler would give (Canonne, Kamath and Steinke 2020). The scheme's per-value errors
  are small but are not composed into a proven bound over millions of coordinates.
- `gaussian()` returns the standard-normal material rounded to `dtype`; a caller that scales and
  adds it itself in float32 loses the once-rounded property (a float32 grid times std is porous
  again). Add noise with `add_gaussian_noise_`. In float64 tensors (meant for tests and oracles)
  nothing is rounded away, and the argument above does not apply.
- Noise added on one rank before a cross-rank sum is rounded before the other ranks' terms join it;
  the once-rounded argument covers the value it was added to, not the later sums.
- Equality bit for bit holds where float64 arithmetic is IEEE-754 (dpscale.noise.scheme, "Same
  bits everywhere"); a platform that broke that would change values, not privacy: each
  coordinate is still drawn once, by whoever owns it.
"""

from __future__ import annotations

import math
import numbers
import operator

import torch

from dpscale.errors import ConfigError
from dpscale.noise import host_generator, torch_generator
from dpscale.noise.key import NoiseKey
from dpscale.noise.scheme import MAX_ELEMENTS, MAX_STEP
from dpscale.noise.workers import NoiseWorkers

__all__ = ["add_gaussian_noise_", "gaussian", "select_generator"]

_GENERATORS = ("auto", "host", "torch")


def _check_request(
    key: object, step: object, name: object, numel: object, offset: object
) -> tuple[int, int, int]:
    if not isinstance(key, NoiseKey):
        raise ConfigError(
            f"noise needs a NoiseKey, got {type(key).__name__}; load one with NoiseKey.from_file(path)."
        )
    if not isinstance(name, str) or not name:
        raise ConfigError(
            f"noise needs the parameter's name as a non-empty str, got {name!r}; pass the name from "
            "model.named_parameters() so every rank derives the same stream."
        )
    values = []
    limits = (("step", step, MAX_STEP), ("numel", numel, MAX_ELEMENTS), ("offset", offset, MAX_ELEMENTS))
    for label, value, limit in limits:
        if isinstance(value, bool):
            raise ConfigError(f"noise {label} must be an integer, got a bool ({value}).")
        try:
            value = operator.index(value)
        except TypeError:
            raise ConfigError(
                f"noise {label} must be an integer, got {type(value).__name__}."
            ) from None
        if not 0 <= value < limit:
            raise ConfigError(f"noise {label} must lie in [0, {limit}), got {value}.")
        values.append(value)
    step, numel, offset = values
    if offset + numel > MAX_ELEMENTS:
        raise ConfigError(
            f"noise elements [offset, offset + numel) = [{offset}, {offset + numel}) run past 2^63."
        )
    return step, numel, offset


def _check_dtype(dtype: object) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"gaussian dtype must be a floating torch.dtype, got {dtype!r}.")
    return dtype


def _check_target(tensor: object, std: object) -> float:
    """The checks of add_gaussian_noise_ that both generators share; returns std as a float."""
    if not isinstance(tensor, torch.Tensor) or not tensor.dtype.is_floating_point:
        raise ConfigError(
            f"add_gaussian_noise_ needs a floating-point tensor, got "
            f"{getattr(tensor, 'dtype', type(tensor).__name__)}."
        )
    if isinstance(std, bool) or not isinstance(std, numbers.Real) or not 0 <= std < math.inf:
        raise ConfigError(
            f"noise std must be a finite float >= 0, got {std!r}; compute it as noise multiplier "
            "times clipping norm."
        )
    return float(std)


def select_generator(device: torch.device | str, generator: str = "auto") -> str:
    """Which generator makes the noise of a tensor on `device`: "host" (OpenSSL's ChaCha20 and
    numpy on the CPU, the fastest there) or "torch" (dpscale.noise.torch_generator, the same
    values computed by tensor operations where the tensor lives, so a GPU gradient is never copied
    to the host and back). "auto" takes "host" for CPU tensors and "torch" for every other device; either can be
    forced. There is no third choice: nothing ever falls back to a non-keyed generator."""
    if generator not in _GENERATORS:
        raise ConfigError(
            f"noise generator must be one of {', '.join(map(repr, _GENERATORS))}, got {generator!r}."
        )
    if generator != "auto":
        return generator
    return "host" if torch.device(device).type == "cpu" else "torch"


def gaussian(
    key: NoiseKey,
    step: int,
    name: str,
    numel: int,
    offset: int = 0,
    dtype: torch.dtype = torch.float32,
    *,
    device: torch.device | str = "cpu",
    generator: str = "auto",
    workers: NoiseWorkers | None = None,
) -> torch.Tensor:
    """Elements offset..offset+numel-1 of the flattened N(0, 1) noise of parameter `name` at
    `step`, as a 1-D tensor of `dtype` on `device` (computed in float64, then rounded).

    Any split of a parameter into slices gives the same values as one call over the whole. To add
    noise to a gradient, prefer `add_gaussian_noise_`, which rounds only after the addition.
    `generator` is as in `select_generator`; `workers` spreads the host generator's work over its
    threads (the same values).
    """
    step, numel, offset = _check_request(key, step, name, numel, offset)
    dtype = _check_dtype(dtype)
    if select_generator(device, generator) == "torch":
        return torch_generator.gaussian(key, step, name, numel, offset, dtype, device)
    return host_generator.gaussian(key, step, name, numel, offset, dtype, device, workers)


def add_gaussian_noise_(
    tensor: torch.Tensor,
    key: NoiseKey,
    step: int,
    name: str,
    std: float,
    offset: int = 0,
    *,
    generator: str = "auto",
    workers: NoiseWorkers | None = None,
) -> torch.Tensor:
    """Add std * N(0, 1) noise in place to `tensor` viewed flat (row-major), its element i taking
    element offset + i of parameter `name`'s noise at `step`; returns `tensor`.

    Each element becomes round(x + std * z), computed in float64 and rounded once to the tensor's
    dtype, so the released bits are a post-processing of a Gaussian mechanism's output (see the
    module docstring). `std` is the caller's (noise multiplier times clipping norm). A tensor on
    an accelerator is noised where it lives, by the torch generator (`select_generator`); on the
    host, `workers` (dpscale.noise.NoiseWorkers) spreads the work over its threads, with the same
    values.
    """
    std = _check_target(tensor, std)
    step, _, offset = _check_request(key, step, name, tensor.numel(), offset)
    if select_generator(tensor.device, generator) == "torch":
        return torch_generator.add_gaussian_noise_(tensor, key, step, name, std, offset)
    return host_generator.add_gaussian_noise_(tensor, key, step, name, std, offset, workers)
