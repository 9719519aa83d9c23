"""Which rule computes per-example gradients for which module: data owned by one engine.

Every module resolves to a rule: the last matching registration, else the registry's default
(the torch.func fallback, ``dpscale.layers.functional.FALLBACK``; ``set_default`` replaces it, e.g.
with a rule whose ``validate`` refuses every module without a rule of its own). What a rule is:
``dpscale.layers.rule``.

It also says where the batch lives inside modules that keep it elsewhere than in dim 0
(``register_layout``): nn.TransformerEncoderLayer(batch_first=False) hands its linear layers and
norms [T, B, d] tensors. The layout is read from the module's own configuration at each call,
never guessed from shapes (T may equal B).

The registry is built fresh for every engine (``default_registry()``), so registering a rule for a
custom layer changes that engine only: no import-time or process-global state.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from dpscale.errors import ConfigError
from dpscale.layers.functional import FALLBACK
from dpscale.layers.rule import Rule

Matcher = type | Callable[[nn.Module], bool]


class RuleRegistry:
    """An ordered list of (matcher, rule) and a default rule. Exact types are looked up first, then
    subclasses and predicates in registration order; later registrations win over earlier ones;
    a module nothing matches gets the default."""

    def __init__(self) -> None:
        self._entries: list[tuple[Matcher, Rule]] = []
        self._through_parent: set[str] = set()
        self._default: Rule = FALLBACK
        self._layouts: list[tuple[Matcher, Callable[[nn.Module], int]]] = []

    @property
    def default(self) -> Rule:
        return self._default

    def set_default(self, rule: Rule) -> None:
        """The rule for modules nothing else matches. It also differentiates the calls that other
        rules cannot read and the parameters delegated to an enclosing module, so it must read the
        whole call."""
        if not rule.whole_call:
            raise ConfigError(
                f"The default rule '{rule.name}' must read any call (args, kwargs, every output): build it "
                "with Rule(..., whole_call=True)."
            )
        self._default = rule

    def differentiate_through_parent(self, attribute: str) -> None:
        """Modules stored under this attribute name are always differentiated per example through
        their parent module (the default rule there). For layers whose input has no batch
        dimension but whose leading size may equal the batch size, so that shapes alone cannot
        tell: T5's ``relative_attention_bias`` looks up a [T, T] table, and T may equal B."""
        self._through_parent.add(attribute)

    def through_parent(self, qualname: str) -> bool:
        return qualname.rsplit(".", 1)[-1] in self._through_parent

    def register_layout(self, matcher: Matcher, batch_dim: Callable[[nn.Module], int]) -> None:
        """Inside a matching module's call, the tensors its descendants see keep the batch in
        ``batch_dim(module)`` (0 or 1), until a descendant declares its own layout. Rules of one
        input and one output then read the call with the batch moved to dim 0 (a view)."""
        self._layouts.append((matcher, batch_dim))

    def batch_dim_inside(self, module: nn.Module) -> int | None:
        """The batch dimension declared for ``module``'s descendants, or None if it declares none."""
        for matcher, batch_dim in reversed(self._layouts):
            if (
                (type(module) is matcher or isinstance(module, matcher)) if isinstance(matcher, type)
                else matcher(module)
            ):
                return batch_dim(module)
        return None

    def register(self, matcher: Matcher, rule: Rule) -> None:
        self._entries.append((matcher, rule))

    def rule_for(self, module: nn.Module) -> Rule:
        for matcher, rule in reversed(self._entries):
            if isinstance(matcher, type) and type(module) is matcher:
                return rule
        for matcher, rule in reversed(self._entries):
            if isinstance(matcher, type):
                if isinstance(module, matcher):
                    return rule
            elif matcher(module):
                return rule
        return self._default

    def copy(self) -> RuleRegistry:
        other = RuleRegistry()
        other._entries = list(self._entries)
        other._through_parent = set(self._through_parent)
        other._default = self._default
        other._layouts = list(self._layouts)
        return other
