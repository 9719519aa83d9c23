"""Scheme "dpscale.noise.gaussian.v2": how every keyed stream of a run is laid out, and the exact
float64 operations that turn keystream words into Gaussians, shared as public names by the host
generator (`host_generator`), the torch generator (`torch_generator`) and the Poisson sampler
(`dpscale.sampling`), so that no consumer holds its own copy of a constant, a polynomial or the
counter layout, and changing one of them changes it for all (and must change `SCHEME`).

Construction (scheme "dpscale.noise.gaussian.v2")
-------------------------------------------------
1. Subkey: HMAC-SHA256(key, "dpscale.noise.gaussian.v2" || 0x00 || step as 8 bytes little-endian
   || len(name) as 4 bytes little-endian || name in UTF-8). Fixed widths and a length prefix make
   the encoding unambiguous, so no two (step, name) pairs share a subkey.
2. Keystream: ChaCha20 (RFC 8439, through `cryptography`, i.e. OpenSSL) under the subkey.
   `cryptography`'s 16-byte nonce is the 4-byte little-endian block counter followed by the
   12-byte RFC nonce; we use the RFC nonce as a 64-bit little-endian "range" number and 4 zero
   bytes. Block k of the stream is block (k mod 2^32) of range (k div 2^32); a request that
   crosses a range is split, so the 32-bit counter never wraps (`cryptography` refuses to wrap).
   Each 64-byte block is eight little-endian 64-bit words; word j belongs to element j. One range
   covers 2^35 elements, and parameters of up to 2^63 elements are supported.
3. Transform (Box-Muller, in float64, branch-free): elements 2i and 2i+1 share the words w = word
   2i and v = word 2i+1.
   - u = ((w >> 11) + 1) * 2^-53, a 53-bit uniform in (0, 1]; r = sqrt(-2 ln u). ln u comes from
     an exact reduction u = m * 2^-k (m in [sqrt(1/2), sqrt(2)]) and a degree-7 minimax
     polynomial in s^2, s = (m - 1) / (m + 1), with k ln 2 split in two parts (`log_series_into`;
     within 0.88 ulp of ln u, measured), not by a library log.
   - The angle takes its octant k from the low 3 bits of v and phi = (pi/4) * (v >> 11) * 2^-53 in
     [0, pi/4) from its top 53 bits; cos(theta) and sin(theta) are +-cos(phi) and +-sin(phi),
     swapped as the octant requires (theta = phi, pi/2 - phi, pi/2 + phi, ...). sin(phi) comes
     from its Taylor polynomial to degree 17 (within 1 ulp on [0, pi/4]), cos(phi) as
     sqrt(1 - sin(phi)^2), which on [0, pi/4] (sin^2 <= 1/2) has no
     cancellation and costs a third of a second transcendental call.
   - element 2i = r cos(theta), element 2i+1 = r sin(theta); then rounded to the target dtype.

Why this is exact enough
------------------------
- The float64 value is the exact Box-Muller image of a point of a 2^53 x 2^56 grid, up to a few
  float64 rounding errors that are small *relative to the value itself*: u is exact, ln u is
  evaluated on an exactly represented argument (relatively accurate even for u near 1, where r is
  small), and the angle is reduced to [0, pi/4] before cos and sin, where both are well
  conditioned, so even the smallest outputs (sin(phi) with phi tiny) keep full relative precision.
  Reducing with the octant bits also makes the distribution exactly symmetric: the sign of each
  output is a key bit independent of its magnitude, so the mean is exactly zero.
- Rounded to float32 (24-bit significand), a value is off from the rounding of the exact grid image
  only when it lies within a few float64 ulps of a float32 rounding boundary (probability about
  2^-28 per element). Counting grid points in the pre-image of a float32 rounding interval, the
  probability of each float32 value in |z| <= 7 matches the N(0, 1) mass of its rounding interval
  to a relative error we estimate well below 1e-6 (an estimate, not a proof).
- Tails: the largest output is sqrt(2 * 53 ln 2) = 8.57; N(0, 1) puts about 1e-17 beyond it, and
  the radius grid is coarser than float32 beyond about r = 7 (about 3e-12 of the mass). For neighbouring
  gradients that differ by Delta the truncation adds, per step, at most about
  2 * phi(8.57) * sum_i |Delta_i| / std <= 1e-16 * sqrt(d) * sensitivity / std to delta.
- Time and keystream use are independent of the values (no rejection loop), so the timing channel of
  rejection samplers (Jin et al. 2022, "Are we there yet?") has nothing to measure here.

Same bits everywhere (new in v2)
--------------------------------
The keystream is integer arithmetic, the same in OpenSSL and in dpscale/noise/torch_generator.py
(the scheme in torch operations on a tensor's own device, `select_generator`). The float64
transform calls no library transcendental: ln u and sin(phi) are polynomials (`log_series_into`,
`sin_series_into`) that both generators run as the same operations in the same order, and every
operation is either exact (53-bit integers to float64, products with powers of two, frexp and
ldexp, sign flips and swaps by bit masks) or an IEEE-754 correctly rounded +, -, *, / or sqrt
(numpy's sqrt is; torch's is corrected by `torch_generator._sqrt`), one per pass over an array, so
no compiler fuses a multiply and an add into an FMA. No intermediate is subnormal, so
flush-to-zero modes change nothing either. Hence float64 outputs, and every rounding of them,
are the same on any machine and device.
Scheme v1 took ln u from numpy's log and torch's log, which differ in the last bit for about 0.3%
of arguments (float64 outputs up to 2 ulps apart, float32 equal but for about 2^-28 of those);
v2 changed the values and the name (the subkey's message holds it), so no value of v1 reappears.
A run resumed across the change is refused unless asked for (PrivacyEngine.load_state_dict).

The Poisson sampler's stream uses the same ChaCha20 layout (`counter_words`, `chacha20_stream`)
under a key of its own (`sampling_stream_key`), with the step or epoch as the range number.
"""

