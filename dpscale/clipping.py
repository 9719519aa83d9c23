"""Clipping: which parameters share a norm (groups), their thresholds, and the clip functions.

Each example's clipped gradient has norm at most sqrt(sum_k R_k^2) = max_grad_norm: that bound is
the sensitivity the noise is calibrated to, carried by the plan rather than recomputed elsewhere.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from dpscale.config import DPConfig
from dpscale.errors import ConfigError


@dataclass(frozen=True)
class ClippingPlan:
    groups: tuple[tuple[str, ...], ...]
    thresholds: tuple[float, ...]
    clip_fn: str
    gamma: float
    mode: str = "groups"  # "flat", "per_layer" or "groups": how the groups were given
    max_grad_norm: float | None = None  # R, whose square the thresholds' squares add up to

    @property
    def sensitivity(self) -> float:
        """The L2 bound on one example's clipped gradient over all groups."""
        return math.sqrt(sum(r * r for r in self.thresholds))

    def group_of(self) -> dict[str, int]:
        return {name: k for k, group in enumerate(self.groups) for name in group}

    def factors(self, norms: Tensor, thresholds: tuple[float, ...] | None = None) -> Tensor:
        """[K, B] clip factors from [K, B] per-group per-example norms, at the plan's thresholds or
        at ``thresholds`` (adaptive clipping's of the step)."""
        thresholds = self.thresholds if thresholds is None else thresholds
        thresholds = torch.tensor(thresholds, dtype=norms.dtype, device=norms.device)[:, None]
        if self.clip_fn == "abadi":
            return (thresholds / norms).clamp(max=1.0)  # a zero norm gives inf, clamped to 1
        return thresholds / (norms + self.gamma)


def build_plan(config: DPConfig, trainable: list[str]) -> ClippingPlan:
    if config.clipping == "flat":
        groups = [tuple(trainable)]
    elif config.clipping == "per_layer":
        groups = [(name,) for name in trainable]
    else:
        groups = _resolve_groups(config.clipping, trainable)
    if config.group_max_grad_norms is not None:
        if len(config.group_max_grad_norms) != len(groups):
            raise ConfigError(
                f"group_max_grad_norms has {len(config.group_max_grad_norms)} thresholds for {len(groups)} groups."
            )
        thresholds = tuple(config.group_max_grad_norms)
    else:
        thresholds = (config.max_grad_norm / math.sqrt(len(groups)),) * len(groups)
    mode = config.clipping if isinstance(config.clipping, str) else "groups"
    return ClippingPlan(tuple(groups), thresholds, config.clip_fn, config.automatic_gamma, mode, config.max_grad_norm)


def _resolve_groups(patterns: tuple[tuple[str, ...], ...], trainable: list[str]) -> list[tuple[str, ...]]:
    membership: dict[str, list[int]] = {name: [] for name in trainable}
    for k, group in enumerate(patterns):
        for pattern in group:
            matched = [name for name in trainable if name == pattern or fnmatch.fnmatchcase(name, pattern)]
            if not matched:
                raise ConfigError(f"Clipping group {k} entry {pattern!r} matches no trainable parameter.")
            for name in matched:
                if k not in membership[name]:
                    membership[name].append(k)
    missing = [name for name, ks in membership.items() if not ks]
    if missing:
        raise ConfigError(
            f"Every trainable parameter must belong to a clipping group; not covered: {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}. Add them to a group or freeze them."
        )
    doubled = [name for name, ks in membership.items() if len(ks) > 1]
    if doubled:
        raise ConfigError(f"Parameters in more than one clipping group: {doubled[:5]}.")
    return [tuple(name for name in trainable if membership[name] == [k]) for k in range(len(patterns))]
