"""Keyed cryptographic Gaussian noise: coordinate j of parameter `name` at step t is a pure
function of (secret key, t, name, j).

Why keyed and seekable
----------------------
DP-SGD adds one draw of N(0, std^2) per coordinate per logical step. Under data parallelism and
ZeRO each rank owns a slice [a, b) of a flattened parameter, and the slices change with the
topology. If the noise depended on generation order (a torch.Generator, a global seed), two
topologies would add different noise, a resumed run would diverge, and a careless backend could
add the same draw twice or W times. Here the value of every coordinate is fixed by the key and its
coordinates, so any rank can produce exactly the part it owns, in any order, and the result is
bit-for-bit the same as generating the whole parameter at once (on any machine, and on the host
or a device: see "Same bits everywhere" below). The key is secret and 256 bits: unlike a Mersenne
Twister seed, an observer of some noised values cannot reconstruct the others.

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

The floating-point attacks, and what resists them
-------------------------------------------------
Mironov (2012, "On significance of the least significant bits for differential privacy") showed
that a Laplace sampler in floating point releases values whose low-order bits betray the exact
input: the set of values the sampler can output near y - x is porous, and differs between
neighbouring inputs x and x'. Holohan and Braghin (2021, "Secure random sampling in differential
privacy") carried this to Box-Muller and polar Gaussian samplers in float64 and proposed
drawing each Gaussian as a normalised sum of independent ones (diffprivlib uses two). Both attacks
need the released value to carry the sampler's full precision. We answer with the other remedy
the literature offers, coarser granularity, which costs nothing here:
`add_gaussian_noise_` computes `x + std * z` in float64 from the float64 sample and rounds once to the
tensor's dtype (float32 or bfloat16). Rounding is a data-independent post-processing of
`x + std * Z`, so up to the small deviations listed above the released value is exactly the
rounding of a Gaussian mechanism's output; 29 (float32) or 45 (bfloat16) low-order bits of the
sample never leave the float64 computation, and every float32 value near x is a possible output
whatever x is. Summing k Gaussians would cost k times the keystream and transcendentals and buy no
more once the output is rounded this way.

What is not claimed
-------------------
- No formal (epsilon, delta) proof for the floating-point implementation, as an exact discrete
  Gaussian sampler would give (Canonne, Kamath and Steinke 2020). The per-value errors above are
  small but are not composed into a proven bound over millions of coordinates.
- `gaussian()` returns the standard-normal material rounded to `dtype`; a caller that scales and
  adds it itself in float32 loses the once-rounded property (a float32 grid times std is porous
  again). Add noise with `add_gaussian_noise_`. In float64 tensors (meant for tests and oracles)
  nothing is rounded away, and the argument above does not apply.
- Noise added on one rank before a cross-rank sum is rounded before the other ranks' terms join it;
  the once-rounded argument covers the value it was added to, not the later sums.
- Equality bit for bit holds where float64 arithmetic is IEEE-754 (below); a platform that broke
  that would change values, not privacy: each coordinate is still drawn once, by whoever owns it.

Same bits everywhere (new in v2)
--------------------------------
The keystream is integer arithmetic, the same in OpenSSL and in dpscale/noise_torch.py (the scheme
in torch operations on a tensor's own device, `select_generator`). The float64 transform calls no
library transcendental: ln u and sin(phi) are polynomials (`log_series_into`, `sin_series_into`)
that both generators run as the same operations in the same order, and every operation is either
exact (53-bit integers to float64, products with powers of two, frexp and ldexp, sign flips and
swaps by bit masks) or an IEEE-754 correctly rounded +, -, *, / or sqrt (numpy's sqrt is; torch's
is corrected by `noise_torch._sqrt`), one per pass over an array, so no compiler fuses a multiply
and an add into an FMA. No intermediate is subnormal, so flush-to-zero modes change nothing either.
Hence float64 outputs, and every rounding of them, are the same on any machine and device.
Scheme v1 took ln u from numpy's log and torch's log, which differ in the last bit for about 0.3%
of arguments (float64 outputs up to 2 ulps apart, float32 equal but for about 2^-28 of those);
v2 changed the values and the name (the subkey's message holds it), so no value of v1 reappears.
A run resumed across the change is refused unless asked for (PrivacyEngine.load_state_dict).
"""

