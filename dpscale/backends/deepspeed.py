"""DeepSpeed ZeRO stages 0 to 3: the clipped sums go where DeepSpeed reduces gradients, the noise
where its base optimizer sees its own fp32 partition.

The user keeps DeepSpeed's engine and loop; dpscale replaces ``ds_engine.backward(loss)``::

    ds_engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config="ds_configs/zero2.json")
    backend = DeepSpeedBackend(ds_engine)
    dp = PrivacyEngine(ds_engine.module, config, backend=backend)   # names key the noise
    for logical_batch in loader:                                    # Poisson: sizes vary
        with backend.accumulation():                                # one DeepSpeed reduction
            for micro in logical_batch.micro_batches:
                dp.backward(per_example_losses(ds_engine.module, micro))
        ds_engine.step()                                            # noise, accounting, update

How it maps onto DeepSpeed 0.19 (checked at construction; other versions are refused; the ZeRO
partition layout is read in ``zero_layout.py``):

* Forward and the engine's backward run on ``ds_engine.module``, never on the output of
  ``ds_engine(...)`` (whose backward scales by the accumulation steps and runs the reduction
  epilogue early). ZeRO-3's parameter fetch hooks live on the submodules, so they still fire.
* ``accumulation()`` wraps ``ds_engine.coalesce_grad_reduction()`` (stages 1-3): the clipped sums
  accumulate in the backend's own buffers (full shape ``ds_shape`` under ZeRO-3, where ``p.data``
  is empty); on exit each buffer becomes its parameter's ``p.grad`` on every rank (zeros for an
  empty local draw, so the collectives match; no copy) and DeepSpeed's flush reduces them once
  into its partitions. Stage 0 has no ZeRO optimizer: the buffers stay the backend's until the step
  pre-hook, which noises them, all-reduces (SUM) and only then hands them to ``p.grad``.
* DeepSpeed owns the gradient buffers from the block's exit on. A gradient that autograd
  accumulates into a trainable parameter outside ``engine.backward`` (a plain ``loss.backward()``,
  ``ds_engine.backward``) is refused by the engine as it happens, and the step pre-hook refuses to
  step once one has been seen, since DeepSpeed's own hooks may already have taken it into a bucket.
* DeepSpeed *averages* over the data-parallel group (stage 1/2 ``average_tensor`` /
  ``gradient_reduction_w_predivide``, stage 3 ``__avg_scatter_grads``): the local sums are
  multiplied by the group size as they accumulate. The first step checks the result against an
  explicit SUM all-reduce of the local sums and raises if DeepSpeed did anything else.
* Noise: a step pre-hook on the base optimizer (``ds_engine.optimizer.optimizer`` under ZeRO)
  sees this rank's fp32 partitions with their reduced gradients, after DeepSpeed's unscale and
  (refused) clipping. Each partition is a concatenation of slices of flattened parameters; the
  backend adds the keyed noise of exactly those elements (offset = the slice's start in the
  parameter), so every coordinate gets one draw whatever the number of ranks or the stage.
  ZeRO-3 calls the base optimizer once per sub-group: the privacy step is counted once per
  ``ds_engine.global_steps``.
* CPU optimizer offload (``"offload_optimizer": {"device": "cpu"}``, ZeRO 1-3): the fp32
  partitions live on the CPU and DeepSpeed copies the reduced gradients there at the boundary; the
  base optimizer it steps (DeepSpeedCPUAdam, or a client torch optimizer with
  ``"zero_force_ds_cpu_optimizer": false``) is the one hooked, with the same partition layout.
  NVMe offload, ``offload_param``, a partial ``ratio`` and ZenFlow are refused (untested).
* bf16 (ZeRO 1-3 with bf16 gradient accumulation, DeepSpeed's default): the clipped sums accumulate
  in the bf16 ``p.grad``, DeepSpeed reduces them and widens them into its fp32 partitions, and the
  noise is added there in fp32. Stage 0 bf16 and stage 1 with ``"grad_accum_dtype": "fp32"`` go
  through DeepSpeed's FP16_Optimizer / BF16_Optimizer wrappers, which reduce in their own backward
  epilogue and have no ``coalesce_grad_reduction``: refused.
* ``padding()``: under ZeRO-3 a rank with fewer micro-batches runs extra forward/backward passes
  for the collectives; inside this block their clipped sums are dropped (the Accelerate integration
  uses it; with ``deepspeed.initialize`` multiplying the padding losses by 0 does the same).
* AutoTP (``"tensor_parallel": {"autotp_size": k}``, ZeRO 0-3): the backend reads AutoTP's split
  (``dpscale/backends/autotp.py``), declares the tensor-parallel group and the shards to the engine
  (their per-example squared norms are summed over the group) and maps each shard's noise to the
  full parameter's elements. ``rank`` / ``world_size`` are the data-parallel position, which the
  engine's data loader uses: the ranks of one tensor-parallel group share their examples.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dpscale.backends.autotp import autotp_layouts
from dpscale.backends.base import BackendContext, NoiseFn
from dpscale.backends.shared_key import check_same_key
from dpscale.backends.zero_layout import TESTED_DEEPSPEED, PartitionSlice, check_deepspeed_version, partition_slices
from dpscale.clipped_sum import ClippedSum
from dpscale.errors import ConfigError, ForeignGradientError

__all__ = ["DeepSpeedBackend", "TESTED_DEEPSPEED", "check_deepspeed_config"]

logger = logging.getLogger(__name__)

def check_deepspeed_config(ds_engine) -> None:
    """Refuse DeepSpeed settings that would change the DP step, naming the config key."""
    if ds_engine.gradient_clipping() != 0.0:
        raise ConfigError(
            f'DeepSpeed clips the reduced gradient at "gradient_clipping": {ds_engine.gradient_clipping()} '
            "(DeepSpeed 0.19 defaults to 1.0). That is not per-example clipping: it rescales the noised "
            'DP gradient. Set "gradient_clipping": 0.0 in the DeepSpeed config file itself (Accelerate drops '
            "a plugin value of 0.0)."
        )
    if ds_engine.fp16_enabled():
        raise ConfigError(
            'DeepSpeed "fp16": {"enabled": true} uses dynamic loss scaling and skips steps on overflow, '
            "which changes the DP step and the step count the accountant composes. Use fp32 or "
            '"bf16": {"enabled": true}.'
        )
    if ds_engine.gradient_accumulation_steps() != 1:
        raise ConfigError(
            f'DeepSpeed "gradient_accumulation_steps": {ds_engine.gradient_accumulation_steps()}: dpscale '
            "accumulates the micro-batches of a Poisson batch itself (their number varies). Set "
            '"gradient_accumulation_steps": 1 and call ds_engine.step() once per logical batch.'
        )
    if not ds_engine.managed_gradient_accumulation():
        raise ConfigError('Set "managed_gradient_accumulation": true (the default); dpscale owns the boundary.')
    if getattr(ds_engine, "pipeline_parallelism", False):
        raise ConfigError("DeepSpeed pipeline parallelism is not supported by dpscale's DeepSpeed backend.")
    if getattr(ds_engine, "seq_parallel_group", None) is not None and ds_engine.sequence_parallel_size > 1:
        raise ConfigError(
            '"sequence_parallel_size" > 1 splits one example over ranks; dpscale needs whole examples per rank.'
        )
    if ds_engine.zero_optimization_stage() not in (0, 1, 2, 3):
        raise ConfigError(f'"zero_optimization.stage" {ds_engine.zero_optimization_stage()} is not one of 0-3.')
    optimizer_offload = _offload_device(ds_engine.zero_offload_optimizer())
    if optimizer_offload not in ("none", "cpu"):
        raise ConfigError(
            f'"zero_optimization.offload_optimizer.device": "{optimizer_offload}" is not tested with dpscale; '
            'use "cpu" (tested on ZeRO 1, 2 and 3) or no offload.'
        )
    if optimizer_offload == "cpu" and ds_engine.zero_partial_offload() != 1.0:
        raise ConfigError(
            '"zero_optimization.offload_optimizer.ratio" < 1 steps part of the partitions with a second, '
            "hidden optimizer that dpscale does not see; remove \"ratio\"."
        )
    if _offload_device(ds_engine.zero_offload_param()) != "none":
        raise ConfigError(
            '"zero_optimization.offload_param" is not tested with dpscale; remove it (optimizer offload, '
            '"offload_optimizer": {"device": "cpu"}, is supported on ZeRO 1-3).'
        )
    if getattr(ds_engine, "zenflow", False) or getattr(ds_engine.optimizer, "zenflow", False):
        raise ConfigError('ZenFlow ("zenflow" in the offload config) steps partitions asynchronously; remove it.')
    wrapper = type(ds_engine.optimizer).__name__
    if ds_engine.bfloat16_enabled() and not hasattr(ds_engine.optimizer, "_coalesce_grad_reduction"):
        raise ConfigError(
            f'"bf16" on ZeRO stage {ds_engine.zero_optimization_stage()} goes through DeepSpeed\'s {wrapper} '
            '(stage 0, or stage 1 with "data_types": {"grad_accum_dtype": "fp32"}), which reduces gradients '
            "in its own backward epilogue and which dpscale does not drive. Use bf16 with ZeRO stage 1 (bf16 "
            'gradient accumulation, the default), 2 or 3, or fp32.'
        )


def _warn_if_weight_gradients_are_computed() -> None:
    """ZeRO-3's "memory_efficient_linear" (on by default) replaces torch.nn.functional.linear,
    process-wide and for good, with an autograd Function whose backward computes the weight
    gradient whenever the weight requires one. dpscale's backward asks autograd for activation
    gradients only, so that matmul is computed and thrown away: a warning, not an error, because
    it costs time and changes nothing in the DP step."""
    try:
        from deepspeed.runtime.zero.linear import zero3_linear_wrap
    except ImportError:
        return
    if torch.nn.functional.linear is zero3_linear_wrap:
        logger.warning(
            'DeepSpeed ZeRO-3 "memory_efficient_linear" has replaced torch.nn.functional.linear with a version '
            "whose backward always computes each Linear's weight gradient, which dpscale does not use (it builds "
            "clipped per-example sums instead): one wasted matmul per Linear per backward, about a third of the "
            'backward. Set "zero_optimization": {"memory_efficient_linear": false} in every ZeRO-3 config of the '
            "process (ds_configs/zero3.json does); DeepSpeed's replacement persists once installed."
        )


def _offload_device(offload) -> str:
    """"none", "cpu" or "nvme" for an offload_optimizer / offload_param config section."""
    if offload is None:
        return "none"
    device = getattr(offload, "device", "none")
    return str(getattr(device, "value", device))


class DeepSpeedBackend:
    """Backend for a DeepSpeedEngine (``deepspeed.initialize`` or Accelerate's DeepSpeed plugin): ZeRO
    stage 0-3 in fp32, ZeRO 1-3 in bf16 and with CPU optimizer offload.

    verify_steps: for how many of the first steps the reduced gradient is checked against an
        explicit SUM all-reduce of the local clipped sums (costs one extra all-reduce each).
    """

    owns_step = True  # DeepSpeed runs the optimizer; the base optimizer's pre-hook adds the noise
    swaps_parameters = False  # ZeRO-3 partitions each parameter's storage, not the object
    # accumulate writes the backend's own full-shape buffers (no collective: DeepSpeed reduces them
    # when the accumulation block exits), so sums may come during the backward, in any order
    accumulates_during_backward = True

    def __init__(self, ds_engine, *, verify_steps: int = 1) -> None:
        self.deepspeed_version = check_deepspeed_version()
        check_deepspeed_config(ds_engine)
        self.ds_engine = ds_engine
        self.stage = int(ds_engine.zero_optimization_stage())
        self.group = (
            ds_engine.seq_data_parallel_group if self.stage else getattr(ds_engine, "data_parallel_group", None)
        )
        self.world_size = dist.get_world_size(self.group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(self.group) if dist.is_initialized() else 0
        self.verify_steps = verify_steps
        self._low_precision = bool(ds_engine.bfloat16_enabled())
        # AutoTP: which parameters are shards of one example's gradient, and where they sit in the
        # full parameters (the engine sums their squared norms over the tensor-parallel group).
        tp_group, self._layouts = autotp_layouts(ds_engine.module)
        self.model_parallel_group = tp_group if self._layouts else None
        self.sharded_parameters = frozenset(self._layouts)
        # Stages 1-3 average the gradients over the group; stage 0 is reduced here, by a SUM.
        self._average_compensation = self.world_size if self.stage else 1
        _warn_if_weight_gradients_are_computed()
        self._close_step = None
        self._foreign = None
        self.own_optimizers: tuple[torch.optim.Optimizer, ...] = ()
        self._parameters: Mapping[str, nn.Parameter] = {}
        self._sums: dict[str, Tensor] = {}  # the local clipped sums (times the compensation) until handed over
        self._slices: dict[int, list[PartitionSlice]] = {}
        self._inside = False
        self._padding = False
        self._reduced = False
        self._noise_step: int | None = None
        self._add_noise: NoiseFn | None = None
        self._expected: dict[str, Tensor] | None = None
        self._steps_seen = 0

    # the engine's side ----------------------------------------------------------------------

    def bind(self, context: BackendContext) -> list:
        """Called by PrivacyEngine once built: map partitions to parameter slices and hook the
        base optimizer. Returns removable handles (engine.detach() removes them)."""
        if context.model is not self.ds_engine.module:
            raise ConfigError("Build the PrivacyEngine on ds_engine.module (its parameter names key the noise).")
        self._close_step = context.close_step
        self._foreign = context.foreign
        self._parameters = context.parameters
        names = {id(p): n for n, p in self._parameters.items()}
        check_same_key(context.key_fingerprint, self.group)
        base = self._base_optimizer()
        self._slices = partition_slices(self.ds_engine, self.stage, base, self._parameters, names, self.rank,
                                       self.world_size)
        self._check_every_element_owned_once()
        self.own_optimizers = (base,)
        return [base.register_step_pre_hook(self._pre_step)]

    def accumulate(self, name: str, clipped: ClippedSum | None) -> None:
        if not self._inside:
            raise ConfigError(
                "Under DeepSpeed, call engine.backward inside `with backend.accumulation():` (one block per "
                "logical batch, then ds_engine.step()), so that DeepSpeed reduces the clipped sums once."
            )
        if self._padding or clipped is None:  # a ZeRO-3 padding pass (dropped), or a parameter not used
            return
        param = self._parameters[name]
        # DeepSpeed averages over the data-parallel group (stages 1-3): the compensation is folded
        # into the clip weights, so its average is the sum with no pass over the sum of its own.
        compensation = self._average_compensation
        if compensation != 1:
            clipped = clipped.scaled(compensation)
        held = self._sums.get(name)
        if held is None:  # the first backward's sum becomes the buffer (no copy)
            self._sums[name] = clipped.tensor().reshape(_full_shape(param)).contiguous()
        else:  # later ones are added by the matmul that forms them
            clipped.write_(held, add=True)

    def write_gradients(self, add_noise: NoiseFn) -> None:
        raise ConfigError("DeepSpeed steps its own optimizer: close each logical step with ds_engine.step().")

    def release_gradients(self) -> None:
        return None  # DeepSpeed clears its gradients in its own step

    def local_sums(self) -> Mapping[str, Tensor]:
        compensation = self._average_compensation
        return {name: (held / compensation if compensation != 1 else held) for name, held in self._sums.items()}

    def logical_shape(self, name: str) -> torch.Size:
        return _full_shape(self._parameters[name])

    def reduce_sharded_norms(self, norms2: Tensor) -> None:
        if self.sharded_parameters:
            dist.all_reduce(norms2, group=self.model_parallel_group)

    def step(self, optimizer=None) -> None:
        """Close the logical step: the DeepSpeedEngine's step (noise in the base optimizer's
        pre-hook, accounting, update; DeepSpeed clears the gradients)."""
        self.ds_engine.step()

    # the user's side --------------------------------------------------------------------------

    @contextmanager
    def accumulation(self):
        """One block per logical batch: every engine.backward inside adds to the local gradients;
        on exit DeepSpeed reduces them once. Call ds_engine.step() after the block."""
        if self._inside:
            raise ConfigError("backend.accumulation() blocks do not nest.")
        if self._foreign is not None and self._foreign.seen:
            # DeepSpeed's own hooks may have queued the refused gradient for reduction: entering
            # the coalesced block would end in DeepSpeed's error on exit, hiding ours.
            raise ForeignGradientError(
                "A gradient from a backward other than engine.backward reached a trainable parameter earlier (it "
                "was refused then) and DeepSpeed may hold it in its reduction buffers: this run takes no further "
                "step. Restart from the last checkpoint, and back-propagate per-example losses only through "
                "engine.backward."
            )
        verify = self.stage > 0 and self._steps_seen < self.verify_steps
        coalesce = self.ds_engine.coalesce_grad_reduction() if self.stage else _null()
        with coalesce:
            self._inside = True
            try:
                yield
            finally:
                self._inside = False
            if self.stage:  # the buffers become DeepSpeed's gradients, reduced by its flush on exit
                self._hand_over()
            if verify:
                self._expected = self._sum_over_ranks()
        self._reduced = True

    @contextmanager
    def padding(self):
        """Inside ``accumulation()``: engine.backward calls in this block contribute nothing (their
        clipped sums are dropped). For the extra forward/backward passes ZeRO-3 needs on a rank
        with fewer micro-batches than the busiest one (see ``micro_batch_count``)."""
        if not self._inside:
            raise ConfigError("backend.padding() belongs inside `with backend.accumulation():`.")
        self._padding = True
        try:
            yield
        finally:
            self._padding = False

    def micro_batch_count(self, local: int) -> int:
        """How many micro-batches this rank must run in the current logical step. Under ZeRO-3 every
        forward and backward all-gathers parameters, so all ranks must run the same number: the
        largest local count. Run the extra ones (and a whole step whose local draw is empty) on any
        input with the per-example losses multiplied by 0: their clipped contribution is exactly 0.
        Other stages need no padding: the local count is returned."""
        if self.stage != 3 or self.world_size == 1:
            return local
        count = torch.tensor([local], dtype=torch.int64, device=self.ds_engine.device)  # nccl: on the device
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=self.group)
        return int(count)

    # internals --------------------------------------------------------------------------------

    def _hand_over(self) -> None:
        """Every buffer becomes its parameter's ``p.grad`` (zeros for an empty local draw, still
        reduced so that the collectives match)."""
        sums, self._sums = self._sums, {}
        for name, p in self._parameters.items():
            held = sums.pop(name, None)
            _set_grad(p, held if held is not None else torch.zeros(_full_shape(p), dtype=p.dtype, device=p.device))

    def _base_optimizer(self):
        optimizer = self.ds_engine.optimizer
        if self.stage:
            optimizer = getattr(optimizer, "optimizer", None)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(
                f"dpscale expected a torch optimizer under DeepSpeed's {type(self.ds_engine.optimizer).__name__}, "
                f"found {type(optimizer).__name__}; pass a client optimizer or an \"optimizer\" section DeepSpeed "
                "builds from torch."
            )
        return optimizer

    def _check_every_element_owned_once(self) -> None:
        owned = torch.zeros(len(self._parameters), dtype=torch.float64, device=self.ds_engine.device)
        index = {name: i for i, name in enumerate(self._parameters)}
        for group in self._slices.values():
            for s in group:
                owned[index[s.name]] += s.numel
        if self.world_size > 1:
            dist.all_reduce(owned, group=self.group)
        for name, p in self._parameters.items():
            if int(owned[index[name]]) != _full_numel(p):
                raise ConfigError(
                    f"DeepSpeed's partitions cover {int(owned[index[name]])} of the {_full_numel(p)} elements of "
                    f"'{name}' across ranks; the noise would not be drawn exactly once per coordinate."
                )

    def _sum_over_ranks(self) -> dict[str, Tensor]:
        flat = torch.cat([p.grad.detach().reshape(-1).to(torch.float64) for p in self._parameters.values()])
        flat /= self._average_compensation  # the local sums themselves, before the compensation
        if self.world_size > 1:
            dist.all_reduce(flat, group=self.group)
        out, position = {}, 0
        for name, p in self._parameters.items():
            n = _full_numel(p)
            out[name] = flat[position : position + n]
            position += n
        return out

    def _pre_step(self, optimizer, args, kwargs) -> None:
        step = int(self.ds_engine.global_steps)
        if self._noise_step != step:  # first base-optimizer call of this DeepSpeed step
            if not self._reduced:
                raise ConfigError(
                    "ds_engine.step() ran without a `with backend.accumulation():` block since the last step: "
                    "no clipped gradient was reduced."
                )
            self._reduced = False
            self._noise_step = step
            self._add_noise = self._close_step()  # the engine's checks and accounting, then this step's noise
            self._steps_seen += 1
            if self.stage == 0:
                self._reduce_stage0()
                return
        if self.stage == 0:
            return
        verify = self._expected
        for group in optimizer.param_groups:
            for flat in group["params"]:
                if flat.grad is None:
                    raise ConfigError("DeepSpeed stepped a partition without a gradient.")
                grad = flat.grad.view(-1)
                for s in self._slices.get(id(flat), []):
                    view = grad[s.position : s.position + s.numel]
                    if verify is not None:
                        _verify(view, verify[s.name][s.start : s.start + s.numel], s.name, self._low_precision)
                    self._noise(s.name, view, s.start)
        self._expected = None

    def _noise(self, name: str, view: Tensor, start: int) -> None:
        """Noise of this rank's elements [start, start + numel) of parameter ``name``: for an AutoTP
        shard, the full parameter's elements they are (so the noise does not depend on the split)."""
        layout = self._layouts.get(name)
        if layout is None:
            self._add_noise(name, view, start)
            return
        for position, full, length in layout.runs(start, view.numel()):
            self._add_noise(name, view[position : position + length], full)

    def _reduce_stage0(self) -> None:
        self._expected = None  # stage 0: the backend reduces itself, nothing of DeepSpeed's to verify
        self._hand_over()
        grads = []
        for name, p in self._parameters.items():
            flat = p.grad.view(-1)
            for s in self._slices[id(p)]:
                self._noise(name, flat[s.position : s.position + s.numel], s.start)
            grads.append(p.grad)
        if self.world_size > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.group)
            position = 0
            for g in grads:
                g.view(-1).copy_(flat[position : position + g.numel()])
                position += g.numel()


