"""PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters are DTensors sharded on dim 0
over a 1-D device mesh; each rank updates the rows of each parameter its shard holds.

The user's loop is the plain torch one (an optimizer over the sharded parameters, attached to the
engine); the engine hooks the fully_shard'ed model itself, whose parameter names are those of the
one-process model, so the keyed noise is too::

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)                                   # the root too: every parameter a DTensor
    engine = PrivacyEngine(model, config, noise_key=key_file)            # selects FSDP2Backend
    optimizer = engine.attach_optimizer(torch.optim.AdamW(engine.parameters.values(), lr=...))
    for logical_batch in engine.make_data_loader(data, max_physical_batch_size=...):
        run_logical_step(engine, logical_batch, losses_fn)

How it maps onto FSDP2 (torch 2.13):

* Forward and backward run through FSDP2's own hooks: each module's parameters are all-gathered
  before its forward and again before its part of the backward (its pre-backward hook fires inside
  the engine's ``torch.autograd.grad`` over the recorded module outputs). Per-example norms come
  from the local activations and output gradients: no weight is gathered for them.
* The layer rules run inside or after that backward and some read their module's weight
  (Hugging Face RMS norms call their own forward with it). Eager rules run as each output's
  gradient arrives, while FSDP2 has the unit's parameters gathered for its own backward.
  Whole-call rules (the torch.func fallback, attention and recurrent layers) run after the
  backward: the FSDP2 units holding their modules are told not to reshard after backward
  (``set_reshard_after_backward(False)``) while the engine is attached, and the backend reshards
  them as soon as the rules are done (the first ``accumulate`` of each backward). A Hugging Face
  decoder has no such module, so its units reshard as in non-private training.
* FSDP2's own reduce-scatter stays idle (no parameter receives an autograd gradient). The engine
  hands over each parameter's clipped sum of the local examples once the backward's norms are
  known, one parameter at a time; the backend writes it into a bucket laid out as FSDP2 shards
  (each parameter's dim 0 cut into world-size chunks of ceil(rows / W) rows, padded; buckets of at
  most ``bucket_elements`` elements, one dtype each, in the engine's parameter order) and starts an
  asynchronous SUM reduce-scatter as soon as a bucket is full, while the next parameters' sums are
  computed. Each rank keeps only its own rows, summed over the backward passes of the step: a
  rank holds the sharded sums and at most two buckets, never the model's full-size gradients.
  At the step boundary it adds the keyed noise of exactly its elements (offset = first row x row
  size, the flat index into the full parameter) and sets ``p.grad`` as a DTensor shard like the
  parameter, which the torch optimizer steps. Each coordinate gets one draw whatever the number of
  ranks. Like FSDP2's own gradient accumulation, each backward pass reduces once: bytes grow with
  the number of micro-batches of a step.
* Every forward all-gathers and every backward reduce-scatters, so every rank must run as many
  passes per logical step: a rank with fewer micro-batches (or an empty Poisson draw) runs padding
  passes, which contribute zeros to the reductions (``micro_batch_count`` / ``padding``, driven by
  ``dpscale.run_logical_step``).
* Tied parameters (an input embedding shared with the output head) are one DTensor, one name and
  one noise draw; the engine's norm includes the cross term of its two uses.

* Mixed precision (``MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)``
  on fp32 parameters): forward and backward run in bf16 on the gathered bf16 parameters; the rules
  compute norms and per-example terms in fp32 (as on one process), the clipped sums are kept,
  reduced and noised in the sharded parameters' dtype (fp32), and the optimizer steps the fp32
  shards. ``reduce_dtype`` is not used: dpscale reduces in the sharded parameters' dtype.

Refused, each with a ConfigError when the engine is built: a trainable parameter FSDP2 does not
manage (call ``fully_shard`` on the root too), a mesh of more than one dimension (HSDP), a
placement other than ``Shard(0)`` (``shard_placement_fn``), and parameter offload to the CPU
(``CPUOffloadPolicy``) on an accelerator mesh. FSDP1's ``FullyShardedDataParallel`` is refused by
``select_backend`` (its flat parameters hide the names the noise is keyed by).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dpscale.backends.base import BackendContext, NoiseFn, OptimizerStepped
from dpscale.backends.shared_key import check_same_key
from dpscale.clipped_sum import ClippedSum
from dpscale.errors import ConfigError

__all__ = ["FSDP2Backend", "fsdp2_modules", "is_fsdp1", "is_fsdp2"]


def fsdp2_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that ``fully_shard`` was applied to (none without torch.distributed,
    or before torch 2.6, where FSDP2 was not yet public and is not supported)."""
    if not dist.is_available():
        return []
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_fsdp2(model: nn.Module) -> bool:
    return bool(fsdp2_modules(model))