from __future__ import annotations

import decimal
import hashlib
import hmac
import logging
import math
import numbers
import operator
import os
import stat
import tempfile
from typing import Iterator, NoReturn

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from dpscale.errors import ConfigError

__all__ = ["SCHEME", "NoiseKey", "gaussian", "add_gaussian_noise_", "load_noise_key", "select_generator"]

logger = logging.getLogger(__name__)

SCHEME = "dpscale.noise.gaussian.v2"
"""Names the construction above; a privacy report records it with the key's fingerprint."""

_KEY_BYTES = 32
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
_WORDS_PER_BLOCK = 8  # 64-byte ChaCha20 block = 8 words of 64 bits; word j feeds element j
_BLOCKS_PER_RANGE = 1 << 32  # what the 32-bit block counter of one nonce reaches
_MAX_ELEMENTS = 1 << 63
_MAX_STEP = 1 << 64
# Work is done on aligned pieces: every array handed to numpy and torch then holds a multiple of
# 16 pairs, so SIMD kernels have no scalar tails and an element's value does not depend on where
# a request's boundaries fall. _CHUNK keeps the float64 temporaries in cache.
_ALIGN = 32
_CHUNK = 1 << 16
_U53 = 2.0**-53
_PHI_SCALE = (math.pi / 4.0) * 2.0**-53


class NoiseKey:
    """The 32 secret bytes all noise is derived from.

    Held apart from every other object on purpose: its repr shows only a fingerprint, it refuses to
    be pickled (so it cannot land in a checkpoint, a torch.save, or a spawned worker's arguments),
    and it has no state_dict. Every rank loads the same key from a file with `from_file`.
    """

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, (bytes, bytearray)):
            raise ConfigError(
                f"NoiseKey needs {_KEY_BYTES} bytes, got {type(secret).__name__}; use "
                "NoiseKey.generate() or NoiseKey.from_file(path)."
            )
        if len(secret) != _KEY_BYTES:
            raise ConfigError(
                f"NoiseKey needs exactly {_KEY_BYTES} bytes, got {len(secret)}; use "
                "NoiseKey.generate() or NoiseKey.from_file(path)."
            )
        object.__setattr__(self, "_secret", bytes(secret))

    @classmethod
    def generate(cls) -> "NoiseKey":
        """A fresh key from the operating system's CSPRNG."""
        return cls(os.urandom(_KEY_BYTES))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "NoiseKey":
        """Load a key file holding either the 32 raw bytes or 64 hexadecimal characters."""
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                data = f.read(4 * _KEY_BYTES + 1)
                mode = os.fstat(f.fileno()).st_mode
        except FileNotFoundError:
            raise ConfigError(
                f"no noise key file at {path!r}; create one once with NoiseKey.write_new(path) "
                "and give every rank the same file."
            ) from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):  # as ssh does with private keys
            raise ConfigError(
                f"noise key file {path!r} can be read by other users (mode {stat.S_IMODE(mode):o}): "
                f"whoever reads the key can subtract the noise. Run `chmod 600 {path}` and start again."
            )
        if len(data) == _KEY_BYTES:
            return cls(data)
        text = data.strip()
        if len(text) == 2 * _KEY_BYTES and set(text) <= _HEX_DIGITS:
            return cls(bytes.fromhex(text.decode("ascii")))
        raise ConfigError(
            f"{path!r} is not a noise key: expected exactly {_KEY_BYTES} raw bytes or "
            f"{2 * _KEY_BYTES} hexadecimal characters, found {len(data)} bytes of something else. "
            "Create a key with NoiseKey.write_new(path)."
        )

    @classmethod
    def write_new(cls, path: str | os.PathLike) -> "NoiseKey":
        """Create a new key file (hex, mode 0o600) and return its key; never overwrite one.

        The file appears complete or not at all: the key is written to a private temporary file
        in the same directory and hard-linked into place, which fails if `path` exists.
        """
        path = os.fspath(path)
        key = cls.generate()
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".dpscale-key-", dir=directory)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key._secret.hex().encode("ascii") + b"\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise ConfigError(
                    f"{path!r} already exists; NoiseKey.write_new never overwrites a key (the "
                    "runs that used it could no longer be reproduced). Load it with "
                    "NoiseKey.from_file, or choose a new path."
                ) from None
        finally:
            os.unlink(tmp)
        logger.info("wrote new noise key %s to %s", key.fingerprint, path)
        return key

    @property
    def fingerprint(self) -> str:
        """First 8 hex digits of SHA-256 of the key: tells keys apart, reveals nothing usable."""
        return hashlib.sha256(self._secret).hexdigest()[:8]

    def derive_seed(self, purpose: str) -> bytes:
        """32 secret bytes for another random process of the run (Poisson sampling), keyed by
        this key: the batches are as unpredictable as the noise, and resuming with the same key
        file draws the same batches, without the seed ever being stored."""
        message = b"dpscale.derive.v1\x00" + purpose.encode()
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def __repr__(self) -> str:
        return f"NoiseKey(fingerprint={self.fingerprint})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NoiseKey):
            return NotImplemented
        return hmac.compare_digest(self._secret, other._secret)

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError("NoiseKey is immutable")

    def __copy__(self) -> "NoiseKey":
        return self  # immutable: sharing is copying, and copying must not go through pickle

    def __deepcopy__(self, memo: dict) -> "NoiseKey":
        return self

    def _refuse_pickle(self, *args: object) -> NoReturn:
        raise ConfigError(
            "a NoiseKey cannot be pickled: a key must never be written into a checkpoint or sent "
            "between processes. Keep it in its key file (NoiseKey.write_new) and load it on every "
            "rank with NoiseKey.from_file(path); leave it out of what you save."
        )

    __reduce__ = _refuse_pickle
    __reduce_ex__ = _refuse_pickle
    __getstate__ = _refuse_pickle


