"""Normalisation layers with an elementwise affine: per-example gradients are sums over positions
of the output gradient times d(output)/d(parameter), which is diagonal.

``nn.GroupNorm`` and ``nn.InstanceNorm1d/2d/3d`` (affine) normalise each example by its own
statistics; their affine is per channel (dim 1), so the sums run over every other dimension.
An InstanceNorm that tracks running statistics in training mode is refused: the statistics are
averages over the training examples, kept without noise and shipped with the model.

``nn.LayerNorm`` and ``nn.RMSNorm`` recompute the normalised input with torch's own kernels. The
RMS norms of Hugging Face models (Llama, Mistral, Qwen, T5, Gemma...) are arbitrary Python
(``weight * h``, ``(1 + weight) * h``, casts): for them the parameter is replaced, for one batched
call, by a copy with a batch axis, ``[B, 1, ..., d]``, so that one vector-Jacobian product gives
every example's gradient at once. A module that uses its weight in any other way than an
elementwise broadcast fails that call loudly rather than giving a wrong answer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpscale.errors import UnsupportedModuleError
from dpscale.layers.rule import Rule
from dpscale.per_example import Dense, accumulation_dtype, param_shape


def layer_norm_grads(module: nn.LayerNorm, inputs: tuple, output_grad: Tensor, names: tuple[str, ...]):
    if "weight" not in names:  # bias only: recorded without its input
        grad = output_grad.to(accumulation_dtype(output_grad))
        return _reshape_to_params(module, _elementwise(grad, grad, module.normalized_shape, names))
    x = inputs[0]
    dtype = accumulation_dtype(x, output_grad)
    normalized = F.layer_norm(x.detach().to(dtype), module.normalized_shape, None, None, module.eps)
    return _reshape_to_params(module, _elementwise(normalized, output_grad, module.normalized_shape, names))


def rms_norm_grads(module: nn.RMSNorm, inputs: tuple, output_grad: Tensor, names: tuple[str, ...]):
    x = inputs[0]
    dtype = accumulation_dtype(x, output_grad)
    normalized = F.rms_norm(x.detach().to(dtype), module.normalized_shape, None, module.eps)
    return _reshape_to_params(module, _elementwise(normalized, output_grad, module.normalized_shape, names))


def group_norm_grads(module: nn.GroupNorm, inputs: tuple, output_grad: Tensor, names: tuple[str, ...]):
    if "weight" not in names:  # bias only: recorded without its input
        return _per_channel(output_grad.to(accumulation_dtype(output_grad)), output_grad, names)
    x = inputs[0].detach()
    dtype = accumulation_dtype(x, output_grad)
    normalized = F.group_norm(x.to(dtype), module.num_groups, None, None, module.eps)
    return _per_channel(normalized, output_grad, names)


def instance_norm_grads(
    module: nn.modules.instancenorm._InstanceNorm, inputs: tuple, output_grad: Tensor, names: tuple[str, ...]
):
    _refuse_running_statistics(module)
    if "weight" not in names:  # bias only: recorded without its input
        return _per_channel(output_grad.to(accumulation_dtype(output_grad)), output_grad, names)
    x = inputs[0].detach()
    dtype = accumulation_dtype(x, output_grad)
    if module.track_running_stats and not module.training:  # eval mode: the frozen statistics
        mean, var = module.running_mean.to(dtype), module.running_var.to(dtype)
        normalized = F.instance_norm(x.to(dtype), mean, var, None, None, False, 0.0, module.eps)
    else:
        normalized = F.instance_norm(x.to(dtype), None, None, None, None, True, 0.0, module.eps)
    return _per_channel(normalized, output_grad, names)


def _per_channel(normalized: Tensor, output_grad: Tensor, names: tuple[str, ...]) -> dict:
    """[B, C] per-example gradients of a per-channel weight (and bias) over [B, C, *]."""
    batch, channels = normalized.shape[:2]
    grad = output_grad.to(normalized.dtype).reshape(batch, channels, -1)
    out = {}
    if "weight" in names:
        out["weight"] = Dense((grad * normalized.reshape(batch, channels, -1)).sum(2))
    if "bias" in names:
        out["bias"] = Dense(grad.sum(2))
    return out


def _refuse_running_statistics(module: nn.Module) -> None:
    if module.track_running_stats and module.training:
        raise UnsupportedModuleError(
            f"{type(module).__name__}(track_running_stats=True) is in training mode: its running mean and "
            "variance are averages over the training examples, kept without noise and saved with the model, "
            "which would leak them. Build it with track_running_stats=False (training normalises each example "
            "by its own statistics either way), or keep it in eval mode with frozen statistics."
        )


def is_plain_instance_norm(module: nn.Module) -> bool:
    base = nn.modules.instancenorm._InstanceNorm
    return isinstance(module, base) and type(module).forward is base.forward


def _elementwise(normalized: Tensor, output_grad: Tensor, shape, names: tuple[str, ...]) -> dict:
    """Per-example gradients of weight (and bias) over the trailing ``shape`` dimensions."""
    dtype = normalized.dtype
    width = 1
    for size in shape:
        width *= size
    grad = output_grad.to(dtype)
    batch = grad.shape[0]
    out = {}
    if "weight" in names:
        out["weight"] = (grad * normalized).reshape(batch, -1, width).sum(1)
    if "bias" in names:
        out["bias"] = grad.reshape(batch, -1, width).sum(1)
    return out


def _reshape_to_params(module: nn.Module, grads: dict) -> dict:
    return {name: Dense(g.reshape(g.shape[0], *param_shape(getattr(module, name)))) for name, g in grads.items()}


def broadcast_scale_grads(module: nn.Module, inputs: tuple, output_grad: Tensor, names: tuple[str, ...]):
    """Hugging Face RMS norms: one batched call with per-example copies of the parameters.

    The call goes to the forward of a shallow copy of the module, bypassing hooks: a training
    engine's forward hooks (ZeRO-3 gathers partitioned weights in them) must not see the batched
    stand-ins. A weight
    whose storage is partitioned away is replaced by ones: for an elementwise scale (w * h,
    (1 + w) * h) the derivative with respect to w does not depend on w."""
    x = inputs[0].detach()
    dtype = accumulation_dtype(x, output_grad)
    x = x.to(dtype)
    batch = x.shape[0]
    batched = {}
    for name in names:
        param = getattr(module, name)
        shape = tuple(param_shape(param))
        value = (
            param.detach().to(dtype) if param.numel() == math.prod(shape)
            else torch.ones(shape, dtype=dtype, device=x.device)
        )
        full = (batch,) + (1,) * (x.dim() - 1 - len(shape)) + shape
        batched[name] = value.expand(full).clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            out = _without_hooks(module, batched).forward(x, *inputs[1:])
            grads = torch.autograd.grad(out, list(batched.values()), output_grad.to(dtype))
    except RuntimeError as error:
        raise UnsupportedModuleError(
            f"{type(module).__name__} does not use its parameters as an elementwise scale of its "
            "output, so the RMS-norm rule cannot apply; register a rule for it (dpscale.Rule)."
        ) from error
    return {name: Dense(g.reshape(batch, *param_shape(getattr(module, name)))) for name, g in zip(batched, grads)}


def _without_hooks(module: nn.Module, tensors: dict[str, Tensor]) -> nn.Module:
    """A shallow copy of ``module`` whose parameters ``tensors`` are plain attributes; its
    ``forward`` is called directly, so no hook of the original runs. The original is untouched.
    Built with ``object.__new__`` rather than ``copy.copy``: a module FSDP2 sharded is of a class
    whose ``__new__`` calls ``__init__`` again, without the module's arguments."""
    clone = object.__new__(type(module))
    clone.__dict__.update(module.__dict__)
    clone._parameters = {k: v for k, v in module._parameters.items() if k not in tensors}
    for name, tensor in tensors.items():
        object.__setattr__(clone, name, tensor)
    return clone


def is_huggingface_rms_norm(module: nn.Module) -> bool:
    """RMS norms of Hugging Face models: class name ends in RMSNorm (or T5's T5LayerNorm), and
    their only parameter is a 1-D weight."""
    name = type(module).__name__
    if isinstance(module, (nn.RMSNorm, nn.LayerNorm)) or not (name.endswith("RMSNorm") or name == "T5LayerNorm"):
        return False
    params = dict(module.named_parameters(recurse=False))
    return set(params) == {"weight"} and params["weight"].dim() == 1


LAYER_NORM = Rule("layer_norm", layer_norm_grads, input_free=frozenset({"bias"}))
RMS_NORM = Rule("rms_norm", rms_norm_grads)
GROUP_NORM = Rule("group_norm", group_norm_grads, input_free=frozenset({"bias"}))
INSTANCE_NORM = Rule("instance_norm", instance_norm_grads, _refuse_running_statistics, input_free=frozenset({"bias"}))
BROADCAST_SCALE = Rule("broadcast_scale_norm", broadcast_scale_grads)
