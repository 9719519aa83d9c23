"""A keyed on-disk copy of a de-quantized GGUF model, so that de-quantizing runs once per machine.

De-quantizing the packaged SmolLM2-135M GGUF file into float32 takes 30 to 60 s on two cores, at
every ``dpscale train`` and every test that loads it; the same float weights read back from
safetensors take about a second. The copy is keyed by everything that decides its values: the
GGUF file's SHA-256, the dtype, and the versions of transformers and gguf that de-quantized it
(a changed file or a new de-quantizer never reuses an old copy). It is built in a temporary folder
and renamed into place whole, so a crash or a second process never leaves a half copy under a key;
two processes that both miss (``accelerate launch`` ranks) each build one and the first rename wins.

Where: ``$DPSCALE_CACHE_DIR`` if set (``off`` turns the cache off), else ``$XDG_CACHE_HOME/dpscale``,
else ``~/.cache/dpscale``; copies live in ``<root>/gguf/<key>`` (about 0.54 GB for SmolLM2-135M in
float32) and may be deleted at any time. A cache that cannot be written is a warning, never a
failed job: the model is then used as de-quantized.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["CACHE_ENV", "cache_root", "cache_key", "cached_copy", "copy_folder", "publish", "published"]

logger = logging.getLogger(__name__)

CACHE_ENV = "DPSCALE_CACHE_DIR"
# Bumped when what a copy holds or how it is written changes.
_LAYOUT = 1
_MANIFEST = "dpscale_gguf_copy.json"


def cache_root() -> Path | None:
    """The cache folder, or None when ``DPSCALE_CACHE_DIR=off``."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen is not None:
        if chosen.strip().lower() in ("off", "0", "none", ""):
            return None
        return Path(chosen).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dpscale"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _key_fields(gguf_path: Path, dtype: torch.dtype) -> dict:
    return {
        "layout": _LAYOUT,
        "gguf_sha256": _sha256(gguf_path),
        "dtype": str(dtype).removeprefix("torch."),
        "transformers": _version("transformers"),
        "gguf": _version("gguf"),
    }


def cache_key(gguf_path: str | os.PathLike, dtype: torch.dtype) -> str:
    """The folder name of `gguf_path` de-quantized to `dtype` by the installed de-quantizer."""
    return _key_of(_key_fields(Path(gguf_path), dtype))


def _key_of(fields: dict) -> str:
    text = json.dumps(fields, sort_keys=True)
    return f"{fields['dtype']}-{hashlib.sha256(text.encode()).hexdigest()[:24]}"


def _complete(folder: Path) -> bool:
    return (folder / _MANIFEST).is_file() and (folder / "config.json").is_file()


def copy_folder(gguf_path: str | os.PathLike, dtype: torch.dtype, root: Path) -> Path:
    """Where the copy of `gguf_path` in `dtype` lives under `root`, made or not (hashes the file once)."""
    return root / "gguf" / cache_key(gguf_path, dtype)


def published(folder: Path) -> Path | None:
    """`folder` if a whole copy was published there, else None."""
    return folder if _complete(folder) else None


def cached_copy(gguf_path: str | os.PathLike, dtype: torch.dtype, root: Path | None) -> Path | None:
    """The published copy of `gguf_path` in `dtype` under `root`, or None."""
    return None if root is None else published(copy_folder(gguf_path, dtype, root))


def publish(
    gguf_path: str | os.PathLike,
    dtype: torch.dtype,
    root: Path | None,
    write: Callable[[Path], None],
) -> Path | None:
    """Build a copy with ``write(folder)`` (save_pretrained of the model and its tokenizer) and
    rename it into place under its key; returns the published folder (this one or a concurrent
    winner's), or None when the cache is off or cannot be written (logged)."""
    if root is None:
        return None
    gguf_path = Path(gguf_path)
    fields = _key_fields(gguf_path, dtype)
    target = root / "gguf" / _key_of(fields)
    scratch = root / "gguf" / f".partial-{uuid.uuid4().hex}"
    try:
        scratch.mkdir(parents=True)
        write(scratch)
        manifest = dict(fields, source=str(gguf_path.resolve()))
        (scratch / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            os.replace(scratch, target)
        except OSError:
            if not _complete(target):  # not a concurrent winner's copy: an incomplete folder (by hand, an old
                stale = root / "gguf" / f".partial-{uuid.uuid4().hex}"  # layout), never trusted: set aside
                os.replace(target, stale)
                shutil.rmtree(stale, ignore_errors=True)
                os.replace(scratch, target)
    except Exception as err:  # a full disk, a read-only home, a serializer error: the copy is only a shortcut
        logger.warning("could not keep the de-quantized copy of %s under %s (%s); it will be "
                       "de-quantized again next time (set %s to a writable folder, or 'off')",
                       gguf_path.name, root, err, CACHE_ENV)
        return None
    finally:
        with contextlib.suppress(OSError):
            if scratch.exists():
                shutil.rmtree(scratch)
    logger.info("kept the de-quantized %s in %s: later loads read it instead of de-quantizing",
                gguf_path.name, target)
    return target
