"""Data parallel over torch.distributed (plain DDP, or DDP through Accelerate), gloo or nccl alike.

Each rank holds a disjoint part of the global Poisson batch. ``accumulate`` keeps that part's
clipped sum (already divided by the *global* expected batch size B) in the backend's flat buckets,
never in ``p.grad``; at the step boundary each rank adds the keyed noise of the coordinates it owns
(each parameter's flattened elements cut into W contiguous ranges, rank r owning range r), then one
SUM all-reduce over the data-parallel group, per flat bucket, leaves every rank with

    (sum over all ranks' examples of clip(g_i) + one noise draw per coordinate) / B.

and each parameter's ``p.grad`` becomes its view of the bucket for the optimizer's update, then
None again. A rank whose draw is empty still writes its (zero) buckets, so the collectives match.
Per-example norms never cross data-parallel ranks: they belong to different examples.

DDP's own gradient reducer must stay out of the way (the engine's backward produces no autograd
weight gradient, so DDP would wait for reductions that never come). ``DataParallelBackend.for_ddp``
takes the wrapper: when bound, it switches the wrapper's backward sync off for as long as the
engine is attached (the same flag ``no_sync()`` sets) and gives it back on ``engine.detach()``;
DDP's class is never touched. All DDP handling lives here, none in the engine.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dpscale.backends.base import BackendContext, NoiseFn, OptimizerStepped
from dpscale.backends.shared_key import check_same_key
from dpscale.clipped_sum import ClippedSum
from dpscale.errors import ConfigError

__all__ = ["DDPAttachment", "DataParallelBackend", "owned_range"]


def owned_range(numel: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous elements [a, b) of a flattened parameter whose noise ``rank`` adds."""
    return numel * rank // world_size, numel * (rank + 1) // world_size


class _Bucket:
    """One flat buffer that holds the gradients of consecutive parameters (one dtype, one device):
    each ``p.grad`` is a view into it, so the all-reduce runs on the gradients in place."""

    def __init__(self, named: list[tuple[str, nn.Parameter]]) -> None:
        first = named[0][1]
        self.flat = torch.zeros(sum(p.numel() for _, p in named), dtype=first.dtype, device=first.device)
        self.views: dict[str, Tensor] = {}
        position = 0
        for name, p in named:
            self.views[name] = self.flat[position : position + p.numel()].view(p.shape)
            position += p.numel()
        self.named = named


