"""DeepSpeed AutoTP's sharded linear layers (``deepspeed.module_inject.layers``, training mode).

``LinearLayer`` holds a block of output features (rows of the weight, and of the bias); its input
is the full activation, replicated on the tensor-parallel ranks. ``LinearAllreduce`` holds a block
of input features (columns of the weight) and multiplies the matching slice of the activation; its
output is summed over the ranks, and its bias, added after the sum, is replicated. For both, the
per-example gradient of the local shard is nn.Linear's formula applied to the module's own input
and the gradient of its own output: local tensors, nothing gathered. Which parameters are shards,
and where they sit in the full parameter, is the business of the DeepSpeed backend.

Any other AutoTP layer with trainable parameters (fused QKV layouts, the row-parallel output head)
is refused when the engine is built: the generic torch.func
fallback would not see the collectives inside it.
"""

from __future__ import annotations

import sys

from torch import Tensor, nn

from dpscale.errors import UnsupportedModuleError
from dpscale.layers.linear import linear_grads
from dpscale.layers.rule import Rule

__all__ = ["TP_LINEAR", "TP_UNSUPPORTED", "is_autotp_layer", "is_autotp_linear"]

_SUPPORTED = ("LinearLayer", "LinearAllreduce")


def _layers_module():
    """DeepSpeed's layer module if the process has imported it (no import here: a model with AutoTP
    layers has already imported it, and everyone else pays nothing)."""
    return sys.modules.get("deepspeed.module_inject.layers")


def is_autotp_linear(module: nn.Module) -> bool:
    layers = _layers_module()
    return layers is not None and any(type(module) is getattr(layers, name, None) for name in _SUPPORTED)


def is_autotp_layer(module: nn.Module) -> bool:
    layers = _layers_module()
    base = getattr(layers, "TensorParallel_Layer", None) if layers is not None else None
    return base is not None and isinstance(module, base)


def autotp_linear_grads(module: nn.Module, inputs: tuple, output_grad: Tensor, names: tuple[str, ...]):
    """nn.Linear's per-example gradient of the local shard. A ``LinearLayer`` that gathers its
    output (AutoTP does so for the LM head) returns every rank's block of features side by side:
    the local shard's output gradient is this rank's block of the gathered gradient."""
    if getattr(module, "gather_output", False):
        sizes = [int(s) for s in module._partition_sizes]
        start = sum(sizes[: module.tp_index])
        output_grad = output_grad[..., start : start + sizes[module.tp_index]]
    return linear_grads(module, inputs, output_grad, names)


def validate_autotp_linear(module: nn.Module) -> None:
    if getattr(module, "defer_collectives_to_compiler", False):
        raise UnsupportedModuleError(
            f"AutoTP {type(module).__name__} defers its collectives to torch.compile; dpscale needs eager layers."
        )


def refuse_autotp_layer(module: nn.Module) -> None:
    raise UnsupportedModuleError(
        f"DeepSpeed AutoTP layer {type(module).__name__} has trainable parameters and no dpscale rule (supported: "
        f"{', '.join(_SUPPORTED)}). Freeze its parameters, or keep this layer out of AutoTP's partitioning."
    )


def _never(module, inputs, output_grad, names):  # validate refuses first
    refuse_autotp_layer(module)


TP_LINEAR = Rule("autotp_linear", autotp_linear_grads, validate_autotp_linear)
TP_UNSUPPORTED = Rule("autotp_unsupported", _never, refuse_autotp_layer)
