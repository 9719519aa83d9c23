"""``nn.Conv1d`` and ``nn.Conv2d`` (groups=1, zero padding): unfolded into patches, a convolution
is a linear map applied at every output position, so its rule is the linear rule over patches
(ViT's patch embedding is one position per patch)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from dpscale.layers.rule import Rule
from dpscale.per_example import Dense, Outer, param_shape


def _as_2d(module: nn.Module, x: Tensor, output_grad: Tensor):
    """View a Conv1d as a Conv2d over (length, 1)."""
    if isinstance(module, nn.Conv1d):
        padding = module.padding if isinstance(module.padding, str) else (module.padding[0], 0)
        kernel, dilation, stride = ((value[0], 1) for value in (module.kernel_size, module.dilation, module.stride))
        return x[..., None], output_grad[..., None], kernel, dilation, stride, padding
    return x, output_grad, module.kernel_size, module.dilation, module.stride, module.padding


def convolution_grads(module: nn.Module, inputs: tuple, output_grad: Tensor, names: tuple[str, ...]):
    if "weight" not in names:  # bias only: recorded without its input; sum over every position
        return {"bias": Dense(output_grad.reshape(output_grad.shape[0], output_grad.shape[1], -1).sum(2))}
    x, grad, kernel, dilation, stride, padding = _as_2d(module, inputs[0], output_grad)
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        else:  # "same" (stride 1): torch pads the extra element of an even kernel on the right
            pads = []
            for k, d in reversed(list(zip(kernel, dilation))):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
            padding = (0, 0)
    batch = x.shape[0]
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # [B, C*k, L]
    grads = grad.reshape(batch, grad.shape[1], -1).transpose(1, 2)  # [B, L, out]
    out = {}
    if "weight" in names:
        out["weight"] = Outer(
            left=grads, right=patches.transpose(1, 2), m=grads.shape[-1], shape=param_shape(module.weight)
        ).cheapest()
    if "bias" in names:
        out["bias"] = Dense(grads.sum(1))
    return out


def is_plain_convolution(module: nn.Module) -> bool:
    return (
        type(module) in (nn.Conv1d, nn.Conv2d)
        and module.groups == 1
        and module.padding_mode == "zeros"
    )


CONVOLUTION = Rule("convolution", convolution_grads, input_free=frozenset({"bias"}))