class DataParallelBackend(OptimizerStepped):
    """Clipped sums in flat buckets, noise sharded by coordinate, one SUM all-reduce per step.

    process_group: the data-parallel group (default: the whole world). Ranks of one
        tensor-parallel group are *not* data-parallel peers: give each its own data-parallel group.
    shard_offsets: for parameters this rank holds only a contiguous slice of (tensor-parallel
        shards), the slice's offset in the full parameter's flattened elements, so that the noise
        of element j of the full parameter is the same whatever the split.
    model_parallel_group: with ``shard_offsets``, the group whose ranks hold the slices of one
        example's gradient: the per-example squared norms of the sliced parameters are summed over
        it before clipping (the others are replicated there and counted once). Data-parallel ranks
        never belong in it.
    bucket_mb: gradients live in flat buckets of about this size, one all-reduce each.

    Clipped sums are written straight into the buckets (the matmul that forms each one writes its
    view: ``ClippedSum.write_``), and at the step ``p.grad`` is a view of its bucket (as DDP's
    ``gradient_as_bucket_view`` does), so neither the backward nor the step boundary copies a sum.
    ``accumulate`` only writes this rank's view (the all-reduce waits for the step), so the engine
    may hand the sums over during the backward and in any order.
    The reduction of bucket k runs asynchronously while the noise of bucket k + 1 is added (drawn
    ahead of the step by the engine's ``NoiseAhead``, or at the step): the wire is otherwise idle.
    """

    accumulates_during_backward = True

    def __init__(self, process_group=None, *, shard_offsets: Mapping[str, int] | None = None,
                 bucket_mb: float = 25.0, ddp: DDPAttachment | None = None, model_parallel_group=None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError(
                "DataParallelBackend needs torch.distributed initialised (init_process_group, or "
                "a launcher: accelerate launch, torchrun) before the engine is built."
            )
        self.process_group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self.shard_offsets = dict(shard_offsets or {})
        if model_parallel_group is not None and not self.shard_offsets:
            raise ConfigError(
                "model_parallel_group names the ranks that hold slices of one example's gradient: give the slices "
                "too (shard_offsets={parameter name: offset of this rank's slice}), so that replicated parameters "
                "are not counted once per rank."
            )
        self.model_parallel_group = model_parallel_group
        self.sharded_parameters = frozenset(self.shard_offsets) if model_parallel_group is not None else frozenset()
        self.bucket_bytes = int(bucket_mb * 2**20)
        self._buckets: list[_Bucket] | None = None
        self._views: dict[str, Tensor] = {}
        self._written: set[str] = set()  # parameters whose view holds this step's sums
        self._parameters: Mapping[str, nn.Parameter] = {}
        self._ddp = ddp

    @property
    def for_wrapper(self) -> nn.parallel.DistributedDataParallel | None:
        """The DDP wrapper this backend was made for (``for_ddp``), if any."""
        return None if self._ddp is None else self._ddp.ddp

    @classmethod
    def for_ddp(cls, ddp: nn.parallel.DistributedDataParallel, **options) -> DataParallelBackend:
        """The backend for a DDP-wrapped model: its process group, and its reducer kept idle while
        the engine is attached (the engine hooks ``ddp.module``)."""
        attachment = DDPAttachment(ddp)
        return cls(attachment.process_group, ddp=attachment, **options)

    def bind(self, context: BackendContext) -> list:
        """Check that every rank holds the engine's key, then lay the trainable parameters out in
        buckets, in the model's order (the same on every rank, so bucket k holds the same parameters
        everywhere); silence DDP's reducer until the engine detaches."""
        check_same_key(context.key_fingerprint, self.process_group)
        self._parameters = context.parameters
        self._buckets = _buckets(list(context.parameters.items()), self.bucket_bytes)
        self._views = {name: view for bucket in self._buckets for name, view in bucket.views.items()}
        if self._ddp is None:
            return []
        self._ddp.silence()
        return [_Restore(self._ddp)]

    def accumulate(self, name: str, clipped: ClippedSum | None) -> None:
        if clipped is None:  # this backward did not use the parameter
            return
        # the sum's matmul writes the bucket view itself (adds to it after the step's first backward)
        clipped.write_(self._views[name], add=name in self._written)
        self._written.add(name)

    def write_gradients(self, add_noise: NoiseFn) -> None:
        pending = []
        for bucket in self._buckets:
            for name, _p in bucket.named:
                view = bucket.views[name]
                if name not in self._written:
                    view.zero_()  # an empty local draw: zeros, still reduced and noised
                flat = view.view(-1)
                a, b = owned_range(flat.numel(), self.rank, self.world_size)
                add_noise(name, flat[a:b], self.shard_offsets.get(name, 0) + a)
            if self.world_size > 1:
                pending.append(dist.all_reduce(bucket.flat, op=dist.ReduceOp.SUM,
                                               group=self.process_group, async_op=True))
        self._written = set()
        for work in pending:
            work.wait()
        for bucket in self._buckets:
            for name, p in bucket.named:
                p.grad = bucket.views[name]

    def reduce_sharded_norms(self, norms2: Tensor) -> None:
        if self.model_parallel_group is not None:
            dist.all_reduce(norms2, group=self.model_parallel_group)

    def local_sums(self) -> Mapping[str, Tensor]:
        return {name: self._views[name] for name in self._written}


def _buckets(named: list[tuple[str, nn.Parameter]], bucket_bytes: int) -> list[_Bucket]:
    """Consecutive parameters of one dtype and device, up to ``bucket_bytes`` per bucket."""
    groups: list[list[tuple[str, nn.Parameter]]] = []
    size = 0
    for name, p in named:
        last = groups[-1][-1][1] if groups else None
        nbytes = p.numel() * p.element_size()
        if last is None or p.dtype != last.dtype or p.device != last.device or size + nbytes > bucket_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, p))
        size += nbytes
    return [_Bucket(group) for group in groups]


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


class _Restore:
    """The handle ``engine.detach()`` removes: gives DDP its reducer back."""

    def __init__(self, attachment: DDPAttachment) -> None:
        self._attachment = attachment

    def remove(self) -> None:
        self._attachment.restore()


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