def is_fsdp1(model: nn.Module) -> bool:
    if not dist.is_available():
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


# Unsharded elements per reduce-scatter bucket (16 MiB of fp32, near DDP's 25 MB buckets): large
# enough that the collectives are few, small enough that two buckets alive at once are a small
# fraction of a large model (measured here: lower peak than 64 MiB buckets, and no slower).
BUCKET_ELEMENTS = 1 << 22


@dataclass
class _Bucket:
    """Parameters of one dtype, consecutive in the engine's order, reduced together. ``layout`` is
    [world size, per_rank]: row r holds rank r's rows of each parameter (at ``positions``, padded to
    chunk rows), filled during a backward; ``sums`` is this rank's reduced row, summed over the
    backward passes of the step."""

    dtype: torch.dtype
    device: torch.device
    positions: dict[str, int]
    per_rank: int = 0
    layout: Tensor | None = None
    filled: int = 0
    sums: Tensor | None = None


def _buckets(parameters: Mapping[str, nn.Parameter], shards: Mapping[str, _Shard], world_size: int,
             capacity: int) -> list[_Bucket]:
    """Consecutive parameters of one dtype, at most ``capacity`` unsharded (padded) elements a
    bucket (a larger parameter alone)."""
    buckets: list[_Bucket] = []
    for name, p in parameters.items():
        shard = shards[name]
        size = shard.chunk * shard.row
        last = buckets[-1] if buckets else None
        if last is None or last.dtype != p.dtype or (last.per_rank + size) * world_size > capacity:
            last = _Bucket(p.dtype, p.to_local().device, {})
            buckets.append(last)
        last.positions[name] = last.per_rank
        last.per_rank += size
    return buckets


@dataclass(frozen=True)
class _Shard:
    """This rank's rows [start, start + rows) of a parameter of ``full_rows`` rows of ``row``
    elements each; FSDP2 gives every rank ``chunk`` rows (the last ones fewer, or none)."""

    start: int
    rows: int
    chunk: int
    full_rows: int
    row: int


