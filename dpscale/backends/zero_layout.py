"""DeepSpeed ZeRO's private partition layout, read in one place behind a version check.

The DeepSpeed backend adds the keyed noise where DeepSpeed's base optimizer steps: its fp32
partitions, each a concatenation of slices of flattened parameters. Which slice of which parameter
sits where is not a public DeepSpeed API; it is read here from the ZeRO optimizers' internals as
they are in DeepSpeed 0.19.x (``round_robin_bit16_groups``, ``bit16_groups_flat``,
``single_partition_of_fp32_groups``, ``partition_size``, ``real_dp_process_group`` for stages 1
and 2; ``fp16_groups``, ``fp32_partitioned_groups_flat``, ``partition_numel``, ``ds_process_group``
for stage 3). ``check_deepspeed_version`` refuses any other version before anything is read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch.distributed as dist
from torch import nn

from dpscale.backends.data_parallel import owned_range
from dpscale.errors import ConfigError

__all__ = ["PartitionSlice", "TESTED_DEEPSPEED", "check_deepspeed_version", "partition_slices"]

TESTED_DEEPSPEED = ((0, 19), (0, 20))  # [low, high): the internals below are those of 0.19.x


@dataclass(frozen=True)
class PartitionSlice:
    """Elements [start, start + numel) of parameter ``name`` sit at [position, position + numel)
    of one fp32 partition this rank updates."""

    name: str
    start: int
    position: int
    numel: int


def check_deepspeed_version() -> str:
    import deepspeed

    version = deepspeed.__version__
    parts = tuple(int(p) for p in version.split("+")[0].split(".")[:2])
    low, high = TESTED_DEEPSPEED
    if not (low <= parts < high):
        raise ConfigError(
            f"dpscale's DeepSpeed backend relies on DeepSpeed internals as of 0.19.x (coalesce_grad_reduction, "
            f"the ZeRO partition layout, the base optimizer's param groups) and found deepspeed {version}. "
            'Install "deepspeed>=0.19,<0.20".'
        )
    return version


def partition_slices(ds_engine, stage: int, base_optimizer, parameters: Mapping[str, nn.Parameter],
                     names: Mapping[int, str], rank: int, world_size: int) -> dict[int, list[PartitionSlice]]:
    """{id(fp32 tensor the base optimizer steps): slices of parameters this rank updates}. Stage 0
    has no partitions: each rank noises the elements ``owned_range`` gives it of every parameter."""
    check_deepspeed_version()
    zero = ds_engine.optimizer
    slices: dict[int, list[PartitionSlice]] = {}
    if stage == 0:
        stepped = {id(p) for group in base_optimizer.param_groups for p in group["params"]}
        if stepped != set(names):
            raise ConfigError("DeepSpeed's optimizer must update exactly the parameters the privacy engine clips.")
        for name, p in parameters.items():
            a, b = owned_range(p.numel(), rank, world_size)
            slices.setdefault(id(p), []).append(PartitionSlice(name, a, a, b - a))
    elif stage in (1, 2):
        for i, group in enumerate(zero.round_robin_bit16_groups):
            flat16 = zero.bit16_groups_flat[i]
            fp32 = zero.single_partition_of_fp32_groups[i]
            size = zero.partition_size[i]
            partition = dist.get_rank(group=zero.real_dp_process_group[i])
            lo, hi = partition * size, (partition + 1) * size
            if fp32.numel() != size:
                raise ConfigError(f"Unexpected ZeRO-{stage} partition layout ({fp32.numel()} != {size}).")
            for p in group:
                _check_clipped(p, names)
                offset = (p.data_ptr() - flat16.data_ptr()) // p.element_size()
                start, stop = max(lo, offset), min(hi, offset + p.numel())
                if start < stop:
                    slices.setdefault(id(fp32), []).append(
                        PartitionSlice(names[id(p)], start - offset, start - lo, stop - start))
    else:
        for i, group in enumerate(zero.fp16_groups):
            fp32 = zero.fp32_partitioned_groups_flat[i]
            position = 0
            for p in group:
                _check_clipped(p, names)
                width = p.partition_numel()
                start = dist.get_rank(group=p.ds_process_group) * width
                owned = max(0, min(width, p.ds_numel - start))
                if owned:
                    slices.setdefault(id(fp32), []).append(PartitionSlice(names[id(p)], start, position, owned))
                position += width
            if position != fp32.numel():
                raise ConfigError(f"Unexpected ZeRO-3 partition layout ({position} != {fp32.numel()}).")
    return slices


def _check_clipped(p: nn.Parameter, names: Mapping[int, str]) -> None:
    if id(p) not in names:
        raise ConfigError("DeepSpeed's optimizer updates a parameter the privacy engine does not clip.")
