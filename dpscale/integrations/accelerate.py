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

What Accelerate would change in the DP step is refused (``accelerate_checks.py`` holds every such
refusal, for this path, the DeepSpeed plugin and DPTrainer alike). Do not call
``accelerator.clip_grad_norm_``: it would rescale the clipped sum before noise.

The forward runs on ``engine.model``: the module the engine hooks (DDP's inner module, whose
forward is the wrapper's here since DDP's reducer is idle; under DeepSpeed the DeepSpeedEngine's
``.module``, since the DeepSpeedEngine's own forward prepares its backward).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from dpscale.config import DPConfig
from dpscale.engine import PrivacyEngine
from dpscale.integrations.accelerate_checks import (
    check_accelerator,
    check_prepared,
    distributed_type,
    is_deepspeed,
)
from dpscale.integrations.accelerate_deepspeed import make_private_deepspeed
from dpscale.layers import RuleRegistry
from dpscale.noise import NoiseKey
from dpscale.sampling import DPDataLoader

# check_accelerator and distributed_type are re-exported: callers imported them from here first.
__all__ = ["check_accelerator", "distributed_type", "make_data_loader", "make_private"]


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
    if is_deepspeed(accelerator):  # a DeepSpeedEngine from accelerator.prepare
        return make_private_deepspeed(accelerator, model, optimizer, config, noise_key=noise_key, rules=rules)
    check_accelerator(accelerator)
    check_prepared(accelerator, model, optimizer)
    inner_optimizer = getattr(optimizer, "optimizer", optimizer)  # AcceleratedOptimizer wraps it
    return PrivacyEngine(model, config, optimizer=inner_optimizer, noise_key=noise_key, rules=rules)


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
