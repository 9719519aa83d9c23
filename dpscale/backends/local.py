"""One process, plain PyTorch: this process owns every coordinate of the noise.

The clipped sums accumulate in the backend's own buffers; at the attached optimizer's step each
buffer receives its noise and becomes ``p.grad`` (no copy), and after the step ``p.grad`` is None
again. Between steps an optimizer the engine does not know finds no gradient to apply.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from dpscale.backends.base import BackendContext, NoiseFn, OptimizerStepped
from dpscale.clipped_sum import ClippedSum


class LocalBackend(OptimizerStepped):
    rank = 0
    world_size = 1
    accumulates_during_backward = True  # a write into its own buffer: no collective, no order

    def __init__(self) -> None:
        self._parameters: Mapping[str, nn.Parameter] = {}
        self._sums: dict[str, Tensor] = {}

    def bind(self, context: BackendContext) -> list:
        self._parameters = context.parameters
        return []

    def accumulate(self, name: str, clipped: ClippedSum | None) -> None:
        if clipped is None:  # this backward did not use the parameter
            return
        held = self._sums.get(name)
        if held is None:  # the first backward's sum becomes the buffer (no copy)
            self._sums[name] = clipped.tensor().reshape(self._parameters[name].shape).contiguous()
        else:  # later ones are added by the matmul that forms them
            clipped.write_(held, add=True)

    def write_gradients(self, add_noise: NoiseFn) -> None:
        sums, self._sums = self._sums, {}
        for name, p in self._parameters.items():
            grad = sums.pop(name, None)
            if grad is None:
                grad = torch.zeros_like(p)  # an empty Poisson batch still gets its noise
            add_noise(name, grad.view(-1), 0)
            p.grad = grad

    def local_sums(self) -> Mapping[str, Tensor]:
        return dict(self._sums)
