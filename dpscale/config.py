"""DPConfig: every knob that changes the privacy guarantee, validated when it is built.

Knobs that cannot change the guarantee (micro-batch size, which norm method a layer uses) do not
live here; they are the engine's business.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from dpscale.errors import ConfigError

CLIP_FUNCTIONS = ("abadi", "automatic")
CLIPPING_MODES = ("flat", "per_layer")


@dataclass(frozen=True)
class DPConfig:
    """The DP-SGD step: g = (sum_i clip(g_i) + N(0, sigma^2 R^2 I)) / B.

    max_grad_norm: R, the bound on each example's clipped gradient (its sensitivity).
    noise_multiplier: sigma; the noise std is sigma * R / expected_batch_size.
    expected_batch_size: B = q * N, the expected logical batch size; the clipped sum is divided
        by B (never by the realised Poisson batch size, which would leak it).
    clipping: "flat" (one norm over all trainable parameters), "per_layer" (one group per
        parameter tensor), or a list of groups, each a list of parameter names or fnmatch
        patterns; every trainable parameter must fall in exactly one group.
    group_max_grad_norms: thresholds R_k of the groups; their squares must add to R^2. Default:
        R / sqrt(K) each.
    clip_fn: "abadi" (min(1, R_k / ||g_i||_k)) or "automatic" (R_k / (||g_i||_k + gamma), AUTO-S).
    automatic_gamma: gamma of automatic clipping (> 0).
    """

    max_grad_norm: float
    expected_batch_size: float
    noise_multiplier: float = 0.0
    clipping: str | Sequence[Sequence[str]] = "flat"
    group_max_grad_norms: Sequence[float] | None = None
    clip_fn: str = "abadi"
    automatic_gamma: float = 0.01

    def __post_init__(self) -> None:
        if not _positive(self.max_grad_norm):
            raise ConfigError(f"max_grad_norm must be a positive finite number, got {self.max_grad_norm!r}.")
        if not _positive(self.expected_batch_size):
            raise ConfigError(
                f"expected_batch_size must be positive (sample_rate * dataset_size), got {self.expected_batch_size!r}."
            )
        if self.noise_multiplier is None or not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ConfigError(f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier!r}.")
        if self.clip_fn not in CLIP_FUNCTIONS:
            raise ConfigError(f"clip_fn must be one of {CLIP_FUNCTIONS}, got {self.clip_fn!r}.")
        if self.clip_fn == "automatic" and not _positive(self.automatic_gamma):
            raise ConfigError(f"automatic_gamma must be > 0 (gamma = 0 divides by a zero norm), got {self.automatic_gamma!r}.")
        if isinstance(self.clipping, str):
            if self.clipping not in CLIPPING_MODES:
                raise ConfigError(f"clipping must be one of {CLIPPING_MODES} or a list of parameter groups, got {self.clipping!r}.")
        else:
            groups = [list(group) for group in self.clipping]
            if not groups or any(not group or not all(isinstance(p, str) for p in group) for group in groups):
                raise ConfigError("clipping groups must be a non-empty list of non-empty lists of parameter names.")
            object.__setattr__(self, "clipping", tuple(tuple(group) for group in groups))
        if self.group_max_grad_norms is not None:
            norms = tuple(float(r) for r in self.group_max_grad_norms)
            if not all(_positive(r) for r in norms):
                raise ConfigError("group_max_grad_norms must all be positive.")
            total = math.sqrt(sum(r * r for r in norms))
            if not math.isclose(total, self.max_grad_norm, rel_tol=1e-6):
                raise ConfigError(
                    f"The group thresholds' squares must add up to max_grad_norm^2 (so that each example's "
                    f"clipped gradient has norm <= max_grad_norm); sqrt(sum R_k^2) = {total:.6g}, "
                    f"max_grad_norm = {self.max_grad_norm}."
                )
            object.__setattr__(self, "group_max_grad_norms", norms)


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
