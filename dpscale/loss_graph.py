"""What the losses' autograd graph shows before anything is differentiated, read in one walk: the
trainable leaves the losses reach, reentrant activation checkpointing, losses of more than one
forward pass, and examples mixed through a scalar.

Per-example clipping is exact only if example i's loss depends on example i alone and on the
forward pass the tape recorded. Two ways of breaking this are visible in the graph, cheaply:

* **Two forward passes.** The tape keeps the module calls of the latest forward only; losses that
  also depend on an earlier one (``loss = model(a) + model(b)``) would have that forward's share of
  every gradient dropped. The tape stamps the graph node of every output it records with the number
  of its forward (``Node.metadata``, which lives and dies with the graph, so nothing is kept alive);
  a stamp of another forward among the nodes the losses reach is refused.
* **A scalar computed from the batch.** A node whose value is 0-dimensional, on a path from the
  losses to a recorded module output, is a reduction over every example fed back into each
  example's loss or activations: ``losses + losses.mean()``, ``h / h.norm()``, an auxiliary loss
  summed over the batch. Each example's gradient then depends on the others and clipping bounds
  nothing. Attention, per-example means (over tokens) and batch-free constants keep a batch
  dimension or lie off those paths, so they pass.

Not detectable this way, and documented in docs/RELIABILITY.md: mixing that keeps a batch-sized
dimension (``h - h.mean(0, keepdim=True)``, ``x @ x.T`` across examples, a batch-mean computed
from detached values). An exact check would need one extra backward per example. The shapes of a
node's outputs come from ``Node._input_metadata`` (torch >= 2.1); without it the scalar check is
skipped.
"""

from __future__ import annotations

from collections.abc import Hashable

from torch import Tensor

from dpscale.errors import LossShapeError, TapeError, UnsupportedModuleError

# The backward node of torch.utils.checkpoint's reentrant Function, named as autograd names the
# nodes of every custom Function (no public handle on the class). Should torch rename it, torch's
# own error (reentrant checkpointing refuses torch.autograd.grad) still stops the backward.
_REENTRANT_CHECKPOINT_NODE = "CheckpointFunctionBackward"

REENTRANT_CHECKPOINTING = (
    "The losses pass through reentrant activation checkpointing (torch.utils.checkpoint with use_reentrant=True, "
    "or without use_reentrant). It runs the checkpointed forward without autograd, so dpscale sees no module call "
    "inside it, and back-propagates it in a nested backward that writes non-private weight gradients. Use the "
    "non-reentrant kind, which dpscale supports exactly: model.gradient_checkpointing_enable("
    "gradient_checkpointing_kwargs={'use_reentrant': False}) (the default when no kwargs are given), or "
    "torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)."
)


def walk_loss_graph(losses: Tensor, stamp: Hashable, forward: int) -> set[int]:
    """The one walk of the losses' graph a backward makes: returns the ids of the leaf tensors whose
    gradient accumulators the losses reach (the engine checks that each trainable one was used
    through a recorded module call), and refuses, in this order, losses that pass through reentrant
    activation checkpointing, losses that pass through a scalar computed from a recorded module
    output, and losses that reach a module output recorded in another forward than ``forward`` (the
    recorded outputs are the nodes stamped ``forward`` under ``stamp``: the tape keeps no reference
    to them, which would keep their saved tensors alive through the backward)."""
    reached: set[int] = set()
    root = losses.grad_fn
    if root is None:
        return reached
    targets: set = set()  # this forward's recorded outputs among the nodes below the losses
    reaches: dict = {}  # node -> whether a recorded output lies below it (set once its children are)
    expanded: set = set()  # nodes whose children were pushed
    earlier = False  # a module output recorded by an earlier forward pass lies below the losses
    reentrant = False
    scalar = None  # the first scalar node between the losses and a recorded output
    stack = [root]
    while stack:
        node = stack[-1]
        if node in reaches:
            stack.pop()
            continue
        children = [child for child, _ in node.next_functions if child is not None]
        if node not in expanded:
            expanded.add(node)
            variable = getattr(node, "variable", None)
            if variable is not None:
                reached.add(id(variable))
            reentrant = reentrant or type(node).__name__ == _REENTRANT_CHECKPOINT_NODE
            pending = [child for child in children if child not in reaches]
            if pending:
                stack.extend(pending)
                continue
        stack.pop()
        seen = node.metadata.get(stamp)
        earlier = earlier or (seen is not None and seen != forward)
        if seen == forward:
            targets.add(node)
        reaches[node] = node in targets or any(reaches[child] for child in children)
        if scalar is None and reaches[node] and node not in targets and _is_scalar(node):
            scalar = node
    if reentrant:
        raise UnsupportedModuleError(REENTRANT_CHECKPOINTING)
    if scalar is not None:
        raise LossShapeError(
            f"The losses pass through a scalar ({type(scalar).__name__}) computed from the model's outputs over "
            "the whole batch, e.g. losses + losses.mean(), an auxiliary loss summed over the batch, or a "
            "normalisation by a batch statistic. Each example's loss must depend on that example alone, or "
            "clipping bounds nothing. Compute one loss per example from its own outputs (dpscale.losses), "
            "and leave batch-level terms out of the private loss."
        )
    if earlier and any(reaches.get(node, False) for node in targets):
        raise TapeError(
            "The losses depend on two forward passes of the model (the last one and an earlier one, e.g. "
            "loss = model(a) + model(b)). The engine differentiates the module calls of the last forward "
            "only, so the earlier one's share of each gradient would be lost. Concatenate the inputs into "
            "one forward pass, or call engine.backward after each forward (backwards before one step "
            "accumulate)."
        )
    if earlier:
        raise TapeError(
            "The losses were computed from an earlier forward pass, not the last forward: compute them from the "
            "most recent forward, and call engine.backward before the next one."
        )
    return reached


def passes_reentrant_checkpointing(losses: Tensor) -> bool:
    """Whether the losses' graph passes through reentrant activation checkpointing (asked when no
    forward was recorded at all: the whole model ran inside it, without autograd)."""
    root = losses.grad_fn
    seen, stack = {root}, [root] if root is not None else []
    while stack:
        node = stack.pop()
        if type(node).__name__ == _REENTRANT_CHECKPOINT_NODE:
            return True
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                stack.append(child)
    return False


def _is_scalar(node) -> bool:
    outputs = getattr(node, "_input_metadata", None)
    if outputs is None:
        return False
    for meta in outputs:
        shape = getattr(meta, "shape", None)
        if shape is not None and len(shape) == 0:
            return True
    return False