from __future__ import annotations

import decimal
import hashlib
import math
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from dpscale.errors import ConfigError
from dpscale.noise.key import NoiseKey, keyed_digest

__all__ = [
    "BLOCKS_PER_RANGE",
    "LN2_HI",
    "LN2_LO",
    "LOG_POLY",
    "MAX_ELEMENTS",
    "MAX_STEP",
    "PHI_SCALE",
    "SCHEME",
    "SIN_TAYLOR",
    "SQRT2",
    "U53",
    "WORDS_PER_BLOCK",
    "chacha20_stream",
    "counter_words",
    "log_series_into",
    "sampling_stream",
    "sampling_stream_key",
    "sin_series_into",
    "subkey",
]

SCHEME = "dpscale.noise.gaussian.v2"
"""Names the construction above; a privacy report records it with the key's fingerprint."""

WORDS_PER_BLOCK = 8  # 64-byte ChaCha20 block = 8 words of 64 bits; word j feeds element j
BLOCKS_PER_RANGE = 1 << 32  # what the 32-bit block counter of one nonce reaches
MAX_ELEMENTS = 1 << 63
MAX_STEP = 1 << 64
U53 = 2.0**-53
PHI_SCALE = (math.pi / 4.0) * 2.0**-53


# ----------------------------------------------------------------------------- keyed streams


def subkey(key: NoiseKey, step: int, name: str) -> bytes:
    """The ChaCha20 key of one (step, parameter): a PRF of the secret over an unambiguous
    encoding, so distinct pairs get independent streams."""
    name_bytes = name.encode("utf-8")
    message = b"".join(
        (
            SCHEME.encode("ascii"),
            b"\x00",
            step.to_bytes(8, "little"),
            len(name_bytes).to_bytes(4, "little"),
            name_bytes,
        )
    )
    return keyed_digest(key, message)


def counter_words(block):
    """ChaCha20 state words 12..15 of keystream block `block` (an int, or an int64 tensor of
    them): the one counter layout of every keyed stream (both generators and the sampler). Word 12
    is RFC 8439's 32-bit block counter, words 13..15 its 12-byte nonce, holding the 64-bit
    little-endian range number (k div 2^32) and 4 zero bytes; block k is block (k mod 2^32) of that
    range. Noise requests end below 2^63 elements, so there k < 2^60, words 14 and 15 are zero, and
    words 12 and 13 act as one 64-bit counter; the sampler starts each step at a range of its own."""
    range_index = block >> 32
    return block & 0xFFFFFFFF, range_index & 0xFFFFFFFF, range_index >> 32, 0


def chacha20_stream(stream_key: bytes, block: int) -> Any:
    """A ChaCha20 encryptor (``cryptography``, i.e. OpenSSL) under `stream_key` whose keystream
    starts at block `block` of the `counter_words` layout; ``.update(zeros)`` gives the keystream.
    It may run on to the end of `block`'s range, no further: `cryptography` refuses to wrap the
    32-bit counter, so a caller that needs more splits its request there."""
    nonce = b"".join(word.to_bytes(4, "little") for word in counter_words(block))
    return Cipher(algorithms.ChaCha20(stream_key, nonce), mode=None).encryptor()


_SAMPLING_DOMAIN = b"dpscale.sampling.v1\x00"


def sampling_stream_key(kind: str, seed: bytes) -> bytes:
    """A 256-bit ChaCha20 key for the sampler; the kind separates the Poisson and shuffle streams
    of one seed (the engine's seed is `NoiseKey.derive_seed("sampling")`)."""
    return hashlib.sha256(_SAMPLING_DOMAIN + kind.encode("ascii") + b"\x00" + seed).digest()


def sampling_stream(stream_key: bytes, index: int) -> Any:
    """The sampler's ChaCha20 stream for one step (or epoch): range `index` of the `counter_words`
    layout, from its first block; ``.update(bytes(n))`` gives its next n bytes."""
    if not 0 <= index < 1 << 64:
        raise ConfigError(f"step or epoch {index} is outside [0, 2**64); restart with a new seed")
    return chacha20_stream(stream_key, index * BLOCKS_PER_RANGE)


