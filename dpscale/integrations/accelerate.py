"""Hugging Face Accelerate: the user's ``Accelerator`` loop, made private.

    accelerator = Accelerator()                       # Accelerator(cpu=True) for gloo on CPU
    model, optimizer = accelerator.prepare(model, optimizer)
    engine = make_private(accelerator, model, optimizer, config, noise_key="noise.key")
    loader = make_data_loader(accelerator, engine, train_set, max_physical_batch_size=16)
    for logical_batch in loader:                      # this rank's part of the global Poisson batch
        for micro in logical_batch.micro_batches:
            engine.backward(causal_lm_losses(model(**micro).logits, micro["labels"]))
        optimizer.step()                              # noise once, then one all-reduce
        optimizer.zero_grad(set_to_none=True)

The same script runs on one process, on N CPU processes (gloo) and on N GPUs (nccl). Give every rank
the same key file: the noise of each coordinate and the Poisson batches are derived from it.
What Accelerate would change in the DP step is refused here: fp16 loss scaling (its GradScaler
would unscale gradients that were never scaled, and skip steps on overflow), gradient accumulation
in Accelerate (the logical batch is the loader's; micro-batches already accumulate), torch.compile
of the model, and FSDP, Megatron-LM or XLA, which this data-parallel path does not drive. Do not call
``accelerator.clip_grad_norm_``: it would rescale the clipped sum before noise.

Under Accelerate's DeepSpeed plugin (a DeepSpeedEngine from ``accelerator.prepare``), ``make_private``
and ``make_data_loader`` hand over to ``dpscale.integrations.accelerate_deepspeed``: the same loop,
with the forward on ``engine.model`` and the DeepSpeed step run at the end of each logical batch.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from dpscale.backends import DataParallelBackend, LocalBackend
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
    accepted only with ``deepspeed=True`` (the DeepSpeed path, ``accelerate_deepspeed.py``)."""
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    if kind not in _DATA_PARALLEL_TYPES and not (deepspeed and kind == "DEEPSPEED"):
        raise ConfigError(
            f"Accelerate distributed_type={kind}: dpscale's Accelerate integration drives data-parallel "
            "(DDP) runs and DeepSpeed (make_private routes a prepared DeepSpeedEngine to "
            "dpscale.integrations.accelerate_deepspeed); set distributed_type to MULTI_CPU / MULTI_GPU, NO or "
            "DEEPSPEED in the accelerate config."
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
    (DataParallelBackend). Every rank must hold the same ``noise_key`` (a key file all ranks read):
    with several processes it is required and checked by fingerprint.
    """
    from dpscale.integrations.accelerate_deepspeed import is_deepspeed, make_private_deepspeed

    if is_deepspeed(accelerator):  # a DeepSpeedEngine from accelerator.prepare
        return make_private_deepspeed(accelerator, model, optimizer, config, noise_key=noise_key, rules=rules)
    check_accelerator(accelerator)
    inner_optimizer = getattr(optimizer, "optimizer", optimizer)  # AcceleratedOptimizer wraps it
    if accelerator.num_processes > 1:
        if not isinstance(model, nn.parallel.DistributedDataParallel):
            raise ConfigError(
                f"{accelerator.num_processes} processes but the model is not DDP-wrapped: pass the model "
                "returned by accelerator.prepare(model, optimizer)."
            )
        if noise_key is None:
            raise ConfigError(
                "Several processes need one noise key shared by all ranks (the noise of each coordinate and "
                "the Poisson batches derive from it): create it once with dpscale.noise.NoiseKey.write_new(path) "
                "and pass noise_key=path on every rank."
            )
        key = noise_key if isinstance(noise_key, NoiseKey) else NoiseKey.from_file(noise_key)
        backend = DataParallelBackend(model.process_group)
    else:
        key = noise_key
        backend = LocalBackend()
    return PrivacyEngine(model, config, optimizer=inner_optimizer, noise_key=key, rules=rules, backend=backend)


def make_data_loader(accelerator, engine: PrivacyEngine, dataset, *, max_physical_batch_size: int,
                     collate_fn=None) -> DPDataLoader:
    """This rank's part of each global Poisson batch (positions rank::world_size of the draw every
    rank makes from the shared key; rank and world size within the data-parallel group). Do not
    pass it through ``accelerator.prepare``: that would re-shard it. Micro-batches are moved to
    ``accelerator.device`` by the collator given here, or by the user."""
    # The engine's backend knows this process's data-parallel position: under DeepSpeed AutoTP the
    # tensor-parallel ranks of one replica share its examples, so process_index would be wrong.
    loader = engine.make_data_loader(
        dataset, max_physical_batch_size=max_physical_batch_size, collate_fn=collate_fn,
    )
    from dpscale.integrations.accelerate_deepspeed import is_deepspeed, stepping_loader

    if is_deepspeed(accelerator):  # each logical batch ends with one DeepSpeed step
        return stepping_loader(engine, loader)
    return loader
