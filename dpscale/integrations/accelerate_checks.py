"""Every refusal of an Accelerate configuration, in one place: the plain Accelerate path, its
DeepSpeed plugin and DPTrainer (whose Accelerator the Trainer builds) all ask here, so a setting is
refused with one message whichever entry point meets it, and the integration modules import this
one instead of each other.

Refused because it would change the DP step: fp16 loss scaling (its GradScaler would unscale
gradients that were never scaled, and skip steps on overflow), gradient accumulation in Accelerate
(the logical batch is the loader's; micro-batches already accumulate), torch.compile of the model,
FSDP1 (``fsdp_version: 1``: its flat parameters hide the names the noise is keyed by), an FSDP
config Accelerate dropped (it enables its FSDP plugin only on accelerators: on a CPU-only machine
it runs DDP instead, without saying so; Accelerate 1.15), Megatron-LM or XLA, which dpscale does
not drive, and a model or optimizer other than the ones ``accelerator.prepare`` returned.
"""

from __future__ import annotations

import os

from torch import nn

from dpscale.backends.fsdp2 import is_fsdp2
from dpscale.errors import ConfigError

__all__ = ["check_accelerator", "check_prepared", "distributed_type", "is_deepspeed"]

_DATA_PARALLEL_TYPES = {"NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_MUSA",
                        "MULTI_SDAA", "MULTI_HPU"}


def distributed_type(accelerator) -> str:
    """Accelerate's distributed type as a plain string ("MULTI_GPU", "FSDP", "DEEPSPEED", ...), from
    an Accelerator or anything with its ``distributed_type`` (an enum, or a string in tests)."""
    return str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))


def is_deepspeed(accelerator) -> bool:
    return distributed_type(accelerator) == "DEEPSPEED"


def check_accelerator(accelerator, *, deepspeed: bool = False) -> None:
    """Refuse Accelerate settings that would change the DP step, naming the setting. DEEPSPEED is
    accepted only with ``deepspeed=True`` (the DeepSpeed path, ``accelerate_deepspeed.py``), FSDP
    only with ``fsdp_version: 2``."""
    kind = distributed_type(accelerator)
    if kind != "FSDP" and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ConfigError(
            f"Accelerate was configured for FSDP (ACCELERATE_USE_FSDP=true, from an FSDP accelerate config or an "
            f"FSDP plugin) but runs distributed_type={kind}: Accelerate enables FSDP only on accelerators and "
            "otherwise falls back without sharding (on a CPU-only machine `accelerate launch` with an FSDP config "
            "even starts independent one-process runs). Use an FSDP config on GPUs, or "
            "launch/accelerate_cpu_2proc.yaml on CPUs."
        )
    if kind == "FSDP":
        version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)
        if version != 2:
            raise ConfigError(
                f"Accelerate FSDP with fsdp_version={version}: FSDP1 flattens parameters into FlatParameters, so "
                "dpscale cannot key the noise by parameter name nor hook the layers' own weights. Set "
                "fsdp_version: 2 in the accelerate config (fsdp_config) or FullyShardedDataParallelPlugin("
                "fsdp_version=2); launch/accelerate_fsdp2.yaml is a ready one."
            )
    elif kind not in _DATA_PARALLEL_TYPES and not (deepspeed and kind == "DEEPSPEED"):
        raise ConfigError(
            f"Accelerate distributed_type={kind}: dpscale's Accelerate integration drives data-parallel "
            "(DDP) runs, FSDP2 and DeepSpeed (make_private routes a prepared DeepSpeedEngine to "
            "dpscale.integrations.accelerate_deepspeed); set distributed_type to MULTI_CPU / MULTI_GPU, NO, "
            "FSDP (fsdp_version: 2) or DEEPSPEED in the accelerate config."
        )
    if str(accelerator.mixed_precision) == "fp16" or getattr(accelerator, "scaler", None) is not None:
        raise ConfigError(
            "Accelerate mixed_precision='fp16' scales the loss with a GradScaler: it would unscale "
            "gradients dpscale never scaled and skip steps on overflow. Use mixed_precision='bf16' or 'no'."
        )
    if accelerator.gradient_accumulation_steps != 1:
        raise ConfigError(
            f"Accelerate gradient_accumulation_steps={accelerator.gradient_accumulation_steps}: optimizer.step() "
            "would skip steps while dpscale counts logical batches. Set it to 1; the loader's micro-batches "
            "(max_physical_batch_size) already accumulate within one logical batch."
        )
    dynamo = getattr(getattr(accelerator.state, "dynamo_plugin", None), "backend", None)
    if dynamo is not None and str(getattr(dynamo, "value", dynamo)).upper() != "NO":
        raise ConfigError(
            f"Accelerate dynamo_backend={dynamo}: torch.compile fuses the modules whose activations dpscale "
            "records. Set dynamo_backend to 'no'."
        )


def check_prepared(accelerator, model: nn.Module, optimizer) -> None:
    """Refuse a model or optimizer that is not what ``accelerator.prepare`` returned for the
    accelerator's distributed type: the engine must hook the wrapper Accelerate built (DDP, a
    fully_shard'ed model, a DeepSpeedEngine), or the reduction and the step would be the wrong ones."""
    kind = distributed_type(accelerator)
    if kind == "DEEPSPEED":
        import deepspeed

        if not isinstance(model, deepspeed.DeepSpeedEngine):
            raise ConfigError(
                f"Accelerate runs DeepSpeed but the model is a {type(model).__name__}: pass the model returned by "
                "accelerator.prepare(model, optimizer) (a DeepSpeedEngine)."
            )
        inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's DeepSpeedOptimizerWrapper
        if inner is not model.optimizer:
            raise ConfigError("Pass the optimizer returned by accelerator.prepare together with its model.")
    elif kind == "FSDP":
        if not is_fsdp2(model):
            raise ConfigError(
                "Accelerate runs FSDP but the model is not fully_shard'ed: pass the model returned by "
                "accelerator.prepare(model, optimizer) (prepared together, as FSDP2 requires)."
            )
    elif accelerator.num_processes > 1 and not isinstance(model, nn.parallel.DistributedDataParallel):
        raise ConfigError(
            f"{accelerator.num_processes} processes but the model is not DDP-wrapped: pass the model "
            "returned by accelerator.prepare(model, optimizer)."
        )
