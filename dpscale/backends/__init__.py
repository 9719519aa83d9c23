"""Backends: where the clipped sums live until the step, which coordinates of the noise each
process adds, and how the step is closed. ``base`` holds the whole contract (``GradientBackend``,
``BackendContext``); ``select_backend`` is the one place that picks a backend for a model, whatever
wraps it (DDP, FSDP2, a DeepSpeedEngine).
"""

from __future__ import annotations

import sys

from torch import nn

from dpscale.backends.base import BackendContext, GradientBackend, NoiseFn
from dpscale.backends.data_parallel import DataParallelBackend
from dpscale.backends.fsdp2 import FSDP2Backend, is_fsdp1, is_fsdp2
from dpscale.backends.local import LocalBackend
from dpscale.errors import ConfigError

__all__ = [
    "BackendContext", "DataParallelBackend", "FSDP2Backend", "GradientBackend", "LocalBackend", "NoiseFn",
    "select_backend",
]


def select_backend(model: nn.Module, backend: GradientBackend | None) -> tuple[GradientBackend, nn.Module]:
    """(the backend, the module the engine hooks) for ``model``. A DeepSpeedEngine is hooked on its
    inner module with ``DeepSpeedBackend``; a DDP-wrapped model on its inner module (its parameter
    names, which key the noise, are those of the one-process run) with a data-parallel backend that
    keeps DDP's reducer idle; a model with FSDP2's ``fully_shard`` applied gets ``FSDP2Backend``;
    ``nn.DataParallel`` and FSDP1's wrapper are refused. A backend given explicitly must be the one
    this function would build for that kind of model."""
    if _is_deepspeed_engine(model):
        from dpscale.backends.deepspeed import DeepSpeedBackend

        if backend is None:
            return DeepSpeedBackend(model), model.module
        if not isinstance(backend, DeepSpeedBackend) or backend.ds_engine is not model:
            raise ConfigError("A DeepSpeedEngine needs DeepSpeedBackend(ds_engine): leave backend unset, or pass that.")
        return backend, model.module
    if is_fsdp1(model):
        raise ConfigError(
            "FullyShardedDataParallel (FSDP1) flattens parameters into FlatParameters, so dpscale cannot key the "
            "noise by parameter name nor hook the layers' own weights. Use FSDP2 instead: "
            "torch.distributed.fsdp.fully_shard on each layer and then on the root module (with Accelerate: "
            "fsdp_version: 2); dpscale selects its FSDP2 backend for it."
        )
    if is_fsdp2(model):
        if backend is None:
            return FSDP2Backend(model), model
        if not isinstance(backend, FSDP2Backend) or backend.model is not model:
            raise ConfigError(
                "A fully_shard'ed (FSDP2) model needs FSDP2Backend(model): leave backend unset, or pass that."
            )
        return backend, model
    if isinstance(model, nn.parallel.DistributedDataParallel):
        if backend is None:
            return DataParallelBackend.for_ddp(model), model.module
        if not isinstance(backend, DataParallelBackend) or backend.for_wrapper is not model:
            raise ConfigError(
                "A DDP-wrapped model needs DataParallelBackend.for_ddp(model) (which keeps DDP's own reducer "
                "idle while dpscale reduces the noised sums): leave backend unset, or pass that."
            )
        return backend, model.module
    if isinstance(model, nn.DataParallel):
        raise ConfigError(
            "nn.DataParallel replicates the model on every forward, so hooks on the original module "
            "see no per-device call; use DistributedDataParallel (torchrun or accelerate launch)."
        )
    return (backend if backend is not None else LocalBackend()), model


def _is_deepspeed_engine(model: nn.Module) -> bool:
    """Without importing DeepSpeed: a process that never imported it holds no DeepSpeedEngine."""
    deepspeed = sys.modules.get("deepspeed")
    engine_class = getattr(deepspeed, "DeepSpeedEngine", None) if deepspeed is not None else None
    return engine_class is not None and isinstance(model, engine_class)
