"""The fallback for any module without a rule: recompute its forward for one example at a time
under ``torch.func.vmap`` and take the vector-Jacobian product with that example's output
gradient, for exactly the parameters handed to it.

Exact for any module whose forward is a function of its inputs and parameters. Random operations
(dropout in training mode) cannot be replayed identically inside vmap, so vmap runs with
``randomness="error"``: such a module fails loudly instead of yielding a gradient of a different
forward pass.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from dpscale.errors import UnsupportedModuleError
from dpscale.per_example import Dense
from dpscale.tape import FunctionalCall


def functional_grads(call: FunctionalCall, output_grads: list[Tensor | None], batch_size: int) -> dict[str, Dense]:
    """Per-example gradients {global name: Dense} for the parameters of one recorded call."""
    leaves, spec = tree_flatten((call.args, call.kwargs))
    batched_positions = [
        i for i, leaf in enumerate(leaves)
        if isinstance(leaf, Tensor) and leaf.dim() > 0 and leaf.shape[0] == batch_size
    ]
    batched_inputs = [leaves[i].detach() for i in batched_positions]
    cotangents = [
        grad if grad is not None else torch.zeros(shape, dtype=dtype, device=_device(leaves))
        for grad, (shape, dtype) in zip(output_grads, call.leaf_shapes)
    ]
    targets = {name: call.module.get_parameter(name).detach() for name in call.names}
    module, leaf_indices = call.module, call.leaf_indices

    def one_example(params: dict, inputs: list, grads: list):
        full = list(leaves)
        for position, value in zip(batched_positions, inputs):
            full[position] = value.unsqueeze(0)
        args, kwargs = tree_unflatten(full, spec)

        def forward(p: dict):
            outputs, _ = tree_flatten(functional_call(module, p, args, kwargs, strict=False))
            return tuple(outputs[i] for i in leaf_indices)

        _, pullback = vjp(forward, params)
        return pullback(tuple(g.unsqueeze(0) for g in grads))[0]

    try:
        with torch.enable_grad():
            grads = vmap(one_example, in_dims=(None, 0, 0), randomness="error")(targets, batched_inputs, cotangents)
    except RuntimeError as error:
        hint = (
            " It draws random numbers (dropout in training mode?): set that dropout to 0 or give the "
            "module a rule." if "randomness" in str(error) else " Register a rule for it (dpscale.Rule)."
        )
        raise UnsupportedModuleError(
            f"Per-example gradients of {sorted(call.names)} could not be recomputed through "
            f"'{call.qualname}' ({type(module).__name__}) with torch.func.{hint} Cause: {error}"
        ) from error
    return {call.names[name]: Dense(grad) for name, grad in grads.items()}


def _device(leaves: list) -> torch.device:
    for leaf in leaves:
        if isinstance(leaf, Tensor):
            return leaf.device
    return torch.device("cpu")
