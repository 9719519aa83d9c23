"""Which modules own the trainable parameters, under which names, and with which rule.

The names are the ones the noise is keyed by and that clipping groups and checkpoints refer to:
those of the model as the user built it, so that wrappers a training framework inserts (torch's
``checkpoint_wrapper``, used by Accelerate's FSDP activation checkpointing) change neither the
noise nor the names a config gives. Modules that mix examples (BatchNorm in training mode) are
refused here, before anything runs.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from torch import nn

from dpscale.errors import UnsupportedModuleError
from dpscale.layers import RuleRegistry
from dpscale.tape import Owner

__all__ = ["find_owners", "refuse_example_mixing", "refuse_training_batch_norm", "trainable_parameters"]

logger = logging.getLogger(__name__)


def find_owners(model: nn.Module, parameters: dict[str, nn.Parameter], rules: RuleRegistry) -> list[Owner]:
    """Each module that owns trainable parameters directly, with the rule that differentiates it
    (the registry's default where nothing else matches, and for a module differentiated through
    its parent, where the default runs at the enclosing call).

    A parameter registered on a module and on one of its descendants (BERT's MLM head registers
    its bias on the head and on the decoder) is used through the descendant: the ancestor's claim
    is dropped, so it is never counted twice.

    A child whose parameters its parent's forward reads directly, without calling it (the rule's
    ``children``: nn.MultiheadAttention's ``out_proj``), owns nothing: its parameters are the
    parent's, under names such as ``out_proj.weight``."""
    canonical = {id(p): name for name, p in parameters.items()}
    absorbed = _children_read_by_parent(model, rules)
    claims: dict[int, list[tuple[str, nn.Module, str]]] = defaultdict(list)
    for qualname, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule):
            if any(p.requires_grad for p in module.parameters()):
                raise UnsupportedModuleError(
                    f"TorchScript module '{qualname}' has trainable parameters; dpscale needs eager modules."
                )
            continue
        for local, p in module._parameters.items():
            if p is not None and id(p) in canonical:
                if id(module) in absorbed:
                    parent_name, parent, attribute = absorbed[id(module)]
                    claims[id(p)].append((parent_name, parent, f"{attribute}.{local}"))
                else:
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
        through_parent = rules.through_parent(qualname)
        rule = rules.default if through_parent else rules.rule_for(module)
        if rule.validate is not None:
            rule.validate(module)
        if rule is rules.default:
            logger.info(
                "No rule for %s ('%s'): its parameters use the fallback, rule '%s'.",
                type(module).__name__, qualname, rule.name,
            )
        owners.append(
            Owner(module, qualname, rule, tuple(n for n, _ in names), tuple(g for _, g in names), through_parent)
        )
    return owners


# torch's checkpoint_wrapper (Accelerate's FSDP activation checkpointing, torchtune) holds the layer
# under this attribute, which then appears in every parameter name beneath it.
_CHECKPOINT_WRAPPER_SEGMENT = "_checkpoint_wrapped_module."


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{name: parameter} of the trainable parameters, by the names the noise is keyed by and clipping
    groups and checkpoints refer to: those of the model without activation-checkpointing wrappers,
    so that turning checkpointing on changes neither the noise nor the names a config gives."""
    return {name.replace(_CHECKPOINT_WRAPPER_SEGMENT, ""): p for name, p in model.named_parameters() if p.requires_grad}


def _children_read_by_parent(model: nn.Module, rules: RuleRegistry) -> dict[int, tuple[str, nn.Module, str]]:
    """{id(child): (parent's qualified name, parent, attribute)} for the children named by their
    parent's rule (``Rule.children``)."""
    absorbed = {}
    for qualname, module in model.named_modules():
        if next(module.children(), None) is None:
            continue
        rule = rules.default if rules.through_parent(qualname) else rules.rule_for(module)
        for attribute in rule.children:
            child = getattr(module, attribute, None)
            if isinstance(child, nn.Module):
                absorbed[id(child)] = (qualname, module, attribute)
    return absorbed


def refuse_example_mixing(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise UnsupportedModuleError(
                f"BatchNorm '{name}' is in training mode: it normalises each example with statistics of the "
                "whole batch, so one example's gradient depends on the others and clipping bounds nothing. "
                "Replace it with GroupNorm/LayerNorm, or put it in eval mode with frozen statistics."
            )


def refuse_training_batch_norm(module: nn.Module, args: tuple) -> None:
    if module.training and torch.is_grad_enabled():
        raise UnsupportedModuleError(
            f"{type(module).__name__} was switched to training mode after the engine was built; batch "
            "statistics mix examples. Keep it in eval mode (module.eval()) or replace it with GroupNorm."
        )