def _verify(actual: Tensor, expected: Tensor, name: str, low_precision: bool) -> None:
    # bf16 gradients are reduced in bf16 (one rounding of 2^-9 relative per addition): 1e-2 of the
    # largest element separates that from any factor of 2 or from clipping; fp32 sums differ by order.
    expected = expected.to(actual.dtype)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    tol = (1e-2 if low_precision or actual.dtype == torch.bfloat16 else 1e-4) * max(scale, 1e-12)
    err = float((actual - expected).abs().max()) if expected.numel() else 0.0
    if err > tol:
        ratio = float(actual.abs().sum() / expected.abs().sum().clamp(min=1e-30))
        raise ConfigError(
            f"DeepSpeed delivered a reduced gradient for '{name}' that is {ratio:.4g} times the sum of the ranks' "
            "clipped sums (expected 1 after dpscale's compensation for averaging). Something in the DeepSpeed "
            'config scales gradients: check "gradient_predivide_factor", "prescale_gradients", '
            '"communication_data_type", "gradient_clipping" and loss scaling.'
        )


def _full_shape(p: nn.Parameter) -> torch.Size:
    return getattr(p, "ds_shape", p.shape)


def _full_numel(p: nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


def _set_grad(p: nn.Parameter, grad: Tensor) -> None:
    """Give ``p`` its first gradient of the step. Under ZeRO-3 ``p.data`` is an empty placeholder
    while the gradient has the full ``ds_shape`` (as DeepSpeed's own hooks leave it): the grad
    attribute is set to an empty tensor of ``p``'s shape and its storage swapped in place."""
    if grad.shape == p.shape:
        p.grad = grad
    else:
        p.grad = torch.empty_like(p)
        p.grad.data = grad


@contextmanager
def _null():
    yield

