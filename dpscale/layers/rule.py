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

Two optional declarations, for modules that break the tape's shape conventions:

* ``batch_size_of(module, inputs)`` says how many examples one call carries, read where the module
  keeps them (``nn.LSTM`` and ``nn.MultiheadAttention`` with ``batch_first=False``: dim 1; an RNN's
  final state: dim 1 always). A rule that declares it reads the layout of its call itself: the tape
  then never guesses the batch from leading sizes, never broadcasts nor delegates the call, and only
  checks that the number is the model's batch size. It may raise ``UnsupportedModuleError`` for a
  call it cannot make exact (``nn.EmbeddingBag`` with offsets).
* ``input_free``: names of parameters whose per-example gradient needs the output gradient alone
  (a bias: the output gradient summed over positions). A call that trains only these is recorded
  without its inputs, so a bias-only model (DP-BiTFiT) keeps no activation that non-private
  training would free; the rule is then called with empty ``inputs`` and must not read them.
* ``children``: names of child modules whose parameters the module's forward reads directly,
  without calling them (``nn.MultiheadAttention`` reads ``out_proj.weight``): their parameters
  belong to this rule, under names relative to the module (``out_proj.weight``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from dpscale.per_example import PerExampleGrad


class CallInputs(tuple):
    """The positional inputs of one module call, with its keyword inputs as ``.kwargs``: a rule of
    the first input reads ``inputs[0]`` as from a plain tuple, a whole-call rule replays
    ``module(*inputs, **inputs.kwargs)``."""

    kwargs: dict[str, Any]

    def __new__(cls, args: tuple = (), kwargs: dict[str, Any] | None = None) -> CallInputs:
        inputs = super().__new__(cls, args)
        inputs.kwargs = {} if kwargs is None else kwargs
        return inputs


# output_grad: one tensor, or for a whole-call rule a tuple with one entry per leaf of the flattened
# output (None where the leaf is not a differentiable output or the losses do not reach it).
GradsFn = Callable[[nn.Module, CallInputs, Any, tuple[str, ...]], Mapping[str, PerExampleGrad]]
ValidateFn = Callable[[nn.Module], None]
BatchSizeFn = Callable[[nn.Module, CallInputs], "int | None"]


@dataclass(frozen=True)
class Rule:
    name: str
    grads: GradsFn
    validate: ValidateFn | None = None
    whole_call: bool = False
    batch_size_of: BatchSizeFn | None = None
    children: tuple[str, ...] = ()
    input_free: frozenset[str] = frozenset()
