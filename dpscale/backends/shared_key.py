"""Every rank of a data-parallel group must hold the same noise key.

Each coordinate's noise is drawn by the one rank that owns it, and the Poisson batches are one
draw every rank makes from a seed derived from the key: ranks with different keys would still
noise every coordinate once, but their parts of the "global" batch would come from different
draws, so some examples could be used twice and others never, and the accountant's sampling
assumption would be false. The check compares fingerprints (never the key) once, when a backend
is bound to its engine; it catches the common mistake of leaving ``noise_key`` unset, which gives
every rank a fresh random key.
"""

from __future__ import annotations

import torch.distributed as dist

from dpscale.errors import ConfigError

__all__ = ["check_same_key"]


def check_same_key(fingerprint: str, group=None) -> None:
    """Raise unless every rank of ``group`` holds a key with this ``fingerprint``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return
    fingerprints: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(fingerprints, fingerprint, group=group)
    if len(set(fingerprints)) != 1:
        raise ConfigError(
            f"The ranks hold different noise keys (fingerprints {sorted(set(fingerprints))}): every rank must "
            "load the same key file, or the batches are not one Poisson draw. Create the file once with "
            "dpscale.NoiseKey.write_new(path) and pass noise_key=dpscale.NoiseKey.from_file(path) on every rank "
            "(leaving noise_key unset gives each rank its own random key)."
        )
