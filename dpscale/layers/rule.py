"""What a layer rule is: one contract for the built-in rules, user rules and the torch.func
fallback alike, so that the engine calls every rule the same way.

A rule is a pure function ``grads(module, inputs, output_grad, names) -> {name: PerExampleGrad}``
of the module, the inputs of one of its calls and the gradient of that call's output, for the
trainable parameters ``names`` (relative to ``module``). It knows nothing of hooks, clipping or
distribution. An optional ``validate(module)`` refuses, when the engine is built, a configuration
the rule cannot make exact.

Most rules read one thing: the first positional input and the gradient of one output tensor. A rule
built with ``whole_call=True`` reads any call instead: every positional and keyword input, and one
gradient per leaf of the (possibly nested) output. The tape records such a call whole, and hands it
the parameters of descendants that cannot be differentiated on their own (inputs without a batch
dimension), under names relative to the module (``relative_attention_bias.weight``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from torch import nn

from dpscale.per_example import PerExampleGrad


class CallInputs(tuple):
    """The positional inputs of one module call, with its keyword inputs as ``.kwargs``: a rule of
    the first input reads ``inputs[0]`` as from a plain tuple, a whole-call rule replays
    ``module(*inputs, **inputs.kwargs)``."""

    kwargs: dict[str, Any]

    def __new__(cls, args: tuple = (), kwargs: dict[str, Any] | None = None) -> "CallInputs":
        inputs = super().__new__(cls, args)
        inputs.kwargs = {} if kwargs is None else kwargs
        return inputs


# output_grad: one tensor, or for a whole-call rule a tuple with one entry per leaf of the flattened
# output (None where the leaf is not a differentiable output or the losses do not reach it).
GradsFn = Callable[[nn.Module, CallInputs, Any, tuple[str, ...]], Mapping[str, PerExampleGrad]]
ValidateFn = Callable[[nn.Module], None]


@dataclass(frozen=True)
class Rule:
    name: str
    grads: GradsFn
    validate: ValidateFn | None = None
    whole_call: bool = False
