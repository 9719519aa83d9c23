"""Privacy state on disk: written atomically (a crash never leaves half a file where the last good
one was) and read with ``torch.load(weights_only=True)`` (no code runs on load)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from dpscale.errors import ConfigError


def save_atomic(state: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(state, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_state(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"No privacy state at {path}.")
    state = torch.load(path, weights_only=True)
    if not isinstance(state, dict):
        raise ConfigError(f"{path} does not hold a dpscale privacy state.")
    return state
