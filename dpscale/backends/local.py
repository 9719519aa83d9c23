"""One process, plain PyTorch: gradients live in ``p.grad`` and this process owns every
coordinate of the noise."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from dpscale.backends.base import NoiseFn, OptimizerStepped


class LocalBackend(OptimizerStepped):
    rank = 0
    world_size = 1
    model_parallel = None

    def bind(self, engine) -> list:
        return []

    def accumulate(self, name: str, param: nn.Parameter, clipped: Tensor) -> None:
        if param.grad is None:
            param.grad = clipped.reshape(param.shape)
        else:
            param.grad.add_(clipped.reshape(param.shape))

    def finish_step(self, parameters: Mapping[str, nn.Parameter], add_noise: NoiseFn) -> None:
        for name, p in parameters.items():
            if p.grad is None:
                p.grad = torch.zeros_like(p)  # an empty Poisson batch still gets its noise
            elif not p.grad.is_contiguous():
                p.grad = p.grad.contiguous()  # noise is added to the flattened, row-major view
            add_noise(name, p.grad.view(-1), 0)
