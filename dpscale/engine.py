"""PrivacyEngine: one backward pass that leaves sum_i clip(g_i) / B in every trainable ``p.grad``.

The flow (book-keeping): the tape records each trainable module's input activation during the
forward pass; ``backward(losses)`` asks autograd for the gradients of the recorded module outputs
only, so no parameter receives a non-private weight gradient; per-layer rules turn (activation,
output gradient) into per-example squared norms (ghost norms or per-example gradients, whichever
is cheaper for the shapes at hand), the norms give clip factors, and the same stored factors give
the clipped sums. The engine knows no training engine: backends decide where the sums go.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from torch import Tensor, nn

from dpscale.clipping import ClippingPlan, build_plan
from dpscale.config import DPConfig
from dpscale.errors import LossShapeError, NoTrainableParametersError, TapeError, UnsupportedModuleError
from dpscale.layers import RuleRegistry, default_registry
from dpscale.layers.functional import functional_grads
from dpscale.per_example import GramCache, PerExampleGrad, total_squared_norm, weighted_sum
from dpscale.tape import FunctionalCall, Owner, RuleCall, Tape

logger = logging.getLogger(__name__)


class PrivacyEngine:
    """Exact per-example clipping for ``model``'s trainable parameters.

    ``rules``: a registry from ``dpscale.default_registry()`` with rules for custom layers
    registered on it; the engine keeps its own copy.
    """

    def __init__(self, model: nn.Module, config: DPConfig, *, rules: RuleRegistry | None = None) -> None:
        if not isinstance(config, DPConfig):
            raise TypeError("config must be a dpscale.DPConfig")
        self.model = model
        self.config = config
        self.rules = (rules or default_registry()).copy()
        self.parameters: dict[str, nn.Parameter] = {
            name: p for name, p in model.named_parameters() if p.requires_grad
        }
        if not self.parameters:
            raise NoTrainableParametersError(
                "The model has no parameter with requires_grad=True: nothing to train privately."
            )
        _refuse_example_mixing(model)
        owners = find_owners(model, self.parameters, self.rules)
        self.clipping: ClippingPlan = build_plan(config, list(self.parameters))
        self._group_of = self.clipping.group_of()
        self._tape = Tape(model, owners)
        self._handles = [
            module.register_forward_pre_hook(_refuse_training_batch_norm)
            for module in model.modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
        ]
        self.last_norms: Tensor | None = None
        self.last_group_norms: Tensor | None = None
        self.last_clip_factors: Tensor | None = None

    # the one seam -----------------------------------------------------------------------------

    def backward(self, losses: Tensor) -> None:
        """Back-propagate one loss per example and add sum_i clip(g_i) / B to each ``p.grad``.

        Several calls before an optimizer step accumulate, as ``loss.backward()`` does."""
        batch = self._check_losses(losses)
        calls = self._tape.take()
        self._check_all_uses_recorded(losses, calls)
        edges = [edge for call in calls for edge in _edges(call)]
        grads = list(torch.autograd.grad(losses.sum(), edges, allow_unused=True)) if edges else []
        with torch.no_grad(), self._tape.paused():
            uses = self._per_example_grads(calls, grads, batch)
            del calls, grads
            self._accumulate_clipped(uses, batch)

    def detach(self) -> None:
        """Remove every hook: the model is left as it was found."""
        self._tape.detach()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # steps of backward --------------------------------------------------------------------------

    def _check_losses(self, losses: Tensor) -> int:
        if not isinstance(losses, Tensor):
            raise LossShapeError(f"engine.backward expects a tensor of per-example losses, got {type(losses).__name__}.")
        batch = self._tape.batch_size
        if batch is None:
            raise TapeError("No forward pass with gradients enabled was recorded; run the model before engine.backward.")
        if losses.dim() != 1:
            raise LossShapeError(
                f"engine.backward expects one loss per example, shape [{batch}], got shape {tuple(losses.shape)}. "
                "Do not reduce the loss over the batch: use dpscale.losses (e.g. causal_lm_losses) or "
                "reduction='none'."
            )
        if losses.shape[0] != batch:
            raise LossShapeError(f"Got {losses.shape[0]} losses for a forward pass over {batch} examples.")
        if not losses.requires_grad:
            raise LossShapeError("The losses do not require grad: were they computed under torch.no_grad()?")
        return batch

    def _check_all_uses_recorded(self, losses: Tensor, calls: list) -> None:
        """Every trainable parameter that the losses depend on must have been used through a
        recorded module call; a parameter used directly by another module's forward would
        otherwise lose its gradient silently."""
        recorded = {name for call in calls for name in call.global_names}
        reached = _parameters_reached(losses)
        missing = [name for name, p in self.parameters.items() if id(p) in reached and name not in recorded]
        if missing:
            raise UnsupportedModuleError(
                f"Trainable parameters {missing[:5]} are used outside the forward of the module that owns them "
                "(e.g. a parent reads child.weight directly), so dpscale cannot see their per-example "
                "gradients. Freeze them or register a rule for the module that uses them."
            )

    def _per_example_grads(self, calls: list, grads: list, batch: int) -> dict[str, list[PerExampleGrad]]:
        uses: dict[str, list[PerExampleGrad]] = defaultdict(list)
        position = 0
        for call in calls:
            count = len(_edges(call))
            call_grads = grads[position : position + count]
            grads[position : position + count] = [None] * count  # free as we go
            position += count
            if all(g is None for g in call_grads):
                continue
            if isinstance(call, RuleCall):
                owner = call.owner
                local = owner.rule.grads(owner.module, call.inputs, call_grads[0], owner.local_names)
                if set(local) != set(owner.local_names):
                    raise UnsupportedModuleError(
                        f"Rule '{owner.rule.name}' for '{owner.qualname}' returned gradients for {sorted(local)} "
                        f"but the module's trainable parameters are {sorted(owner.local_names)}."
                    )
                for local_name, global_name in zip(owner.local_names, owner.global_names):
                    uses[global_name].append(local[local_name])
            else:
                for global_name, grad in functional_grads(call, call_grads, batch).items():
                    uses[global_name].append(grad)
        return uses

    def _accumulate_clipped(self, uses: dict[str, list[PerExampleGrad]], batch: int) -> None:
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.parameters.values()) else torch.float32
        device = next(iter(self.parameters.values())).device
        norms2 = torch.zeros(len(self.clipping.groups), batch, dtype=dtype, device=device)
        grams = GramCache()
        for name, grad_uses in uses.items():
            norms2[self._group_of[name]] += total_squared_norm(grad_uses, grams).to(dtype)
        del grams
        norms = norms2.sqrt()
        factors = self.clipping.factors(norms)
        weights = factors / self.config.expected_batch_size
        for name, p in self.parameters.items():
            grad_uses = uses.pop(name, [])
            clipped = None
            for use in grad_uses:
                term = weighted_sum(use, weights[self._group_of[name]], p.dtype)
                clipped = term if clipped is None else clipped + term
            if clipped is None:
                clipped = torch.zeros_like(p)
            if p.grad is None:
                p.grad = clipped.reshape(p.shape)
            else:
                p.grad.add_(clipped.reshape(p.shape))
        self.last_group_norms = norms
        self.last_norms = norms2.sum(0).sqrt()
        self.last_clip_factors = factors


def _edges(call) -> tuple:
    return (call.edge,) if isinstance(call, RuleCall) else call.edges


def find_owners(model: nn.Module, parameters: dict[str, nn.Parameter], rules: RuleRegistry) -> list[Owner]:
    """Each module that owns trainable parameters directly, with the rule that differentiates it.

    A parameter registered on a module and on one of its descendants (BERT's MLM head registers
    its bias on the head and on the decoder) is used through the descendant: the ancestor's claim
    is dropped, so it is never counted twice."""
    canonical = {id(p): name for name, p in parameters.items()}
    claims: dict[int, list[tuple[str, nn.Module, str]]] = defaultdict(list)
    for qualname, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule):
            if any(p.requires_grad for p in module.parameters()):
                raise UnsupportedModuleError(f"TorchScript module '{qualname}' has trainable parameters; dpscale needs eager modules.")
            continue
        for local, p in module._parameters.items():
            if p is not None and id(p) in canonical:
                claims[id(p)].append((qualname, module, local))
    by_module: dict[int, tuple[nn.Module, str, list[tuple[str, str]]]] = {}
    for pid, owners in claims.items():
        for qualname, module, local in owners:
            prefix = qualname + "." if qualname else ""
            if any(other != qualname and other.startswith(prefix) for other, _, _ in owners):
                continue
            entry = by_module.setdefault(id(module), (module, qualname, []))
            entry[2].append((local, canonical[pid]))
    owners = []
    for module, qualname, names in by_module.values():
        rule = rules.rule_for(module)
        if rule is not None and rule.validate is not None:
            rule.validate(module)
        if rule is None:
            logger.info("No rule for %s ('%s'): its parameters use the torch.func fallback.", type(module).__name__, qualname)
        owners.append(Owner(module, qualname, rule, tuple(n for n, _ in names), tuple(g for _, g in names)))
    return owners


def _refuse_example_mixing(model: nn.Module) -> None:
    checkpointing = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    if getattr(model, checkpointing, False):
        raise UnsupportedModuleError(
            "Gradient checkpointing re-runs forward hooks inside the backward pass; disable it "
            "(model.gradient_checkpointing_disable()) to train with dpscale."
        )
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise UnsupportedModuleError(
                f"BatchNorm '{name}' is in training mode: it normalises each example with statistics of the "
                "whole batch, so one example's gradient depends on the others and clipping bounds nothing. "
                "Replace it with GroupNorm/LayerNorm, or put it in eval mode with frozen statistics."
            )


def _refuse_training_batch_norm(module: nn.Module, args: tuple) -> None:
    if module.training and torch.is_grad_enabled():
        raise UnsupportedModuleError(
            f"{type(module).__name__} was switched to training mode after the engine was built; batch "
            "statistics mix examples. Keep it in eval mode (module.eval()) or replace it with GroupNorm."
        )


def _parameters_reached(losses: Tensor) -> set[int]:
    """ids of the leaf tensors whose AccumulateGrad nodes the losses' graph reaches."""
    reached: set[int] = set()
    root = losses.grad_fn
    if root is None:
        return reached
    seen = {root}
    stack = [root]
    while stack:
        node = stack.pop()
        variable = getattr(node, "variable", None)
        if variable is not None:
            reached.add(id(variable))
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                stack.append(child)
    return reached
