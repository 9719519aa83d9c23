"""The fallback for any module without a rule: recompute its forward for one example at a time
under ``torch.func.vmap`` and take the vector-Jacobian product with that example's output
gradient, for exactly the parameters handed to it.

It is an ordinary rule, the registry's default, that reads the whole call (``whole_call=True``):
every input, keyword inputs included, and every output leaf. Exact for any module whose forward is
a function of its inputs and parameters. Random operations (dropout in training mode) cannot be
replayed identically inside vmap, so vmap runs with ``randomness="error"``: such a module fails
loudly instead of yielding a gradient of a different forward pass.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from dpscale.errors import UnsupportedModuleError
from dpscale.layers.rule import CallInputs, Rule
from dpscale.per_example import Dense


def torch_func_grads(
    module: nn.Module, inputs: CallInputs, output_grad: tuple, names: tuple[str, ...]
) -> dict[str, Dense]:
    """Per-example gradients {name: Dense} of ``names`` (relative to ``module``, possibly of its
    descendants) for one call. Output leaves without a gradient are left out of the product: their
    cotangent would be zero. The batch size is the gradients' leading size; the inputs of that
    leading size are split per example, the others are shared by every example."""
    kept = [i for i, grad in enumerate(output_grad) if grad is not None]
    cotangents = [output_grad[i] for i in kept]
    batch_size = cotangents[0].shape[0]
    leaves, spec = tree_flatten((tuple(inputs), inputs.kwargs))
    batched_positions = [
        i for i, leaf in enumerate(leaves)
        if isinstance(leaf, Tensor) and leaf.dim() > 0 and leaf.shape[0] == batch_size
    ]
    batched_inputs = [leaves[i].detach() for i in batched_positions]
    targets = {name: module.get_parameter(name).detach() for name in names}

    def one_example(params: dict, example_inputs: list, grads: list):
        full = list(leaves)
        for position, value in zip(batched_positions, example_inputs):
            full[position] = value.unsqueeze(0)
        args, kwargs = tree_unflatten(full, spec)

        def forward(p: dict):
            outputs, _ = tree_flatten(functional_call(module, p, args, kwargs, strict=False))
            return tuple(outputs[i] for i in kept)

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
            f"Per-example gradients of {sorted(names)} could not be recomputed through "
            f"{type(module).__name__} with torch.func.{hint} Cause: {error}"
        ) from error
    return {name: Dense(grad) for name, grad in grads.items()}


FALLBACK = Rule("torch_func", torch_func_grads, whole_call=True)