def load_noise_key(key: "NoiseKey | str | os.PathLike | None") -> NoiseKey:
    """The one place a noise key is loaded: a NoiseKey as it is, a path through ``from_file``, None
    as a fresh key, which is refused when torch.distributed runs several processes (every rank must
    read the same key file: the noise of each coordinate and the Poisson batches derive from it)."""
    if isinstance(key, NoiseKey):
        return key
    if key is not None:
        return NoiseKey.from_file(key)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        raise ConfigError(
            "Several processes need one noise key shared by all ranks (the noise of each coordinate and the "
            "Poisson batches derive from it): create it once with dpscale.NoiseKey.write_new(path) and pass "
            "noise_key=path on every rank."
        )
    return NoiseKey.generate()


def _subkey(key: NoiseKey, step: int, name: str) -> bytes:
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
    return hmac.digest(key._secret, message, "sha256")


def _counter_words(block):
    """ChaCha20 state words 12..15 of keystream block `block` (an int, or an int64 tensor of
    them): the one counter layout both generators use. Word 12 is RFC 8439's 32-bit block counter,
    words 13..15 its 12-byte nonce, holding the 64-bit little-endian range number (k div 2^32) and
    4 zero bytes; block k is block (k mod 2^32) of that range. Requests end below 2^63 elements, so
    k < 2^60, words 14 and 15 are zero, and words 12 and 13 act as one 64-bit counter."""
    range_index = block >> 32
    return block & 0xFFFFFFFF, range_index & 0xFFFFFFFF, range_index >> 32, 0


