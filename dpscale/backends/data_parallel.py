"""Data parallel over torch.distributed (plain DDP, or DDP through Accelerate), gloo or nccl alike.

Each rank holds a disjoint part of the global Poisson batch. ``accumulate`` keeps that part's
clipped sum (already divided by the *global* expected batch size B) in ``p.grad``; at the step
boundary each rank adds the keyed noise of the coordinates it owns (each parameter's flattened
elements cut into W contiguous ranges, rank r owning range r), then one SUM all-reduce over the
data-parallel group, bucketed, leaves every rank with

    (sum over all ranks' examples of clip(g_i) + one noise draw per coordinate) / B.

A rank whose draw is empty still calls ``finish_step`` (with zero gradients) so the collectives
match. Per-example norms never cross data-parallel ranks: they belong to different examples.

DDP's own gradient reducer must stay out of the way (the engine's backward produces no autograd
weight gradient, so DDP would wait for reductions that never come). ``attach_ddp`` switches the
wrapper's backward sync off for as long as the engine is attached, the same flag ``no_sync()``
sets, and gives it back on ``engine.detach()``; DDP's class is never touched.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dpscale.backends.base import NoiseFn
from dpscale.errors import ConfigError

__all__ = ["DDPAttachment", "DataParallelBackend", "attach_ddp", "owned_range"]


def owned_range(numel: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous elements [a, b) of a flattened parameter whose noise ``rank`` adds."""
    return numel * rank // world_size, numel * (rank + 1) // world_size


class DataParallelBackend:
    """Gradients in ``p.grad``, noise sharded by coordinate, one SUM all-reduce per step.

    process_group: the data-parallel group (default: the whole world). Ranks of one
        tensor-parallel group are *not* data-parallel peers: give each its own data-parallel group.
    shard_offsets: for parameters this rank holds only a contiguous slice of (tensor-parallel
        shards), the slice's offset in the full parameter's flattened elements, so that the noise
        of element j of the full parameter is the same whatever the split.
    bucket_mb: gradients are flattened into buckets of about this size per all-reduce.
    """

    def __init__(self, process_group=None, *, shard_offsets: Mapping[str, int] | None = None,
                 bucket_mb: float = 25.0) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError(
                "DataParallelBackend needs torch.distributed initialised (init_process_group, or "
                "a launcher: accelerate launch, torchrun) before the engine is built."
            )
        self.process_group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self.shard_offsets = dict(shard_offsets or {})
        self.bucket_bytes = int(bucket_mb * 2**20)

    def accumulate(self, name: str, param: nn.Parameter, clipped: Tensor) -> None:
        if param.grad is None:
            param.grad = clipped.reshape(param.shape).contiguous()
        else:
            param.grad.add_(clipped.reshape(param.shape))

    def finish_step(self, parameters: Mapping[str, nn.Parameter], add_noise: NoiseFn) -> None:
        grads = []
        for name, p in parameters.items():
            if p.grad is None:
                p.grad = torch.zeros_like(p)  # an empty local draw: zeros, still reduced and noised
            elif not p.grad.is_contiguous():
                p.grad = p.grad.contiguous()
            flat = p.grad.view(-1)
            a, b = owned_range(flat.numel(), self.rank, self.world_size)
            add_noise(name, flat[a:b], self.shard_offsets.get(name, 0) + a)
            grads.append(p.grad)
        if self.world_size > 1:
            self._all_reduce(grads)

    def _all_reduce(self, grads: list[Tensor]) -> None:
        # Same order and bucketing on every rank: parameters come in the model's order.
        bucket: list[Tensor] = []
        size = 0
        for g in grads:
            if bucket and (g.dtype != bucket[0].dtype or g.device != bucket[0].device
                           or size + g.numel() * g.element_size() > self.bucket_bytes):
                self._reduce_bucket(bucket)
                bucket, size = [], 0
            bucket.append(g)
            size += g.numel() * g.element_size()
        if bucket:
            self._reduce_bucket(bucket)

    def _reduce_bucket(self, bucket: list[Tensor]) -> None:
        if len(bucket) == 1:
            dist.all_reduce(bucket[0], op=dist.ReduceOp.SUM, group=self.process_group)
            return
        flat = torch.cat([g.view(-1) for g in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.process_group)
        position = 0
        for g in bucket:
            g.view(-1).copy_(flat[position : position + g.numel()])
            position += g.numel()


class DDPAttachment:
    """A DistributedDataParallel wrapper whose reducer is kept idle while an engine is attached.

    Both flags are per-instance state that DDP itself flips (``no_sync()`` sets the first; each
    forward under it clears the second): with backward sync off, DDP neither prepares its reducer
    for a backward nor syncs buffers in forward, so a rank with an empty Poisson draw (no forward at
    all) cannot leave a collective unmatched. Parameters and buffers were synced when DDP was built.
    """

    def __init__(self, ddp: nn.parallel.DistributedDataParallel) -> None:
        _refuse_unsupported_ddp(ddp)
        self.ddp = ddp
        self.module: nn.Module = ddp.module
        self.process_group = ddp.process_group
        self._saved: tuple[bool, bool] | None = None

    def silence(self) -> None:
        """Switch DDP's backward sync off until ``restore()``."""
        if self._saved is None:
            self._saved = (self.ddp.require_backward_grad_sync, self.ddp.require_forward_param_sync)
        self.ddp.require_backward_grad_sync = False
        self.ddp.require_forward_param_sync = False

    def restore(self) -> None:
        if self._saved is not None:
            self.ddp.require_backward_grad_sync, self.ddp.require_forward_param_sync = self._saved
            self._saved = None


def attach_ddp(model: nn.Module) -> DDPAttachment | None:
    """For a DDP-wrapped model, the attachment (hooks and names go on ``attachment.module``, so
    parameter names, and with them the noise, are those of the single-process run); None for a
    plain module. ``nn.DataParallel`` (single-process replication) is refused."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return DDPAttachment(model)
    if isinstance(model, nn.DataParallel):
        raise ConfigError(
            "nn.DataParallel replicates the model on every forward, so hooks on the original module "
            "see no per-device call; use DistributedDataParallel (torchrun or accelerate launch)."
        )
    return None


def _refuse_unsupported_ddp(ddp: nn.parallel.DistributedDataParallel) -> None:
    if getattr(ddp, "static_graph", False):
        raise ConfigError(
            "DistributedDataParallel(static_graph=True) enqueues its own all-reduce inside the "
            "backward pass, which would sum gradients before clipping; build DDP without static_graph."
        )
    if getattr(ddp, "_delay_all_reduce_params", None):
        raise ConfigError(
            "DistributedDataParallel(delay_all_reduce_named_params=...) reduces gradients in the "
            "backward pass; dpscale reduces them itself at the step boundary: drop that option."
        )
    if getattr(ddp, "_use_python_reducer", False):
        raise ConfigError(
            "DDP under torch.compile's python_reducer mode reduces gradients inside the compiled "
            "backward; dpscale needs eager DDP (no torch.compile of the DDP model)."
        )
