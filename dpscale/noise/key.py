"""The secret of all keyed randomness in a run: the noise key, how it is stored and loaded, and the
one keyed function (HMAC-SHA256) that every stream of the run is derived from.

Only this module reads the secret bytes; the noise scheme
(`dpscale.noise.scheme.subkey`) and the Poisson batches (`NoiseKey.derive_seed`) reach it through
`keyed_digest`, so a key that never leaves its file and its object cannot leak through them.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
import tempfile
from typing import NoReturn

import torch

from dpscale.errors import ConfigError

__all__ = ["NoiseKey", "keyed_digest", "load_noise_key"]

logger = logging.getLogger(__name__)

_KEY_BYTES = 32
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
_DERIVE_DOMAIN = b"dpscale.derive.v1\x00"


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
    def generate(cls) -> NoiseKey:
        """A fresh key from the operating system's CSPRNG."""
        return cls(os.urandom(_KEY_BYTES))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> NoiseKey:
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
    def write_new(cls, path: str | os.PathLike) -> NoiseKey:
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
        return keyed_digest(self, _DERIVE_DOMAIN + purpose.encode())

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

    def __copy__(self) -> NoiseKey:
        return self  # immutable: sharing is copying, and copying must not go through pickle

    def __deepcopy__(self, memo: dict) -> NoiseKey:
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


def load_noise_key(key: NoiseKey | str | os.PathLike | None) -> NoiseKey:
    """The one place a noise key is loaded: a NoiseKey as it is, a path through ``from_file``, None
    as a fresh key, which is refused when torch.distributed runs several processes (every rank must
    read the same key file: the noise of each coordinate and the Poisson batches derive from it)."""
    if isinstance(key, NoiseKey):
        return key
    if key is not None:
        return NoiseKey.from_file(key)
    if (
        torch.distributed.is_available() and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        raise ConfigError(
            "Several processes need one noise key shared by all ranks (the noise of each coordinate and the "
            "Poisson batches derive from it): create it once with dpscale.NoiseKey.write_new(path) and pass "
            "noise_key=path on every rank."
        )
    return NoiseKey.generate()


def keyed_digest(key: NoiseKey, message: bytes) -> bytes:
    """HMAC-SHA256 of `message` under the key's secret: the PRF every keyed stream of a run is
    derived from (the noise subkeys, the sampling seed). Callers choose messages that no other
    caller can produce (a domain name, then fixed-width fields), so derived values never collide."""
    return hmac.digest(key._secret, message, "sha256")
