"""The backend Protocol: everything the engine and the step driver ask of a backend, and nothing
else (no optional members probed with getattr).

A backend knows no layer rule. It decides where the clipped sums go, which coordinates of the
noise this process adds (so that after the reduction each coordinate carries exactly one draw),
how the gradients are reduced across processes, and how a logical step is closed.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Mapping, Protocol, Sequence

import torch
from torch import Tensor, nn

NoiseFn = Callable[[str, Tensor, int], None]
"""add_noise(name, flat_view, offset): add the noise of elements [offset, offset + numel) of
parameter ``name`` to ``flat_view`` in place."""


class Removable(Protocol):
    def remove(self) -> None: ...


class GradientBackend(Protocol):
    """rank, world_size: this process's position in the data-parallel group (the loader splits
        each global batch by it; ranks holding shards of one model share their examples).
    model_parallel: (group, names of the parameters split over it) when one example's gradient is
        split across ranks (tensor parallelism): their per-example squared norms are summed over
        the group; None otherwise.
    owns_step: True when the training engine runs the optimizer itself (DeepSpeed): the backend
        hooks that step in ``bind``, so no torch optimizer is attached to the privacy engine.
    swaps_parameters: True when the training engine registers other parameter objects on the
        model while a module is gathered (FSDP2 puts unsharded tensors in place of its DTensors
        between forward and reshard): the engine then checks the model's trainable parameters by
        name, since their objects change by design.
    """

    rank: int
    world_size: int
    model_parallel: tuple[object, frozenset[str]] | None
    owns_step: bool
    swaps_parameters: bool

    def bind(self, engine) -> Sequence[Removable]:
        """Called once by the engine it serves, when that engine is built: check the topology
        (every rank holds the same key), lay out gradients, hook the training engine's step.
        Returns removable handles; ``engine.detach()`` removes them."""

    def accumulate(self, name: str, param: nn.Parameter, clipped: Tensor) -> None:
        """Add one backward call's clipped sum (divided by B) to the parameter's gradient."""

    def finish_step(self, parameters: Mapping[str, nn.Parameter], add_noise: NoiseFn) -> None:
        """Once per logical step, before the optimizer update: add the noise of the coordinates
        this process owns, and reduce across processes if the training engine does not."""

    def accumulation(self) -> ContextManager:
        """The block around one logical step's backward calls (DeepSpeed reduces on its exit)."""

    def padding(self) -> ContextManager:
        """Inside ``accumulation()``: backward calls whose clipped sums are dropped (passes run only
        so that collectives match, see ``micro_batch_count``)."""

    def micro_batch_count(self, local: int) -> int:
        """How many forward/backward passes this rank runs in a logical step of ``local``
        micro-batches: more than ``local`` where every rank must run as many (ZeRO-3 gathers
        parameters in each pass); the extra ones run inside ``padding()``."""

    def step(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Close the logical step: the update whose pre-hook adds the noise, then clear gradients."""


class OptimizerStepped:
    """What backends whose step is a plain torch optimizer's share: passes need no padding, the
    accumulation block is empty, and the step is ``optimizer.step()`` (the engine's pre-hook adds
    the noise) followed by ``zero_grad``."""

    owns_step = False
    swaps_parameters = False

    def accumulation(self) -> ContextManager:
        return contextlib.nullcontext()

    def padding(self) -> ContextManager:
        return contextlib.nullcontext()

    def micro_batch_count(self, local: int) -> int:
        return local

    def step(self, optimizer: torch.optim.Optimizer | None) -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