# ----------------------------------------------------------------------------- float64 transform


# sin(x) = x + x^3 * sum_k (-1)^k x^(2k-2) / (2k+1)!, k = 1..8: on [0, pi/4] the first omitted term
# is below 1e-19 of x, so the sum is exact to float64 rounding.
SIN_TAYLOR = tuple((-1) ** k / math.factorial(2 * k + 1) for k in range(1, 9))


def sin_series_into(x, square, out):
    """sin(x) for x in [0, pi/4] into ``out``, given ``square`` = x * x: the Taylor passes of
    `SIN_TAYLOR`, in-place operators only, so numpy arrays (the host generator) and torch tensors
    (the torch generator) run the same operations in the same order and round alike. The
    x + small-correction form keeps tiny outputs as accurate, relatively, as large ones."""
    out[...] = SIN_TAYLOR[-1]
    for coefficient in reversed(SIN_TAYLOR[:-1]):
        out *= square
        out += coefficient
    out *= square
    out *= x
    out += x
    return out


# ln(1 + f) = 2 atanh(s) with s = f / (2 + f); 2 atanh(s) = 2s + s * R(s^2), and R(z) = 2z/3 + 2z^2/5
# + ... is replaced by its minimax polynomial of degree 7 on [0, 0.0295], which covers z = s^2 for
# every m = 1 + f in [sqrt(1/2), sqrt(2)] (z <= (3 - 2 sqrt(2))^2 = 0.029437) with a margin for the
# rounding of the reduction. The coefficients (of z, z^2, ..., z^7) come from a Remez exchange in
# 256-bit arithmetic (mpmath), rounded to float64: |R - polynomial| <= 2^-58 on the interval, which
# moves ln m by at most 2^-59 of itself. Taylor's 2/(2k+1) would need ten terms for the same
# accuracy; each term is two passes over the chunk.
LOG_POLY = (0.6666666666666735, 0.3999999999940701, 0.2857142874425773, 0.22222198365590634,
            0.18183575881489203, 0.1531373632044412, 0.14799271284498053)
SQRT2 = math.sqrt(2.0)  # correctly rounded; it only decides the reduction, the same in both generators


def _ln2_split() -> tuple[float, float]:
    """ln 2 as hi + lo: hi has 43 significant bits, so k * hi is exact for every k < 2^10 (here
    k <= 54), and lo is the float64 nearest ln 2 - hi, from a 40-digit ln 2 (decimal's ln is
    correctly rounded)."""
    with decimal.localcontext() as context:
        context.prec = 40
        ln2 = decimal.Decimal(2).ln()
        hi = math.ldexp(math.floor(math.ldexp(float(ln2), 44)), -44)
        return hi, float(ln2 - decimal.Decimal(hi))


LN2_HI, LN2_LO = _ln2_split()


def log_series_into(m, k, out, work):
    """ln(m * 2^-k) into ``out``, for float64 m in [sqrt(1/2), sqrt(2)] (about) and integer-valued
    float64 k in [0, 54], given as numpy arrays (the host generator) or torch tensors
    (the torch generator): the operations are the same, in the same order, each one exact or an
    IEEE-754 correctly rounded +, -, *, /, so both give the same bits (numpy and torch each run
    one operation per pass, so nothing is fused into an FMA). ``m`` and ``k`` are overwritten;
    ``work`` holds three more arrays of their shape; ``out`` may not be one of these.

    With f = m - 1 (exact, Sterbenz), s = f / (2 + f), z = s^2, h = f^2 / 2:
    ln m = 2 atanh(s) = f - (h - s * (h + R(z))), an identity (2s = f - h + s h). Written this way
    the leading f is exact and the rounding errors sit in terms a fifth of its size or less, which
    keeps the result within 1 ulp where s alone (rounded twice) would not. ln 2 is split so that
    k * ln2_hi is exact: ln u = -k * ln2_hi + (f - (h - (s * (h + R) - k * ln2_lo))). At u = 1
    (m = 1, k = 0) every term is 0 and so is the result."""
    namespace = np if isinstance(m, np.ndarray) else torch
    s, z, h = work
    f = m
    f -= 1.0
    namespace.add(f, 2.0, out=s)
    namespace.divide(f, s, out=s)
    namespace.multiply(s, s, out=z)
    namespace.multiply(z, LOG_POLY[-1], out=out)
    for coefficient in reversed(LOG_POLY[:-1]):
        out += coefficient
        out *= z
    namespace.multiply(f, f, out=h)
    h *= 0.5
    out += h
    out *= s  # s * (h + R)
    namespace.multiply(k, -LN2_LO, out=z)
    out += z  # s * (h + R) - k * ln2_lo
    h -= out
    f -= h  # ln m - k * ln2_lo
    namespace.multiply(k, -LN2_HI, out=out)  # exact
    out += f
    return out
