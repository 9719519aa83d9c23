"""Backends: where the clipped sums go and which coordinates of the noise each process adds.

A backend knows no layer rule. The engine hands it, per parameter, the clipped sum of the local
examples (already divided by the expected batch size) and, once per logical step, a function that
adds the keyed noise of a parameter's elements [offset, offset + numel) to a tensor. The backend
decides which elements this process owns, so that after the training engine's own reduction each
coordinate carries exactly one draw. ``base.GradientBackend`` is the whole interface.
"""

from __future__ import annotations

from torch import nn

from dpscale.backends.base import GradientBackend, NoiseFn
from dpscale.backends.data_parallel import DataParallelBackend
from dpscale.backends.fsdp2 import FSDP2Backend, is_fsdp1, is_fsdp2
from dpscale.backends.local import LocalBackend
from dpscale.errors import ConfigError

__all__ = ["DataParallelBackend", "FSDP2Backend", "GradientBackend", "LocalBackend", "NoiseFn", "select_backend"]


def select_backend(model: nn.Module, backend: GradientBackend | None) -> tuple[GradientBackend, nn.Module]:
    """(the backend, the module the engine hooks) for ``model``. A DDP-wrapped model is hooked on
    its inner module (its parameter names, which key the noise, are those of the one-process run)
    with a data-parallel backend that keeps DDP's reducer idle; a model with FSDP2's ``fully_shard``
    applied gets ``FSDP2Backend``; ``nn.DataParallel`` and FSDP1's wrapper are refused."""
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
            raise ConfigError("A fully_shard'ed (FSDP2) model needs FSDP2Backend(model): leave backend unset, or pass that.")
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
