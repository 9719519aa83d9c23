"""The host generator: scheme "dpscale.noise.gaussian.v2" (dpscale.noise.scheme) computed by
OpenSSL's ChaCha20 and whole-array numpy passes on the CPU, the fastest generator there. Callers
go through dpscale.noise (`gaussian`, `add_gaussian_noise_`), which checks a request once and
chooses this generator or the torch one (`select_generator`); the functions here take checked
arguments.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from dpscale.noise.key import NoiseKey
from dpscale.noise.scheme import (
    BLOCKS_PER_RANGE,
    PHI_SCALE,
    SQRT2,
    U53,
    WORDS_PER_BLOCK,
    chacha20_stream,
    log_series_into,
    sin_series_into,
    subkey,
)
from dpscale.noise.workers import NoiseWorkers

__all__ = ["add_gaussian_noise_", "add_scaled_", "gaussian", "scaled_noise_into"]

# Work is done on aligned pieces: every array handed to numpy and torch then holds a multiple of
# 16 pairs, so SIMD kernels have no scalar tails and an element's value does not depend on where
# a request's boundaries fall. _CHUNK keeps the float64 temporaries in cache.
_ALIGN = 32
_CHUNK = 1 << 16


def _keystream_into(stream_key: bytes, first_block: int, zeros: bytes, out: bytearray) -> None:
    """Fill `out` with the keystream from the start of block `first_block` on, splitting where
    the 32-bit counter of one nonce would wrap (`cryptography` refuses to wrap it). The keystream
    is the encryption of `zeros` (at least as long as `out`)."""
    source, target = memoryview(zeros), memoryview(out)
    block, done = first_block, 0
    while done < len(out):
        nblocks = min(-(-(len(out) - done) // 64), BLOCKS_PER_RANGE - block % BLOCKS_PER_RANGE)
        size = min(64 * nblocks, len(out) - done)
        chacha20_stream(stream_key, block).update_into(source[:size], target[done : done + size])
        block += nblocks
        done += size


class _Scratch:
    """Float64 and integer work arrays for one request's chunks, reused from chunk to chunk.

    A chunk's temporaries are a few hundred KiB each; allocated afresh, every one is a new
    mapping whose pages fault in on first touch, which cost as much as the arithmetic. Pieces
    yielded from one scratch are valid until the next chunk is computed.
    """

    def __init__(self, words: int) -> None:
        pairs = -(-words // 2)
        self.w = np.empty(pairs, dtype=np.uint64)
        self.octant = np.empty(pairs, dtype=np.uint64)
        self.r = np.empty(pairs, dtype=np.float64)
        self.phi = np.empty(pairs, dtype=np.float64)
        self.sin = np.empty(pairs, dtype=np.float64)
        self.cos = np.empty(pairs, dtype=np.float64)
        self.mask = np.empty(pairs, dtype=np.uint64)
        self.z = np.empty(2 * pairs, dtype=np.float64)
        # The logarithm's reduction u = m * 2^-k (frexp's exponents first as int32); the series
        # works in phi, sin and cos, which are filled after it (_log_unit). Putting m, k and the
        # exponents in other arrays' free space too was measured: no faster (within 1.6%).
        self.m = np.empty(pairs, dtype=np.float64)
        self.k = np.empty(pairs, dtype=np.float64)
        self.exponent = np.empty(pairs, dtype=np.int32)


def _sin_to_quarter_pi(x: np.ndarray, out: np.ndarray, work: np.ndarray) -> np.ndarray:
    """sin(x) for x in [0, pi/4], in float64, within 1 ulp (checked against a 120-bit sine; about 2%
    of values are 1 ulp off correct rounding). Plain numpy passes: as fast as torch's vectorised
    sin on one intra-op thread and faster when torch runs several (measured side by side: 616 us
    against 820 us per 65536 elements with 2), whose thread pool costs more than a 256 KiB array
    gains. The series itself is the scheme's (`sin_series_into`)."""
    np.multiply(x, x, out=work)
    return sin_series_into(x, work, out)


def _reduce_unit(u: np.ndarray, scratch: _Scratch) -> tuple[np.ndarray, np.ndarray]:
    """(m, k) with u = m * 2^-k exactly, m in [sqrt(1/2), sqrt(2)] and k an integer in [0, 53],
    for float64 u in [2^-53, 1]: e = frexp's exponent of u * sqrt(2) (a rounded product, used only
    to choose e), k = 1 - e, m = ldexp(u, k). frexp and ldexp are exact, so any implementation
    of this rule (the torch generator's works on the bits) gives the same m and k. In scratch.m,
    scratch.k."""
    n = u.shape[0]
    m, k, exponent = scratch.m[:n], scratch.k[:n], scratch.exponent[:n]
    np.multiply(u, SQRT2, out=m)
    np.frexp(m, out=(m, exponent))
    np.subtract(1, exponent, out=exponent)
    np.ldexp(u, exponent, out=m)
    np.copyto(k, exponent)
    return m, k


