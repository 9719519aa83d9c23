"""Privacy and training state on disk: written atomically (a crash never leaves half a file where
the last good one was), sealed with a SHA-256 of its content, and read with
``torch.load(weights_only=True)`` (no code runs on load).

Why a hash on top of the atomic write
-------------------------------------
``os.replace`` protects against a crash of this process, not against what happens to the file
afterwards: a copy cut short (rsync, a full disk on a shared filesystem), a flipped block, or the
wrong file put in place. A privacy state that half-loads, or loads numbers that were never written,
would resume with a step counter or an accountant history that does not match what the run
released. So every file carries the digest of its payload, checked before anything is unpickled,
and a file that fails the check is refused whole, with the caller's state untouched.

Layout (container version 1)::

    DPSCALE-CHECKPOINT 1\\n
    kind <kind>\\n            "privacy" (engine.save_checkpoint) or "train-state" (dpscale train)
    size <bytes>\\n           of the payload
    sha256 <64 hex>\\n        of  kind || 0x00 || payload
    \\n
    <payload: torch.save of the state dict>

The kind is inside the digest, so a training state put where a privacy state belongs is refused.
Files written before the container existed (a bare ``torch.save`` zip) are still read, with a
warning that they cannot be checked; the next save rewrites them sealed.

Read such a file with ``dpscale.checkpoint.load_state(path, kind=...)``, not ``torch.load``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
from pathlib import Path

import torch

from dpscale.errors import CheckpointError

__all__ = ["CONTAINER_VERSION", "load_state", "save_atomic"]

logger = logging.getLogger(__name__)

CONTAINER_VERSION = 1
_MAGIC = b"DPSCALE-CHECKPOINT "
_KINDS = ("privacy", "train-state")
_ZIP = b"PK\x03\x04"  # a bare torch.save file: written before the container existed
_MAX_HEADER = 512


def _digest(kind: str, payload: bytes) -> str:
    return hashlib.sha256(kind.encode("ascii") + b"\x00" + payload).hexdigest()


def save_atomic(state: dict, path: str | os.PathLike, *, kind: str = "privacy") -> Path:
    """Write ``state`` sealed with its SHA-256 to ``path``: a temporary file in the same directory,
    fsynced, then renamed over the old one. The payload is serialized in memory first (its digest
    heads the file), so saving briefly holds a second copy of the state."""
    if kind not in _KINDS:
        raise CheckpointError(f"checkpoint kind must be one of {_KINDS}, got {kind!r}.")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    header = (
        _MAGIC + f"{CONTAINER_VERSION}\nkind {kind}\nsize {len(payload)}\n"
        f"sha256 {_digest(kind, payload)}\n\n".encode("ascii")
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(header)
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_state(path: str | os.PathLike, *, kind: str = "privacy") -> dict:
    """The state dict saved at ``path`` by ``save_atomic(..., kind=kind)``, after its digest is
    checked; anything else (missing, torn, altered, another kind, not a dpscale file) raises
    CheckpointError before a byte of it is unpickled."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No dpscale checkpoint at {path}.")
    data = path.read_bytes()
    if data.startswith(_ZIP):
        logger.warning(
            "%s was written before dpscale sealed checkpoints with a SHA-256: it is read unchecked; the next "
            "save rewrites it sealed.", path,
        )
        return _unpickle(data, path, kind)
    if not data.startswith(_MAGIC):
        raise CheckpointError(
            f"{path} is not a dpscale checkpoint (it does not start with {_MAGIC.decode().strip()!r}); point to the "
            "checkpoint the run wrote, or remove the folder to start over."
        )
    end = data.find(b"\n\n", 0, _MAX_HEADER)
    fields = _header_fields(data[:end] if end >= 0 else b"")
    if fields is None:
        raise CheckpointError(f"{path} has a damaged dpscale checkpoint header; remove it to start over.")
    if fields["version"] != str(CONTAINER_VERSION):
        raise CheckpointError(
            f"{path} is a dpscale checkpoint container of version {fields['version']}, this dpscale reads version "
            f"{CONTAINER_VERSION}; resume it with the dpscale version that wrote it."
        )
    if fields["kind"] != kind:
        raise CheckpointError(
            f"{path} holds a {fields['kind']!r} checkpoint where a {kind!r} one was expected; point to the right "
            "file (privacy.pt holds the privacy state, state.pt the training state)."
        )
    payload = data[end + 2 :]
    if len(payload) != fields["size"]:
        raise CheckpointError(
            f"{path} is torn: its header announces {fields['size']} bytes of state, the file holds {len(payload)}. "
            "Nothing was loaded; restore the file from a copy or remove the checkpoint folder to start over."
        )
    if _digest(kind, payload) != fields["sha256"]:
        raise CheckpointError(
            f"{path} is damaged: the SHA-256 of its content does not match the one written with it. Nothing was "
            "loaded; restore the file from a copy or remove the checkpoint folder to start over."
        )
    return _unpickle(payload, path, kind)


def _header_fields(header: bytes) -> dict | None:
    lines = header.split(b"\n")
    if len(lines) != 4:
        return None
    try:
        version = lines[0][len(_MAGIC) :].decode("ascii")
        pairs = dict(line.decode("ascii").split(" ", 1) for line in lines[1:])
        return {"version": version, "kind": pairs["kind"], "size": int(pairs["size"]), "sha256": pairs["sha256"]}
    except (UnicodeDecodeError, ValueError, KeyError):
        return None


def _unpickle(payload: bytes, path: Path, kind: str) -> dict:
    try:
        state = torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as error:  # torch raises several types for a bad archive; the cause stays chained
        raise CheckpointError(
            f"{path} could not be read as a dpscale {kind} checkpoint ({type(error).__name__}); nothing was loaded. "
            "Remove the checkpoint folder to start over."
        ) from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a dpscale {kind} state (found a {type(state).__name__}).")
    return state
