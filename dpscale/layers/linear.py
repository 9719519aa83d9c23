"""Linear maps: ``nn.Linear`` (y = x W^T + b) and GPT-2's ``Conv1D`` (y = x W + b, W stored
transposed). Any number of leading dimensions; positions are flattened into one axis."""

from __future__ import annotations

from torch import Tensor, nn

from dpscale.layers.rule import Rule
from dpscale.per_example import Dense, Outer, param_shape


def _positions(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _grads(module: nn.Module, inputs: tuple, output_grad: Tensor, names: tuple[str, ...], transposed: bool):
    if "weight" not in names:  # bias only: recorded without its input
        return {"bias": Dense(_positions(output_grad).sum(1))}
    activations, grads = _positions(inputs[0]), _positions(output_grad)
    left, right = (activations, grads) if transposed else (grads, activations)
    out = {}
    if "weight" in names:
        out["weight"] = Outer(left=left, right=right, m=left.shape[-1], shape=param_shape(module.weight)).cheapest()
    if "bias" in names:
        out["bias"] = Dense(grads.sum(1))
    return out


def linear_grads(module: nn.Module, inputs: tuple, output_grad: Tensor, names: tuple[str, ...]):
    """nn.Linear's weight is [out, in]: the per-example gradient is sum_t g_t (x) x_t."""
    return _grads(module, inputs, output_grad, names, transposed=False)


def transposed_linear_grads(module: nn.Module, inputs: tuple, output_grad: Tensor, names: tuple[str, ...]):
    """Conv1D keeps its weight as [in, out]: the per-example gradient is sum_t x_t (x) g_t."""
    return _grads(module, inputs, output_grad, names, transposed=True)


LINEAR = Rule("linear", linear_grads, input_free=frozenset({"bias"}))
TRANSPOSED_LINEAR = Rule("transposed_linear", transposed_linear_grads, input_free=frozenset({"bias"}))
