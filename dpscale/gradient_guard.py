"""Nothing but ``engine.backward`` gives a trainable parameter a gradient, and nothing but the
attached optimizer (or the training engine's own) steps one: the two halves of "a parameter never
moves without its noise", enforced as it happens rather than found afterwards.

* Backward: the tape refuses a gradient that reaches a recorded module output outside the engine's
  backward, before autograd computes the module's weight gradient (``Tape.refuse_outside_engine_
  backward``). Behind it, ``register_post_accumulate_grad_hook`` on every trainable parameter
  catches whatever reaches a parameter by another road (a parameter read outside its module, a
  hook of another library): the gradient is dropped from ``p.grad`` and the backward stops.
* Optimizers: the clipped sums live in the backend's buffers and ``p.grad`` is None between steps,
  so an optimizer the engine does not know finds nothing to apply. Where torch lets us see it (a
  global optimizer step pre-hook, held by a removable handle and through a weak reference, so that
  several engines coexist and a collected engine leaves nothing behind), such an optimizer stepped
  over the engine's parameters is refused by name before it runs. Once its engine is collected the
  hook is disarmed (it does nothing), never removed from inside torch's loop over the hooks;
  ``engine.detach()`` removes it.

Neither kind of hook holds the engine: a parameter's hooks live in torch's C++ side, out of reach of
the garbage collector's cycle detection, so they hold only a ``ForeignGradientFlag``, and the
optimizer hook a weak reference. An engine that is never detached is collected with its model.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from dpscale.errors import ForeignGradientError

__all__ = ["ForeignGradientFlag", "foreign_backward_error", "guard_optimizers", "guard_parameters"]

_FIX = (
    "Back-propagate one loss per example with engine.backward(per_example_losses) (dpscale.run_logical_step "
    "does), and add any auxiliary term to those per-example losses (one value per example) before calling it. "
    "Nothing was applied and no step was accounted."
)


def foreign_backward_error(where: str) -> ForeignGradientError:
    return ForeignGradientError(
        f"A gradient reached {where} through a backward other than engine.backward (a plain loss.backward(), "
        "accelerator.backward(loss), ds_engine.backward(loss), or an auxiliary loss back-propagated on its own): "
        f"it would train without per-example clipping. {_FIX}"
    )


class ForeignGradientFlag:
    """Set once a gradient from outside ``engine.backward`` reached a trainable parameter: the step
    boundary then refuses every later step (a training engine's own hooks may already hold it)."""

    def __init__(self) -> None:
        self.seen = False


def guard_parameters(parameters: Mapping[str, nn.Parameter], flag: ForeignGradientFlag) -> list:
    """Post-accumulate hooks on every trainable parameter: a gradient autograd accumulated into it
    is removed and refused, and ``flag`` set first."""

    def refuse(name: str) -> Callable[[nn.Parameter], None]:
        def hook(p: nn.Parameter) -> None:
            p.grad = None
            flag.seen = True
            raise foreign_backward_error(f"trainable parameter '{name}'")

        return hook

    return [p.register_post_accumulate_grad_hook(refuse(name)) for name, p in parameters.items()]


class _OptimizerGuard:
    """The removable handle of the global optimizer pre-hook; disarmed once its engine is gone."""

    def __init__(self, ours: set[int], allowed: Callable[[torch.optim.Optimizer], bool] | None) -> None:
        self._ours = ours
        self._allowed = allowed
        self._handle = register_optimizer_step_pre_hook(self._check)

    def _check(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        allowed = self._allowed
        if allowed is None or allowed(optimizer):
            return
        if any(id(p) in self._ours for group in optimizer.param_groups for p in group["params"]):
            raise ForeignGradientError(
                f"{type(optimizer).__name__} steps parameters of a PrivacyEngine that is not attached to it: its "
                "updates would not carry the engine's noise (and it finds no gradient: the engine hands gradients "
                "only to its attached optimizer). Use one optimizer over engine.parameters.values(), attached "
                "with engine.attach_optimizer(optimizer) or PrivacyEngine(..., optimizer=optimizer), and step "
                "only it (or engine.step())."
            )

    def disarm(self) -> None:
        self._allowed = None
        self._ours = set()

    def remove(self) -> None:
        self.disarm()
        self._handle.remove()


def guard_optimizers(
    parameters: Mapping[str, nn.Parameter], owner, allowed: Callable[[object, torch.optim.Optimizer], bool]
) -> _OptimizerGuard:
    """Refuse the step of any torch optimizer over these parameters that ``allowed(owner, optimizer)``
    rejects. ``owner`` (the engine) is held weakly: once collected, the hook is disarmed."""
    ref = weakref.ref(owner)

    def check(optimizer: torch.optim.Optimizer) -> bool:
        engine = ref()
        return engine is None or allowed(engine, optimizer)

    guard = _OptimizerGuard({id(p) for p in parameters.values()}, check)
    weakref.finalize(owner, guard.disarm)
    return guard
