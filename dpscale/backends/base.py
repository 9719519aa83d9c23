"""The engine <-> backend contract, both ways, and nothing else (no optional members probed with
getattr).

A backend knows no layer rule. It decides where the clipped sums live until the step (buffers it
owns, never ``p.grad``), which coordinates of the noise this process adds (so that after the
reduction each coordinate carries exactly one draw), how the sums are reduced across processes,
how a logical step is closed, and what the logical shape of a sharded parameter is.

The engine gives a backend a ``BackendContext`` when it binds it, not itself: the named
parameters, the key's fingerprint (every rank must hold the same key), the modules its rules read
after the backward, and ``close_step``, the one call that checks, accounts and hands back the noise
of the step, for backends whose training engine runs the optimizer (DeepSpeed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from dpscale.clipped_sum import ClippedSum
from dpscale.gradient_guard import ForeignGradientFlag

NoiseFn = Callable[[str, Tensor, int], None]
"""add_noise(name, flat_view, offset): add the noise of elements [offset, offset + numel) of
parameter ``name`` to ``flat_view`` in place."""


class Removable(Protocol):
    def remove(self) -> None: ...


@dataclass(frozen=True)
class BackendContext:
    """What a backend may know of the engine it serves.

    model: the module the engine hooks (a DDP or DeepSpeed wrapper's inner module).
    parameters: the trainable parameters by the names that key the noise, in the engine's order.
    key_fingerprint: the noise key's fingerprint (never the key), compared across ranks.
    modules_read_after_backward: modules whose weights a rule reads after the backward has ended
        (a sharding backend keeps them gathered until the clipped sums are formed); None: any.
    close_step: for a backend that owns the step (``owns_step``): called once per logical step,
        before the update, it runs the engine's step checks, records the step with the accountant
        and returns the step's noise function. A backend that does not own the step never calls it
        (the attached optimizer's pre-hook does, through the engine).
    foreign: its ``seen`` is set once a gradient from outside ``engine.backward`` reached a
        parameter; a backend whose training engine keeps gradient buffers refuses to go on then.
    """

    model: nn.Module
    parameters: Mapping[str, nn.Parameter]
    key_fingerprint: str
    modules_read_after_backward: tuple[nn.Module, ...] | None
    close_step: Callable[[], NoiseFn]
    foreign: ForeignGradientFlag


class GradientBackend(Protocol):
    """rank, world_size: this process's position in the data-parallel group (the loader splits
        each global batch by it; ranks holding shards of one model share their examples).
    sharded_parameters: names of the parameters whose per-example gradient is split across ranks
        (tensor-parallel shards); empty when none is. Their squared norms go through
        ``reduce_sharded_norms``.
    owns_step: True when the training engine runs the optimizer itself (DeepSpeed): the backend
        hooks that step in ``bind`` and calls ``context.close_step`` there, so no torch optimizer
        is attached to the privacy engine.
    swaps_parameters: True when the training engine registers other parameter objects on the
        model while a module is gathered (FSDP2): the engine then checks the model's trainable
        parameters by name, since their objects change by design.
    own_optimizers: the torch optimizers the training engine steps itself (DeepSpeed's base
        optimizer), which the engine must not take for an optimizer it does not know.
    accumulates_during_backward: True when ``accumulate`` may be called inside autograd's backward
        and in any order of the parameters (each still once per backward): the engine then hands a
        clipping group's sums over as soon as the group's norms are known (per-layer clipping:
        layer by layer), which releases its per-example forms early. False: every sum is handed
        over after the backward, in the order of ``context.parameters`` (a backend whose
        ``accumulate`` starts collectives, or relies on that order, as FSDP2's buckets do).
    """

    rank: int
    world_size: int
    sharded_parameters: frozenset[str]
    owns_step: bool
    swaps_parameters: bool
    own_optimizers: tuple[torch.optim.Optimizer, ...]
    accumulates_during_backward: bool

    def bind(self, context: BackendContext) -> Sequence[Removable]:
        """Called once by the engine it serves, when that engine is built: check the topology
        (every rank holds the same key), lay out the buffers, hook the training engine's step.
        Returns removable handles; ``engine.detach()`` removes them."""

    def accumulate(self, name: str, clipped: ClippedSum | None) -> None:
        """Add one backward call's clipped sum (divided by B) to the parameter's buffer, which the
        backend owns: nothing is written to ``p.grad`` before the step. The sum is not computed yet:
        the backend writes it where it lives (``clipped.write_(view, add=...)``, rows by rows where
        it splits dim 0), or takes it as a tensor (``clipped.tensor()``), inside this call. None:
        the backward did not use the parameter (its contribution is zero). The engine hands over
        every parameter once per backward: in the order of ``context.parameters`` after the
        backward, or, where ``accumulates_during_backward``, group by group as their norms are
        known, inside the backward too."""

    def write_gradients(self, add_noise: NoiseFn) -> None:
        """At the attached optimizer's step, before the update: add the noise of the coordinates
        this process owns, reduce across processes if the training engine does not, and make each
        buffer the parameter's ``p.grad`` (no copy). Not called for a backend that owns the step."""

    def release_gradients(self) -> None:
        """After the attached optimizer's step: ``p.grad`` is None again, so that an optimizer the
        engine does not know finds nothing to apply."""

    def local_sums(self) -> Mapping[str, Tensor]:
        """This process's clipped sums (divided by B) accumulated since the last step, by parameter
        name, in the parameters' logical shapes: a diagnostic view, read-only; before any noise or
        reduction."""

    def logical_shape(self, name: str) -> torch.Size:
        """The shape of the whole parameter ``name``, whatever part of it this process stores."""

    def reduce_sharded_norms(self, norms2: Tensor) -> None:
        """Sum, in place, the per-example squared norms of the sharded parameters over the ranks
        that hold the shards of one example's gradient (never over data-parallel ranks)."""

    def accumulation(self) -> AbstractContextManager:
        """The block around one logical step's backward calls (DeepSpeed reduces on its exit)."""

    def padding(self) -> AbstractContextManager:
        """Inside ``accumulation()``: backward calls whose clipped sums are dropped (passes run only
        so that collectives match, see ``micro_batch_count``)."""

    def micro_batch_count(self, local: int) -> int:
        """How many forward/backward passes this rank runs in a logical step of ``local``
        micro-batches: more than ``local`` where every rank must run as many (ZeRO-3, FSDP2); the
        extra ones run inside ``padding()``."""

    def step(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Close the logical step: the update whose pre-hook adds the noise, then clear gradients."""


class OptimizerStepped:
    """What backends whose step is a plain torch optimizer's share: passes need no padding, the
    accumulation block is empty, no parameter is split across ranks, and the step is
    ``optimizer.step()`` (the engine's pre-hook writes the noised gradients, its post-hook releases
    them) followed by ``zero_grad``."""

    owns_step = False
    swaps_parameters = False
    own_optimizers: tuple[torch.optim.Optimizer, ...] = ()
    sharded_parameters: frozenset[str] = frozenset()
    _parameters: Mapping[str, nn.Parameter] = {}

    def accumulation(self) -> AbstractContextManager:
        return contextlib.nullcontext()

    def padding(self) -> AbstractContextManager:
        return contextlib.nullcontext()

    def micro_batch_count(self, local: int) -> int:
        return local

    def logical_shape(self, name: str) -> torch.Size:
        return self._parameters[name].shape

    def reduce_sharded_norms(self, norms2: Tensor) -> None:
        return None

    def release_gradients(self) -> None:
        for p in self._parameters.values():
            p.grad = None

    def step(self, optimizer: torch.optim.Optimizer | None) -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