def _log_unit(u: np.ndarray, out: np.ndarray, scratch: _Scratch) -> np.ndarray:
    """ln(u) for float64 u in [2^-53, 1], into `out` (which may be `u`), within 0.88 ulp (measured
    against a 160-bit log; tests/test_noise.py). numpy's own log is as accurate, but its last bit
    is the build's (AVX-512 code or the C library's) and torch's log differs from it in about 0.3%
    of arguments; this one is exact reductions and IEEE-754 +, -, *, / only, so the torch
    generator, which makes the same reduction and runs the same `log_series_into`, gets the same
    bits on any device. scratch.sin, .cos and .phi are its work arrays (_box_muller fills them later)."""
    n = u.shape[0]
    m, k = _reduce_unit(u, scratch)
    return log_series_into(m, k, out, (scratch.sin[:n], scratch.cos[:n], scratch.phi[:n]))


def _box_muller(words: np.ndarray, scratch: _Scratch | None = None) -> np.ndarray:
    """Standard normals in float64, one per 64-bit word, by the octant-reduced Box-Muller map
    described in dpscale.noise.scheme. Every step is a whole-array pass (no per-element Python),
    written into `scratch` so that no pass allocates; the result is `scratch.z`'s prefix."""
    s = scratch if scratch is not None else _Scratch(words.shape[0])
    n = words.shape[0] // 2
    pairs = words.reshape(n, 2)
    w, octant, r, phi = s.w[:n], s.octant[:n], s.r[:n], s.phi[:n]
    sin_phi, cos_phi, mask, z = s.sin[:n], s.cos[:n], s.mask[:n], s.z[: 2 * n]
    np.right_shift(pairs[:, 0], np.uint64(11), out=w)
    w += np.uint64(1)
    np.multiply(w.view(np.int64), U53, out=r)  # u in (0, 1], exact
    _log_unit(r, out=r, scratch=s)  # phi, sin and cos are its work arrays until they are computed
    r *= -2.0
    np.sqrt(r, out=r)
    np.right_shift(pairs[:, 1], np.uint64(11), out=w)
    np.multiply(w.view(np.int64), PHI_SCALE, out=phi)  # [0, pi/4)
    _sin_to_quarter_pi(phi, out=sin_phi, work=cos_phi)
    # cos(phi) = sqrt(1 - sin^2): on [0, pi/4] sin^2 <= 1/2, so no cancellation (about 1.5 ulp).
    np.multiply(sin_phi, sin_phi, out=cos_phi)
    np.subtract(1.0, cos_phi, out=cos_phi)
    np.sqrt(cos_phi, out=cos_phi)
    # Octant k = b2 b1 b0 of theta (low 3 bits of v): cos and sin swap in octants 1, 2, 5, 6
    # (b0 ^ b1: a masked XOR of the bit patterns); then the output cos is negative in octants 2..5
    # (b1 ^ b2) and the output sin in 4..7 (b2): flips of the sign bit. Integer passes only.
    cos_bits, sin_bits = cos_phi.view(np.uint64), sin_phi.view(np.uint64)
    np.bitwise_and(pairs[:, 1], np.uint64(7), out=octant)
    np.right_shift(octant, np.uint64(1), out=mask)
    mask ^= octant  # bit 0: b0 ^ b1, bit 1: b1 ^ b2
    np.bitwise_and(mask, np.uint64(1), out=w)
    np.negative(w, out=w)  # all ones where the octant swaps
    differ = np.bitwise_xor(cos_bits, sin_bits, out=phi.view(np.uint64))  # phi is spent
    w &= differ
    cos_bits ^= w
    sin_bits ^= w
    mask &= np.uint64(2)
    mask <<= np.uint64(62)
    cos_bits ^= mask
    octant &= np.uint64(4)
    octant <<= np.uint64(61)
    sin_bits ^= octant
    np.multiply(r, cos_phi, out=z[0::2])
    np.multiply(r, sin_phi, out=z[1::2])
    return z


