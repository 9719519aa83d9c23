"""Hugging Face Accelerate: the user's ``Accelerator`` loop, made private.

    accelerator = Accelerator()                       # Accelerator(cpu=True) for gloo on CPU
    model, optimizer = accelerator.prepare(model, optimizer)
    engine = make_private(accelerator, model, optimizer, config, noise_key="noise.key")
    loader = make_data_loader(accelerator, engine, train_set, max_physical_batch_size=16)
    for logical_batch in loader:                      # this rank's part of the global Poisson batch
        dpscale.run_logical_step(engine, logical_batch, lambda micro: causal_lm_losses(
            engine.model(**micro).logits, micro["labels"]))   # micro-batches, backward, noise, step

(or ``dpscale.run_steps(engine, loader, losses_fn)`` for the whole loop, stopping at the budget).
The same script runs on one process, on N CPU processes (gloo), on N GPUs (nccl), under
Accelerate's DeepSpeed plugin and under its FSDP plugin with ``fsdp_version: 2`` (the prepared model
is a ``fully_shard``'ed one, which the engine hands to its FSDP2 backend): the step driver asks the
engine's backend how a step is closed (``optimizer.step()`` for data parallel and FSDP2, the
DeepSpeedEngine's ``step()`` under DeepSpeed, where Accelerate's ``optimizer.step()`` is a no-op),
so the loop does not change. Give every rank the same key file: the noise of each coordinate and
the Poisson batches are derived from it.

What Accelerate would change in the DP step is refused here: fp16 loss scaling (its GradScaler
would unscale gradients that were never scaled, and skip steps on overflow), gradient accumulation
in Accelerate (the logical batch is the loader's; micro-batches already accumulate), torch.compile
of the model, FSDP1 (``fsdp_version: 1``: its flat parameters hide the names the noise is keyed by),
and Megatron-LM or XLA, which dpscale does not drive. Do not call ``accelerator.clip_grad_norm_``: it
would rescale the clipped sum before noise. Accelerate enables its FSDP plugin only on accelerators:
on a CPU-only machine it runs DDP instead, without saying so (Accelerate 1.15).

The forward runs on ``engine.model``: the module the engine hooks (DDP's inner module, whose
forward is the wrapper's here since DDP's reducer is idle; under DeepSpeed the DeepSpeedEngine's
``.module``, since the DeepSpeedEngine's own forward prepares its backward).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from dpscale.backends.fsdp2 import is_fsdp2
from dpscale.config import DPConfig
from dpscale.engine import PrivacyEngine
from dpscale.errors import ConfigError
from dpscale.layers import RuleRegistry
from dpscale.noise import NoiseKey
from dpscale.sampling import DPDataLoader

__all__ = ["check_accelerator", "make_data_loader", "make_private"]

_DATA_PARALLEL_TYPES = {"NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_MUSA",
                        "MULTI_SDAA", "MULTI_HPU"}


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


def make_private(
    accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: DPConfig,
    *,
    noise_key: NoiseKey | str | os.PathLike | None = None,
    rules: RuleRegistry | None = None,
) -> PrivacyEngine:
    """A PrivacyEngine on the model and optimizer returned by ``accelerator.prepare``.

    With several processes the model must be the prepared (DDP-wrapped) one; the engine hooks its
    inner module, keeps DDP's reducer idle, and reduces the noised clipped sums itself
    (DataParallelBackend). Under FSDP (version 2) the prepared model is the fully_shard'ed one and
    the engine's FSDP2Backend reduce-scatters and noises each rank's rows. Every rank must hold the
    same ``noise_key`` (a key file all ranks read): with several processes it is required and
    checked by fingerprint.
    """
    from dpscale.integrations.accelerate_deepspeed import is_deepspeed, make_private_deepspeed

    if is_deepspeed(accelerator):  # a DeepSpeedEngine from accelerator.prepare
        return make_private_deepspeed(accelerator, model, optimizer, config, noise_key=noise_key, rules=rules)
    check_accelerator(accelerator)
    inner_optimizer = getattr(optimizer, "optimizer", optimizer)  # AcceleratedOptimizer wraps it
    if distributed_type(accelerator) == "FSDP":
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
    return PrivacyEngine(model, config, optimizer=inner_optimizer, noise_key=noise_key, rules=rules)


def distributed_type(accelerator) -> str:
    """Accelerate's distributed type as a plain string ("MULTI_GPU", "FSDP", "DEEPSPEED", ...), from
    an Accelerator or anything with its ``distributed_type`` (an enum, or a string in tests)."""
    return str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))


def make_data_loader(accelerator, engine: PrivacyEngine, dataset, *, max_physical_batch_size: int,
                     collate_fn=None, user_ids=None) -> DPDataLoader:
    """This rank's part of each global Poisson batch (positions rank::world_size of the draw every
    rank makes from the shared key; rank and world size within the data-parallel group, which the
    engine's backend knows: under DeepSpeed AutoTP the tensor-parallel ranks of one replica share
    its examples, so Accelerate's process_index would be wrong). Do not pass it through
    ``accelerator.prepare``: that would re-shard it. Micro-batches are moved to
    ``accelerator.device`` by the collator given here, or by the user's losses function.
    user_ids: with DPConfig(privacy_unit="user"), as in ``engine.make_data_loader`` (users, not
    examples, are split across ranks)."""
    return engine.make_data_loader(dataset, max_physical_batch_size=max_physical_batch_size, collate_fn=collate_fn,
                                   user_ids=user_ids)