class FSDP2Backend(OptimizerStepped):
    """Backend for a model with ``fully_shard`` applied (FSDP2). Built by ``select_backend`` when the
    model (or one of its submodules) is an ``FSDPModule``; pass ``FSDP2Backend(model)`` to choose it
    explicitly. The step is the attached torch optimizer's, over the sharded parameters."""

    swaps_parameters = True  # unsharded tensors stand in for the DTensors while a module is gathered
    # accumulate reshards the kept units at the first parameter, fills buckets in the engine's order
    # and starts reduce-scatters: it must run after the backward, in that order (see base)
    accumulates_during_backward = False

    def __init__(self, model: nn.Module, *, bucket_elements: int = BUCKET_ELEMENTS) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError(
                "An FSDP2 (fully_shard) model needs torch.distributed initialised before the engine is built."
            )
        self._modules = fsdp2_modules(model)
        if not self._modules:
            raise ConfigError("FSDP2Backend needs a model with torch.distributed.fsdp.fully_shard applied.")
        self.model = model
        self.mesh = _one_mesh(model)
        self.process_group = self.mesh.get_group()
        self.rank = dist.get_rank(self.process_group)
        self.world_size = dist.get_world_size(self.process_group)
        if not isinstance(bucket_elements, int) or bucket_elements < 1:
            raise ConfigError(f"bucket_elements must be a positive int, got {bucket_elements!r}.")
        self.bucket_elements = bucket_elements
        self._shards: dict[str, _Shard] = {}
        self._buckets: list[_Bucket] = []
        self._bucket_of: dict[str, _Bucket] = {}
        # the one reduction in flight: (its bucket, this rank's received block, the collective, the layout it reads)
        self._pending: tuple[_Bucket, Tensor, dist.Work | None, Tensor] | None = None
        self._first: str | None = None
        self._padding = False
        self._parameters: Mapping[str, nn.Parameter] = {}

    # the engine's side ----------------------------------------------------------------------

    def bind(self, context: BackendContext) -> list:
        """Check that every trainable parameter is an FSDP2 shard on dim 0 and every rank holds the
        engine's key; keep parameters unsharded after backward (for the rules) while attached."""
        if context.model is not self.model:
            raise ConfigError("Build the PrivacyEngine on the fully_shard'ed model itself (its names key the noise).")
        check_same_key(context.key_fingerprint, self.process_group)
        self._parameters = context.parameters
        self._shards = {name: self._shard_of(name, p) for name, p in context.parameters.items()}
        self._buckets = _buckets(context.parameters, self._shards, self.world_size, self.bucket_elements)
        self._bucket_of = {name: bucket for bucket in self._buckets for name in bucket.positions}
        self._first = next(iter(context.parameters))
        kept = self._modules_to_keep_gathered(context.modules_read_after_backward)
        for module in kept:
            module.set_reshard_after_backward(False, recurse=False)
        return [_RestoreResharding(kept)]

    def accumulate(self, name: str, clipped: ClippedSum | None) -> None:
        """Write the local clipped sum into its bucket in FSDP2's layout; a full bucket starts its
        reduce-scatter. The engine hands the sums over in the order of ``engine.parameters`` once
        every rule of the backward has run: at the first one, the parameters kept unsharded for the
        rules are sharded again. A padding pass contributes zeros (the other ranks' reductions
        still need this rank's part)."""
        if name == self._first:
            self._reshard()
            for stale in self._buckets:  # a backward that raised midway left a bucket half filled
                stale.layout = None
        bucket = self._bucket_of[name]
        if bucket.layout is None:
            bucket.layout = torch.zeros(self.world_size, bucket.per_rank, dtype=bucket.dtype, device=bucket.device)
            bucket.filled = 0
        # else zeros (a padding pass, or a parameter this backward did not use)
        if not (self._padding or clipped is None):
            # each rank's block of rows is written by the matmul that forms it, straight into the
            # (contiguous) part of the layout that the reduce-scatter sends to that rank: no copy
            shard = self._shards[name]
            position = bucket.positions[name]
            for rank in range(self.world_size):
                first = min(shard.full_rows, rank * shard.chunk)
                last = min(shard.full_rows, first + shard.chunk)
                if last > first:
                    block = bucket.layout[rank, position : position + (last - first) * shard.row]
                    clipped.write_(block, add=False, rows=(first, last))
        bucket.filled += 1
        if bucket.filled == len(bucket.positions):
            self._reduce(bucket)
            if bucket is self._buckets[-1]:  # the backward's last bucket: its reduction is done here
                self._absorb()

    def write_gradients(self, add_noise: NoiseFn) -> None:
        """Noise this rank's rows of the summed, reduced clipped sums and give each parameter its
        DTensor shard gradient. A step without a backward on any rank is noise alone."""
        self._absorb()
        self._reshard()  # a step without a backward on this rank still leaves nothing unsharded
        for bucket in self._buckets:
            sums, bucket.sums = bucket.sums, None
            if sums is None:
                sums = torch.zeros(bucket.per_rank, dtype=bucket.dtype, device=bucket.device)
            for name, position in bucket.positions.items():
                shard, p = self._shards[name], self._parameters[name]
                own = sums[position : position + shard.rows * shard.row]
                add_noise(name, own, shard.start * shard.row)
                p.grad = _like_parameter(own.view(p.to_local().shape), p)

    def local_sums(self) -> Mapping[str, Tensor]:
        raise ConfigError(
            "Under FSDP2 the clipped sums are reduce-scattered as each backward ends, so no process holds its "
            "local sums whole: compare the noised, reduced gradients at the optimizer's step instead."
        )

    def logical_shape(self, name: str) -> torch.Size:
        return self._parameters[name].shape  # a DTensor's shape is the whole parameter's

    # the driver's side --------------------------------------------------------------------------

    @contextlib.contextmanager
    def padding(self):
        """Backward calls whose clipped sums are dropped: the passes a rank runs so that its
        all-gathers match those of a rank with more micro-batches."""
        self._padding = True
        try:
            yield
        finally:
            self._padding = False

    def micro_batch_count(self, local: int) -> int:
        """The largest local micro-batch count over the ranks: every forward and backward
        all-gathers parameters, so every rank runs as many passes."""
        if self.world_size == 1:
            return local
        count = torch.tensor([local], dtype=torch.int64, device=self.mesh.device_type)
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=self.process_group)
        return int(count)

    # internals --------------------------------------------------------------------------------

    def _modules_to_keep_gathered(self, read_late: tuple[nn.Module, ...] | None) -> list[nn.Module]:
        """The FSDP2 units that must stay unsharded after the backward: those managing a module the
        engine's rules read after it (the innermost unit enclosing it); every unit when the engine
        cannot say. Rules that run inside the backward read their weights while FSDP2 has them
        gathered for the unit's own backward."""
        if read_late is None:
            return list(self._modules)
        units = {id(unit) for unit in self._modules}
        enclosing: dict[int, nn.Module] = {}  # id(module) -> its innermost FSDP2 unit (itself included)

        def visit(module: nn.Module, unit: nn.Module | None) -> None:
            unit = module if id(module) in units else unit
            enclosing[id(module)] = unit
            for child in module.children():
                visit(child, unit)

        visit(self.model, None)
        kept = {id(enclosing[id(m)]): enclosing[id(m)] for m in read_late if enclosing.get(id(m)) is not None}
        return list(kept.values())

    def _reshard(self) -> None:
        for module in self._modules:
            module.reshard()

    def _shard_of(self, name: str, p: nn.Parameter) -> _Shard:
        if not _is_dtensor(p) or p.device_mesh != self.mesh:
            raise ConfigError(
                f"Trainable parameter '{name}' is not sharded by FSDP2 on the model's mesh: apply fully_shard to the "
                "root module too (fully_shard(model) after its layers), so that every trainable parameter is "
                "sharded and reduced, or freeze it."
            )
        from torch.distributed.tensor import Shard

        if tuple(p.placements) != (Shard(0),):
            raise ConfigError(
                f"'{name}' is placed as {tuple(p.placements)}; dpscale's FSDP2 backend supports Shard(0) only "
                "(drop shard_placement_fn)."
            )
        if p.dim() == 0:
            raise ConfigError(f"'{name}' is a scalar; FSDP2 shards parameters on dim 0, which it has not.")
        full_rows = p.shape[0]
        row = p.numel() // full_rows if full_rows else 0
        chunk = -(-full_rows // self.world_size)
        start = min(full_rows, chunk * self.rank)
        rows = max(0, min(full_rows, start + chunk) - start)
        local = p.to_local()
        if local.device.type != self.mesh.device_type:
            raise ConfigError(
                f"'{name}' is kept on {local.device.type} while FSDP2 computes on {self.mesh.device_type} "
                "(fully_shard(offload_policy=CPUOffloadPolicy())): parameter offload is not supported by dpscale's "
                "FSDP2 backend; drop offload_policy."
            )
        if local.shape[0] != rows or tuple(local.shape[1:]) != tuple(p.shape[1:]) or not local.is_contiguous():
            raise ConfigError(
                f"FSDP2's shard of '{name}' on rank {self.rank} has shape {tuple(local.shape)}; dpscale expected rows "
                f"[{start}, {start + rows}) of {tuple(p.shape)} (torch.chunk on dim 0). This torch version shards "
                "differently: the keyed noise could not be placed."
            )
        return _Shard(start, rows, chunk, full_rows, row)

    def _reduce(self, bucket: _Bucket) -> None:
        """Start the SUM reduce-scatter of a full bucket, after absorbing the one before it: one
        reduction in flight while the next bucket fills, so at most two layouts are alive."""
        layout, bucket.layout = bucket.layout, None
        self._absorb()
        if self.world_size == 1:
            self._pending = (bucket, layout.reshape(-1), None, layout)
            return
        received = torch.empty(bucket.per_rank, dtype=bucket.dtype, device=bucket.device)
        work = _REDUCE_SCATTER(received, layout.reshape(-1), op=dist.ReduceOp.SUM, group=self.process_group,
                               async_op=True)
        self._pending = (bucket, received, work, layout)  # the layout lives until the reduction is done

    def _absorb(self) -> None:
        """Wait for the reduction in flight, if any, and add it to its bucket's sums."""
        if self._pending is None:
            return
        (bucket, received, work, _layout), self._pending = self._pending, None
        if work is not None:
            work.wait()
        if bucket.sums is None:
            bucket.sums = received
        else:
            bucket.sums.add_(received)


# torch 2.13 renamed reduce_scatter_tensor (which still works, with a FutureWarning per call)
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)


def _is_dtensor(t: Tensor) -> bool:
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _like_parameter(local: Tensor, p: nn.Parameter) -> Tensor:
    """A DTensor gradient with ``p``'s mesh, placement, global shape and stride, holding ``local``."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def _one_mesh(model: nn.Module):
    meshes = []
    for p in model.parameters():
        if _is_dtensor(p) and all(p.device_mesh is not m for m in meshes):
            meshes.append(p.device_mesh)
    if not meshes:
        raise ConfigError("The fully_shard'ed model has no sharded parameter.")
    mesh = meshes[0]
    if mesh.ndim != 1 or any(m != mesh for m in meshes[1:]):
        raise ConfigError(
            "dpscale's FSDP2 backend supports one 1-D device mesh for every fully_shard call (plain FSDP); "
            "HSDP (a 2-D mesh) and per-module meshes are not supported."
        )
    return mesh


class _RestoreResharding:
    """The handle ``engine.detach()`` removes: FSDP2 reshards after backward again (its default)."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self._modules = modules

    def remove(self) -> None:
        for module in self._modules:
            module.set_reshard_after_backward(True, recurse=False)
