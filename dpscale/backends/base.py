"""The backend Protocol."""

from __future__ import annotations

from typing import Callable, Mapping, Protocol

from torch import Tensor, nn

NoiseFn = Callable[[str, Tensor, int], None]
"""add_noise(name, flat_view, offset): add the noise of elements [offset, offset + numel) of
parameter ``name`` to ``flat_view`` in place."""


class GradientBackend(Protocol):
    def accumulate(self, name: str, param: nn.Parameter, clipped: Tensor) -> None:
        """Add one backward call's clipped sum (divided by B) to the parameter's gradient."""

    def finish_step(self, parameters: Mapping[str, nn.Parameter], add_noise: NoiseFn) -> None:
        """Once per logical step, before the optimizer update: add the noise of the coordinates
        this process owns, and reduce across processes if the training engine does not."""
