"""The torch generator: the keyed Gaussian noise of dpscale.noise, computed by torch tensor
operations wherever the tensor lives, so that a gradient on an accelerator is noised in place
instead of being copied to the host, noised at about 80 M coordinates/s by one process (scheme
v2), and copied back.

Same scheme, same values
------------------------
This is scheme "dpscale.noise.gaussian.v2" as dpscale/noise/scheme.py defines it, not a
look-alike: the subkey is `scheme.subkey`, the block counter layout `scheme.counter_words`, the
request checks and the choice of generator (`select_generator`) are dpscale.noise's, and the
Box-Muller map runs the scheme's own polynomials for the logarithm and the sine
(`scheme.log_series_into`, `scheme.sin_series_into`: the same functions the host generator runs,
given tensors instead of arrays) with its constants, in the same order of operations. What
differs is only who runs the two halves:

- ChaCha20 (RFC 8439) in int64 tensors holding uint32 words, masked to 32 bits after every
  addition and rotation, for a whole chunk of blocks at once (the four quarter rounds of a column
  or diagonal round are one tensor operation over rows of the state). Words 12 and 13 hold the
  block index as the 64-bit counter the host generator reaches by splitting requests per nonce
  range, so no request needs splitting here. Integer arithmetic is exact on every device: the
  keystream is bit-identical to OpenSSL's.
- The transform in float64, from operations of two kinds. Exact ones: int64 -> float64 of 53-bit
  integers, products with powers of two, the logarithm's reduction u = m * 2^-k (`_reduce_unit`,
  from the bits of u * sqrt(2)), negations and selections. Correctly rounded ones: additions,
  multiplications and divisions, IEEE-754 on CPUs and on CUDA, each its own kernel, so no compiler
  can contract a multiply and an add into an FMA (which would round once instead of twice); and
  sqrt, which must be correctly rounded too, as numpy's is, but torch.sqrt on CPU is not (MKL's
  vectorised sqrt, 1 ulp off for about 1.4% of arguments; torch 2.13): `_sqrt` corrects it
  exactly from the remainder x - y^2, with no change where torch.sqrt is already IEEE (CUDA's
  double sqrt is).

What can differ: nothing, where those hold
------------------------------------------
No transcendental function of the device is called: not torch.log, torch.sin or torch.cos. So
float64 outputs are bit-identical to the host generator's, and so is every rounding of them to
float32, bfloat16 or float16 (tests/test_noise_device.py compares all with torch.equal, float64 by
bit pattern). What a device must provide is IEEE-754 float64 with round-to-nearest: correctly
rounded +, -, *, / and sqrt (or a sqrt that `_sqrt`'s one-step correction makes so), int64 shifts
and bitwise operations, and no fusion of separate tensor operations into FMAs. (A compiler that
fused kernels, torch.compile say, could contract them: this module is run eagerly.) Subnormal
numbers never arise, so flush-to-zero modes do not matter. Scheme v1 used torch.log here, whose
last bit differed from numpy's for about 0.3% of arguments (float64 outputs up to 2 ulps apart).

Work and memory: a chunk of blocks (8 Gaussians each) is about 700 elementwise tensor operations,
most over int64 rows of the ChaCha20 state; the working set is a few dozen bytes per Gaussian of
the chunk. On a CPU this runs at about 7 M Gaussians/s per thread, a tenth of the host generator:
there it is for tests and for devices, and `select_generator` keeps CPU tensors on the host one.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

from dpscale.errors import ConfigError
from dpscale.noise.key import NoiseKey
from dpscale.noise.scheme import (
    PHI_SCALE,
    SQRT2,
    U53,
    WORDS_PER_BLOCK,
    counter_words,
    log_series_into,
    sin_series_into,
    subkey,
)

__all__ = ["add_gaussian_noise_", "gaussian"]

_MASK = 0xFFFFFFFF
_SIGMA = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)  # "expand 32-byte k"
_ELEMENTS_PER_BLOCK = WORDS_PER_BLOCK
# Blocks per chunk (8 Gaussians each). On a CPU, 2^14 keeps the rows in cache (measured: 7.6 M/s
# against 5.9 M/s at 2^17 and 3.3 M/s at 2^10, one thread). On an accelerator each of the ~700
# operations of a chunk is a kernel launch, so a chunk must be large enough that the launches
# (microseconds each) are small beside the memory traffic: 2^20 blocks is 8 M Gaussians, about
# 0.5 GB of working set at the peak (the Box-Muller's float64 temporaries).
_CHUNK_BLOCKS_CPU = 1 << 14
_CHUNK_BLOCKS_DEVICE = 1 << 20

_T = TypeVar("_T")


def _rotl_(x: torch.Tensor, bits: int) -> None:
    """Rotate the 32-bit words held in `x` left by `bits`, in place."""
    high = x >> (32 - bits)
    x <<= bits
    x &= _MASK
    x |= high


def _quarter_rounds_(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> None:
    """RFC 8439's quarter round on rows a[i], b[i], c[i], d[i] for every i and block at once, in
    place (the caller's tensors are the state)."""
    for rotate_d, rotate_b in ((16, 12), (8, 7)):
        a += b
        a &= _MASK
        d ^= a
        _rotl_(d, rotate_d)
        c += d
        c &= _MASK
        b ^= c
        _rotl_(b, rotate_b)


def _keystream_words(stream_key: bytes, first_block: int, nblocks: int, device: torch.device) -> torch.Tensor:
    """The ChaCha20 blocks first_block..first_block+nblocks-1 under `stream_key`, as a (16, nblocks)
    int64 tensor of their little-endian 32-bit words (row j: word j of every block)."""
    blocks = torch.arange(first_block, first_block + nblocks, dtype=torch.int64, device=device)
    key = struct.unpack("<8I", stream_key)
    rows = torch.tensor([_SIGMA, key[:4], key[4:]], dtype=torch.int64, device=device)  # (3, 4)
    initial = [rows[i].unsqueeze(1) for i in range(3)]
    initial.append(torch.stack([torch.as_tensor(w, dtype=torch.int64, device=device).expand(nblocks)
                                for w in counter_words(blocks)]))
    a, b, c, d = (row.expand(4, nblocks).clone() for row in initial)
    for _ in range(10):  # 20 rounds: a column round, then a diagonal round
        _quarter_rounds_(a, b, c, d)
        b, c, d = b.roll(-1, 0), c.roll(-2, 0), d.roll(-3, 0)  # diagonals become columns
        _quarter_rounds_(a, b, c, d)
        b, c, d = b.roll(1, 0), c.roll(2, 0), d.roll(3, 0)
    for row, start in zip((a, b, c, d), initial):
        row += start
        row &= _MASK
    return torch.cat([a, b, c, d])


_SPLITTER = float(2**27 + 1)  # Veltkamp: splits a double into two halves of 26 and 27 bits


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """IEEE-754 sqrt (correctly rounded, as numpy's and CUDA's are) of non-negative float64 `x`,
    from torch.sqrt, which on CPU (MKL's vectorised sqrt) is off by 1 ulp for about 1.4% of
    arguments. Of the faithful y and its neighbours, the correctly rounded one is chosen from the
    remainder x - y^2, which is representable and computed exactly: y^2 = p + e by Dekker's product
    (no FMA needed), x - p is exact (Sterbenz), and so is (x - p) - e. Both y and x - y^2 lie on
    the grid of ulp(y)^2, so sqrt(x) is above the midpoint y + ulp/2 exactly when x - y^2 > y * ulp
    and below y - ulp'/2 (ulp' the gap below y) exactly when x - y^2 <= -y * ulp' (Tuckerman's
    test); y * ulp is exact, ulp being a power of two."""
    y = torch.sqrt(x)
    c = y * _SPLITTER
    high = c - (c - y)
    low = y - high
    p = y * y
    e = high * high
    e -= p
    e += 2.0 * high * low
    e += low * low
    remainder = x - p
    remainder -= e
    above = torch.nextafter(y, torch.full_like(y, math.inf))
    below = torch.nextafter(y, torch.zeros_like(y))
    rounded = torch.where(remainder > y * (above - y), above, y)
    # y = -0.0 (sqrt(-0.0), at u = 1): nextafter towards 0 gives +0.0, which would pass the test
    lower = (remainder <= -(y * (y - below))) & (y != 0)
    return torch.where(lower, below, rounded)


def _sin_to_quarter_pi(x: torch.Tensor) -> torch.Tensor:
    """host_generator._sin_to_quarter_pi, the same passes in the same order."""
    return sin_series_into(x, x * x, torch.empty_like(x))


def _reduce_unit(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """host_generator._reduce_unit's m and k (u = m * 2^-k, k = 1 - e with e the frexp exponent of
    u * sqrt(2)), from the bits of that product instead of torch.frexp and torch.ldexp: its biased
    exponent B gives e = B - 1022, so k = 1023 - B; 2^k is assembled from its bits
    ((k + 1023) << 52) and u * 2^k is an exact product. Only integer operations and one exact
    multiplication, which every device does alike (torch.ldexp multiplies by a pow(2, k) that
    nothing promises to be exact)."""
    biased = (u * SQRT2).view(torch.int64) >> 52
    k = 1023 - biased
    scale = (k + 1023) << 52
    return u * scale.view(torch.float64), k.to(torch.float64)


def _log_unit(u: torch.Tensor) -> torch.Tensor:
    """host_generator._log_unit, the same bits: the same reduction, then scheme.log_series_into."""
    m, k = _reduce_unit(u)
    work = (torch.empty_like(u), torch.empty_like(u), torch.empty_like(u))
    return log_series_into(m, k, torch.empty_like(u), work)


def _box_muller(words: torch.Tensor) -> torch.Tensor:
    """host_generator._box_muller on (16, nblocks) keystream words: the 8 * nblocks float64 Gaussians in
    stream order. Pair p of a block takes its 64-bit words w, v from 32-bit words 4p..4p+3."""
    u_lo, u_hi, v_lo, v_hi = words[0::4], words[1::4], words[2::4], words[3::4]  # (4, nblocks)
    w = u_hi << 21
    w |= u_lo >> 11
    w += 1
    r = w.to(torch.float64)
    r *= U53  # u in (0, 1], exact
    r = _log_unit(r)
    r *= -2.0
    r = _sqrt(r)
    w = v_hi << 21
    w |= v_lo >> 11
    phi = w.to(torch.float64)
    phi *= PHI_SCALE
    sin_phi = _sin_to_quarter_pi(phi)
    cos_phi = sin_phi * sin_phi
    cos_phi.neg_()
    cos_phi += 1.0  # 1 - sin^2: negation is exact, so this is the host's np.subtract(1.0, .)
    cos_phi = _sqrt(cos_phi)
    octant = v_lo & 7
    mask = octant ^ (octant >> 1)  # bit 0: b0 ^ b1 (swap), bit 1: b1 ^ b2 (cos negative)
    swap = (mask & 1).bool()
    cos_theta = torch.where(swap, sin_phi, cos_phi)
    sin_theta = torch.where(swap, cos_phi, sin_phi)
    cos_theta = torch.where((mask & 2).bool(), -cos_theta, cos_theta)
    sin_theta = torch.where((octant & 4).bool(), -sin_theta, sin_theta)
    cos_theta *= r
    sin_theta *= r
    return torch.stack([cos_theta, sin_theta], dim=-1).transpose(0, 1).reshape(-1)


def _standard_normal_pieces(
    key: NoiseKey, step: int, name: str, numel: int, offset: int, device: torch.device
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (position in the request, float64 values on `device`) covering elements
    offset..offset+numel-1, a chunk of whole ChaCha20 blocks at a time."""
    if numel == 0:
        return
    stream_key = subkey(key, step, name)
    end = offset + numel
    first, last = offset // _ELEMENTS_PER_BLOCK, -(-end // _ELEMENTS_PER_BLOCK)
    chunk = _CHUNK_BLOCKS_CPU if device.type == "cpu" else _CHUNK_BLOCKS_DEVICE
    for block in range(first, last, chunk):
        nblocks = min(chunk, last - block)
        z = _box_muller(_keystream_words(stream_key, block, nblocks, device))
        start = block * _ELEMENTS_PER_BLOCK
        lo, hi = max(start, offset), min(start + z.shape[0], end)
        yield lo - offset, z[lo - start : hi - start]


def _refusing_failures(device: torch.device, work: Callable[[], _T]) -> _T:
    """Run `work`; a device that lacks an operation the generator needs is dpscale's error, with
    no fallback (to the host or to another generator) behind the caller's back."""
    try:
        return work()
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        raise ConfigError(
            f"dpscale's device noise generator cannot run on {device} ({type(exc).__name__}: {exc}). It "
            "needs int64 shifts and bitwise operations and float64 arithmetic and sqrt on the device. Keep the "
            "gradients on a device that has them, or add the noise on the host with "
            "add_gaussian_noise_(..., generator='host') (the same values, copied through the CPU)."
        ) from exc


def gaussian(
    key: NoiseKey, step: int, name: str, numel: int, offset: int, dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor:
    """dpscale.noise.gaussian on `device` (arguments already checked there; call that one)."""
    device = torch.device(device)

    def work() -> torch.Tensor:
        out = torch.empty(numel, dtype=dtype, device=device)
        for position, z in _standard_normal_pieces(key, step, name, numel, offset, device):
            out[position : position + z.shape[0]] = z
        return out

    return _refusing_failures(device, work)


def add_gaussian_noise_(
    tensor: torch.Tensor, key: NoiseKey, step: int, name: str, std: float, offset: int
) -> torch.Tensor:
    """dpscale.noise.add_gaussian_noise_ where `tensor` lives (arguments already checked there; call that
    one): round(x + std * z) computed in float64 on the device, rounded once to the dtype."""
    target = tensor.detach()  # shares storage: in-place writes reach `tensor`, autograd stays out

    def work() -> None:
        flat = target.view(-1) if target.is_contiguous() else target.reshape(-1)
        for position, z in _standard_normal_pieces(key, step, name, target.numel(), offset, target.device):
            piece = flat[position : position + z.shape[0]]
            z *= std
            z += piece
            piece.copy_(z)  # the one rounding
        if not target.is_contiguous():
            target.copy_(flat.view(target.shape))

    _refusing_failures(target.device, work)
    return tensor
