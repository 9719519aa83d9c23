"""Where DeepSpeed AutoTP put each rank's shard of a parameter: the parameters split over the
tensor-parallel group (their per-example squared norms are summed over it; everything else is
replicated and counted once), and the map from the shard's elements to the full parameter's, so
that element j of the full weight gets the noise keyed by j whatever the split.

AutoTP's ``LinearLayer`` keeps rows [a, b) of the weight (and of the bias): one contiguous range of
the flattened full parameter. ``LinearAllreduce`` keeps columns [a, b): one range per row. Both
record the full shape and the partition sizes when they are built (DeepSpeed 0.19's
``_orig_weight_shape``, ``_partition_sizes``, ``tp_index``: internals, read under the version
check of the DeepSpeed backend).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from dpscale.errors import ConfigError
from dpscale.layers.tensor_parallel import is_autotp_linear

__all__ = ["ShardLayout", "autotp_layouts"]


@dataclass(frozen=True)
class ShardLayout:
    """This rank holds the block [start, start + size) along ``dim`` of a parameter of
    ``full_shape`` (dim 0: any rank; dim 1: 2-D parameters only)."""

    full_shape: tuple[int, ...]
    dim: int
    start: int
    size: int

    def runs(self, first: int, numel: int) -> Iterator[tuple[int, int, int]]:
        """(position in the request, element of the full parameter, length) for the shard's
        flattened elements [first, first + numel), in contiguous runs."""
        if self.dim == 0:
            inner = math.prod(self.full_shape[1:])
            yield 0, self.start * inner + first, numel
            return
        width, full_width = self.size, self.full_shape[1]
        done = 0
        while done < numel:
            row, column = divmod(first + done, width)
            length = min(width - column, numel - done)
            yield done, row * full_width + self.start + column, length
            done += length


def autotp_layouts(module: nn.Module) -> tuple[object, dict[str, ShardLayout]]:
    """(the tensor-parallel group, {name of a trainable shard: its layout}) for a module that
    DeepSpeed AutoTP partitioned; (None, {}) for one it did not."""
    group, layouts = None, {}
    for qualname, layer in module.named_modules():
        if not is_autotp_linear(layer) or layer.tp_world_size == 1:
            continue
        if group is not None and layer.mp_group is not group:
            raise ConfigError("AutoTP layers use different tensor-parallel groups; dpscale supports one.")
        group = layer.mp_group
        sizes = tuple(int(s) for s in layer._partition_sizes)
        index = int(layer.tp_index)
        start, size = sum(sizes[:index]), sizes[index]
        prefix = qualname + "." if qualname else ""
        rows_split = type(layer).__name__ == "LinearLayer"  # LinearAllreduce splits the columns
        shards = {"weight": (tuple(layer._orig_weight_shape), 0 if rows_split else 1)}
        if rows_split and layer.bias is not None:
            shards["bias"] = (tuple(layer._orig_bias_shape), 0)  # LinearAllreduce's bias is replicated
        for local, (full_shape, dim) in shards.items():
            param = getattr(layer, local)
            if not param.requires_grad:
                continue
            expected = list(full_shape)
            expected[dim] = size
            shape = tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 partitions the shard again
            if shape != tuple(expected):
                raise ConfigError(
                    f"AutoTP shard '{prefix}{local}' has shape {shape}, expected {tuple(expected)} "
                    f"from its recorded split {sizes}: DeepSpeed's layout changed; use deepspeed 0.19.x."
                )
            layouts[prefix + local] = ShardLayout(full_shape, dim, start, size)
    return group, layouts