def _keystream_into(subkey: bytes, first_block: int, zeros: bytes, out: bytearray) -> None:
    """Fill `out` with the keystream from the start of block `first_block` on, splitting where
    the 32-bit counter of one nonce would wrap (`cryptography` refuses to wrap it). The keystream
    is the encryption of `zeros` (at least as long as `out`)."""
    source, target = memoryview(zeros), memoryview(out)
    block, done = first_block, 0
    while done < len(out):
        nblocks = min(-(-(len(out) - done) // 64), _BLOCKS_PER_RANGE - block % _BLOCKS_PER_RANGE)
        nonce = b"".join(word.to_bytes(4, "little") for word in _counter_words(block))
        size = min(64 * nblocks, len(out) - done)
        encryptor = Cipher(algorithms.ChaCha20(subkey, nonce), mode=None).encryptor()
        encryptor.update_into(source[:size], target[done : done + size])
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


# sin(x) = x + x^3 * sum_k (-1)^k x^(2k-2) / (2k+1)!, k = 1..8: on [0, pi/4] the first omitted term
# is below 1e-19 of x, so the sum is exact to float64 rounding.
_SIN_TAYLOR = tuple((-1) ** k / math.factorial(2 * k + 1) for k in range(1, 9))


def _sin_to_quarter_pi(x: np.ndarray, out: np.ndarray, work: np.ndarray) -> np.ndarray:
    """sin(x) for x in [0, pi/4], in float64, within 1 ulp (checked against a 120-bit sine; about 2%
    of values are 1 ulp off correct rounding). Plain numpy passes: as fast as torch's vectorised
    sin on one intra-op thread and faster when torch runs several (measured side by side: 616 us
    against 820 us per 65536 elements with 2), whose thread pool costs more than a 256 KiB array
    gains. The x + small-correction form keeps tiny outputs as accurate, relatively, as large ones."""
    np.multiply(x, x, out=work)
    return sin_series_into(x, work, out)


def sin_series_into(x, square, out):
    """The Taylor passes of ``_sin_to_quarter_pi`` into ``out``, given ``square`` = x * x: in-place
    operators only, so numpy arrays (the host generator) and torch tensors (``noise_torch``) run
    the same operations in the same order and round alike."""
    out[...] = _SIN_TAYLOR[-1]
    for coefficient in reversed(_SIN_TAYLOR[:-1]):
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
_LOG_POLY = (0.6666666666666735, 0.3999999999940701, 0.2857142874425773, 0.22222198365590634,
             0.18183575881489203, 0.1531373632044412, 0.14799271284498053)
_SQRT2 = math.sqrt(2.0)  # correctly rounded; it only decides the reduction, the same in both generators


def _ln2_split() -> tuple[float, float]:
    """ln 2 as hi + lo: hi has 43 significant bits, so k * hi is exact for every k < 2^10 (here
    k <= 54), and lo is the float64 nearest ln 2 - hi, from a 40-digit ln 2 (decimal's ln is
    correctly rounded)."""
    with decimal.localcontext() as context:
        context.prec = 40
        ln2 = decimal.Decimal(2).ln()
        hi = math.ldexp(math.floor(math.ldexp(float(ln2), 44)), -44)
        return hi, float(ln2 - decimal.Decimal(hi))


_LN2_HI, _LN2_LO = _ln2_split()


def _reduce_unit(u: np.ndarray, scratch: _Scratch) -> tuple[np.ndarray, np.ndarray]:
    """(m, k) with u = m * 2^-k exactly, m in [sqrt(1/2), sqrt(2)] and k an integer in [0, 53],
    for float64 u in [2^-53, 1]: e = frexp's exponent of u * sqrt(2) (a rounded product, used only
    to choose e), k = 1 - e, m = ldexp(u, k). frexp and ldexp are exact, so any implementation
    of this rule (noise_torch's works on the bits) gives the same m and k. In scratch.m, scratch.k."""
    n = u.shape[0]
    m, k, exponent = scratch.m[:n], scratch.k[:n], scratch.exponent[:n]
    np.multiply(u, _SQRT2, out=m)
    np.frexp(m, out=(m, exponent))
    np.subtract(1, exponent, out=exponent)
    np.ldexp(u, exponent, out=m)
    np.copyto(k, exponent)
    return m, k


def _log_unit(u: np.ndarray, out: np.ndarray, scratch: _Scratch) -> np.ndarray:
    """ln(u) for float64 u in [2^-53, 1], into `out` (which may be `u`), within 0.88 ulp (measured
    against a 160-bit log; tests/test_noise.py). numpy's own log is as accurate, but its last bit
    is the build's (AVX-512 code or the C library's) and torch's log differs from it in about 0.3%
    of arguments; this one is exact reductions and IEEE-754 +, -, *, / only, so dpscale.noise_torch,
    which makes the same reduction and runs the same `log_series_into`, gets the same bits on any
    device. scratch.sin, .cos and .phi are its work arrays (_box_muller fills them later)."""
    n = u.shape[0]
    m, k = _reduce_unit(u, scratch)
    return log_series_into(m, k, out, (scratch.sin[:n], scratch.cos[:n], scratch.phi[:n]))


def log_series_into(m, k, out, work):
    """ln(m * 2^-k) into ``out``, for float64 m in [sqrt(1/2), sqrt(2)] (about) and integer-valued
    float64 k in [0, 54], given as numpy arrays (the host generator) or torch tensors
    (``noise_torch``): the operations are the same, in the same order, each one exact or an
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
    namespace.multiply(z, _LOG_POLY[-1], out=out)
    for coefficient in reversed(_LOG_POLY[:-1]):
        out += coefficient
        out *= z
    namespace.multiply(f, f, out=h)
    h *= 0.5
    out += h
    out *= s  # s * (h + R)
    namespace.multiply(k, -_LN2_LO, out=z)
    out += z  # s * (h + R) - k * ln2_lo
    h -= out
    f -= h  # ln m - k * ln2_lo
    namespace.multiply(k, -_LN2_HI, out=out)  # exact
    out += f
    return out


def _box_muller(words: np.ndarray, scratch: _Scratch | None = None) -> np.ndarray:
    """Standard normals in float64, one per 64-bit word, by the octant-reduced Box-Muller map
    described in the module docstring. Every step is a whole-array pass (no per-element Python),
    written into `scratch` so that no pass allocates; the result is `scratch.z`'s prefix."""
    s = scratch if scratch is not None else _Scratch(words.shape[0])
    n = words.shape[0] // 2
    pairs = words.reshape(n, 2)
    w, octant, r, phi = s.w[:n], s.octant[:n], s.r[:n], s.phi[:n]
    sin_phi, cos_phi, mask, z = s.sin[:n], s.cos[:n], s.mask[:n], s.z[: 2 * n]
    np.right_shift(pairs[:, 0], np.uint64(11), out=w)
    w += np.uint64(1)
    np.multiply(w.view(np.int64), _U53, out=r)  # u in (0, 1], exact
    _log_unit(r, out=r, scratch=s)  # phi, sin and cos are its work arrays until they are computed
    r *= -2.0
    np.sqrt(r, out=r)
    np.right_shift(pairs[:, 1], np.uint64(11), out=w)
    np.multiply(w.view(np.int64), _PHI_SCALE, out=phi)  # [0, pi/4)
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
    limits = (("step", step, _MAX_STEP), ("numel", numel, _MAX_ELEMENTS), ("offset", offset, _MAX_ELEMENTS))
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
    if offset + numel > _MAX_ELEMENTS:
        raise ConfigError(
            f"noise elements [offset, offset + numel) = [{offset}, {offset + numel}) run past 2^63."
        )
    return step, numel, offset


def _standard_normal_pieces(
    key: NoiseKey, step: int, name: str, numel: int, offset: int
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (position in the request, float64 values) covering elements offset..offset+numel-1,
    each piece computed from aligned, cache-sized spans of the stream. A piece is scratch memory:
    the consumer may overwrite it, and must be done with it before asking for the next."""
    subkey = _subkey(key, step, name)
    end = offset + numel
    lo = offset - offset % _ALIGN
    hi = -(-end // _ALIGN) * _ALIGN
    buffer = bytearray(8 * min(_CHUNK, hi - lo))
    zeros = bytes(len(buffer))
    scratch = _Scratch(len(buffer) // 8)
    for start in range(lo, hi, _CHUNK):
        stop = min(start + _CHUNK, hi)
        chunk = buffer if 8 * (stop - start) == len(buffer) else bytearray(8 * (stop - start))
        _keystream_into(subkey, start // _WORDS_PER_BLOCK, zeros, chunk)
        z = _box_muller(np.frombuffer(chunk, dtype="<u8"), scratch)
        first, last = max(start, offset), min(stop, end)
        yield first - offset, z[first - start : last - start]


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
    numpy on the CPU, the fastest there) or "torch" (dpscale.noise_torch, the same values computed
    by tensor operations where the tensor lives, so a GPU gradient is never copied to the host and
    back). "auto" takes "host" for CPU tensors and "torch" for every other device; either can be
    forced. There is no third choice: nothing ever falls back to a non-keyed generator."""
    if generator not in _GENERATORS:
        raise ConfigError(
            f"noise generator must be one of {', '.join(map(repr, _GENERATORS))}, got {generator!r}."
        )
    if generator != "auto":
        return generator
    return "host" if torch.device(device).type == "cpu" else "torch"


_GENERATORS = ("auto", "host", "torch")


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
) -> torch.Tensor:
    """Elements offset..offset+numel-1 of the flattened N(0, 1) noise of parameter `name` at
    `step`, as a 1-D tensor of `dtype` on `device` (computed in float64, then rounded).

    Any split of a parameter into slices gives the same values as one call over the whole. To add
    noise to a gradient, prefer `add_gaussian_noise_`, which rounds only after the addition.
    `generator` is as in `select_generator`.
    """
    step, numel, offset = _check_request(key, step, name, numel, offset)
    dtype = _check_dtype(dtype)
    if select_generator(device, generator) == "torch":
        from dpscale import noise_torch  # it builds on this module's layout and checks

        return noise_torch.gaussian(key, step, name, numel, offset, dtype, device)
    out = torch.empty(numel, dtype=dtype)
    for position, z in _standard_normal_pieces(key, step, name, numel, offset):
        out[position : position + z.shape[0]] = torch.from_numpy(z)
    return out.to(device)


def add_gaussian_noise_(
    tensor: torch.Tensor,
    key: NoiseKey,
    step: int,
    name: str,
    std: float,
    offset: int = 0,
    *,
    generator: str = "auto",
) -> torch.Tensor:
    """Add std * N(0, 1) noise in place to `tensor` viewed flat (row-major), its element i taking
    element offset + i of parameter `name`'s noise at `step`; returns `tensor`.

    Each element becomes round(x + std * z), computed in float64 and rounded once to the tensor's
    dtype, so the released bits are a post-processing of a Gaussian mechanism's output (see the
    module docstring). `std` is the caller's (noise multiplier times clipping norm). A tensor on
    an accelerator is noised where it lives, by dpscale.noise_torch (`select_generator`).
    """
    std = _check_target(tensor, std)
    step, numel, offset = _check_request(key, step, name, tensor.numel(), offset)
    if select_generator(tensor.device, generator) == "torch":
        from dpscale import noise_torch

        return noise_torch.add_gaussian_noise_(tensor, key, step, name, std, offset)
    target = tensor.detach()  # shares storage: in-place writes reach `tensor`, autograd stays out
    on_cpu_flat = target.device.type == "cpu" and target.is_contiguous()
    flat = target.view(-1) if on_cpu_flat else target.reshape(-1).to("cpu", copy=True)
    as_numpy = flat.dtype in (torch.float32, torch.float64)  # numpy rounds float64 -> float32 as torch does
    for position, z in _standard_normal_pieces(key, step, name, numel, offset):
        piece = flat[position : position + z.shape[0]]
        z *= std  # the piece is ours until the next one: x + std * z in float64, in place
        if as_numpy:
            values = piece.numpy()
            z += values
            np.copyto(values, z, casting="same_kind")  # the one rounding
        else:
            z_tensor = torch.from_numpy(z)
            z_tensor += piece
            piece.copy_(z_tensor)
    if not on_cpu_flat:
        target.copy_(flat.view(target.shape))
    return tensor