def _standard_normal_pieces(
    key: NoiseKey, step: int, name: str, numel: int, offset: int
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (position in the request, float64 values) covering elements offset..offset+numel-1,
    each piece computed from aligned, cache-sized spans of the stream. A piece is scratch memory:
    the consumer may overwrite it, and must be done with it before asking for the next."""
    stream_key = subkey(key, step, name)
    end = offset + numel
    lo = offset - offset % _ALIGN
    hi = -(-end // _ALIGN) * _ALIGN
    buffer = bytearray(8 * min(_CHUNK, hi - lo))
    zeros = bytes(len(buffer))
    scratch = _Scratch(len(buffer) // 8)
    for start in range(lo, hi, _CHUNK):
        stop = min(start + _CHUNK, hi)
        chunk = buffer if 8 * (stop - start) == len(buffer) else bytearray(8 * (stop - start))
        _keystream_into(stream_key, start // WORDS_PER_BLOCK, zeros, chunk)
        z = _box_muller(np.frombuffer(chunk, dtype="<u8"), scratch)
        first, last = max(start, offset), min(stop, end)
        yield first - offset, z[first - start : last - start]


def _spans(numel: int, offset: int, workers: NoiseWorkers | None) -> list[tuple[int, int]]:
    """[a, b) spans of a request of `numel` elements at `offset`, one per thread of `workers`, cut at
    multiples of _CHUNK in the stream (so no span adds a partial chunk of its own), each at least
    _CHUNK long. One span where the request is small or there is one thread."""
    threads = 1 if workers is None else workers.threads
    if threads == 1 or numel < 2 * _CHUNK:
        return [(0, numel)]
    chunks = -(-(offset + numel) // _CHUNK) - offset // _CHUNK
    cuts = [0]
    for i in range(1, threads):
        cut = ((offset // _CHUNK) + chunks * i // threads) * _CHUNK - offset
        if cuts[-1] < cut < numel:
            cuts.append(cut)
    cuts.append(numel)
    return list(zip(cuts[:-1], cuts[1:]))


def gaussian(
    key: NoiseKey, step: int, name: str, numel: int, offset: int, dtype: torch.dtype,
    device: torch.device | str, workers: NoiseWorkers | None = None,
) -> torch.Tensor:
    """dpscale.noise.gaussian computed here and moved to `device` (arguments already checked
    there; call that one); spread over `workers`' threads, with the same values."""
    out = torch.empty(numel, dtype=dtype)

    def span(a: int, b: int) -> None:
        for position, z in _standard_normal_pieces(key, step, name, b - a, offset + a):
            out[a + position : a + position + z.shape[0]] = torch.from_numpy(z)

    _run_spans(span, numel, offset, workers)
    return out.to(device)


def scaled_noise_into(out: np.ndarray, key: NoiseKey, step: int, name: str, std: float, offset: int,
                      workers: NoiseWorkers | None = None) -> np.ndarray:
    """std * z in float64 for elements offset..offset+len(out)-1 into `out`: the very values
    `add_gaussian_noise_` adds (the same product, rounded the same way), drawn ahead of the step
    (dpscale.noise.ahead); `add_scaled_` adds them."""

    def span(a: int, b: int) -> None:
        for position, z in _standard_normal_pieces(key, step, name, b - a, offset + a):
            np.multiply(z, std, out=out[a + position : a + position + z.shape[0]])

    _run_spans(span, out.shape[0], offset, workers)
    return out


def add_scaled_(piece: torch.Tensor, scaled: np.ndarray) -> None:
    """piece = round(piece + scaled), computed in float64 and rounded once to piece's dtype, for a
    contiguous CPU tensor: the last step of `add_gaussian_noise_`. `scaled` is overwritten."""
    if piece.dtype in (torch.float32, torch.float64):  # numpy rounds float64 -> float32 as torch does
        values = piece.numpy()
        scaled += values
        np.copyto(values, scaled, casting="same_kind")  # the one rounding
    else:
        z_tensor = torch.from_numpy(scaled)
        z_tensor += piece
        piece.copy_(z_tensor)


def add_gaussian_noise_(
    tensor: torch.Tensor, key: NoiseKey, step: int, name: str, std: float, offset: int,
    workers: NoiseWorkers | None = None,
) -> torch.Tensor:
    """dpscale.noise.add_gaussian_noise_ through the host (arguments already checked there; call
    that one): round(x + std * z) computed in float64, rounded once to the tensor's dtype; a tensor
    elsewhere than on the CPU, or not contiguous, goes through a flat CPU copy. Spread over
    `workers`' threads, disjoint spans each, with the same values."""
    numel = tensor.numel()
    target = tensor.detach()  # shares storage: in-place writes reach `tensor`, autograd stays out
    on_cpu_flat = target.device.type == "cpu" and target.is_contiguous()
    flat = target.view(-1) if on_cpu_flat else target.reshape(-1).to("cpu", copy=True)

    def span(a: int, b: int) -> None:
        for position, z in _standard_normal_pieces(key, step, name, b - a, offset + a):
            z *= std  # the piece is ours until the next one: x + std * z in float64, in place
            add_scaled_(flat[a + position : a + position + z.shape[0]], z)

    _run_spans(span, numel, offset, workers)
    if not on_cpu_flat:
        target.copy_(flat.view(target.shape))
    return tensor


def _run_spans(span, numel: int, offset: int, workers: NoiseWorkers | None) -> None:
    spans = _spans(numel, offset, workers)
    if len(spans) == 1:
        span(0, numel)
    else:
        workers.run([lambda a=a, b=b: span(a, b) for a, b in spans])
