"""Which rule computes per-example gradients for which module: data owned by one engine.

A rule is a pure function ``grads(module, inputs, output_grad, names) -> {name: PerExampleGrad}``
of the module, its positional inputs and the gradient of its output, for the module's own
trainable parameters ``names``. It knows nothing of hooks, clipping or distribution. An optional
``validate(module)`` refuses, when the engine is built, a configuration the rule cannot make exact.

The registry is built fresh for every engine (``default_registry()``), so registering a rule for a
custom layer changes that engine only: no import-time or process-global state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from torch import Tensor, nn

from dpscale.per_example import PerExampleGrad

GradsFn = Callable[[nn.Module, tuple, Tensor, tuple[str, ...]], Mapping[str, PerExampleGrad]]
ValidateFn = Callable[[nn.Module], None]
Matcher = type | Callable[[nn.Module], bool]


@dataclass(frozen=True)
class Rule:
    name: str
    grads: GradsFn
    validate: ValidateFn | None = None


class RuleRegistry:
    """An ordered list of (matcher, rule). Exact types are looked up first, then subclasses and
    predicates in registration order; later registrations win over earlier ones."""

    def __init__(self) -> None:
        self._entries: list[tuple[Matcher, Rule]] = []
        self._through_parent: set[str] = set()

    def differentiate_through_parent(self, attribute: str) -> None:
        """Modules stored under this attribute name are always differentiated per example through
        their parent module (torch.func fallback there). For layers whose input has no batch
        dimension but whose leading size may equal the batch size, so that shapes alone cannot
        tell: T5's ``relative_attention_bias`` looks up a [T, T] table, and T may equal B."""
        self._through_parent.add(attribute)

    def through_parent(self, qualname: str) -> bool:
        return qualname.rsplit(".", 1)[-1] in self._through_parent

    def register(self, matcher: Matcher, rule: Rule) -> None:
        self._entries.append((matcher, rule))

    def rule_for(self, module: nn.Module) -> Rule | None:
        for matcher, rule in reversed(self._entries):
            if isinstance(matcher, type) and type(module) is matcher:
                return rule
        for matcher, rule in reversed(self._entries):
            if isinstance(matcher, type):
                if isinstance(module, matcher):
                    return rule
            elif matcher(module):
                return rule
        return None

    def copy(self) -> "RuleRegistry":
        other = RuleRegistry()
        other._entries = list(self._entries)
        other._through_parent = set(self._through_parent)
        return other
