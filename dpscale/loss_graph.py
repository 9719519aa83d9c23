"""What the losses' autograd graph shows before anything is differentiated: losses of more than one
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

from dpscale.errors import LossShapeError, TapeError


def check_loss_graph(losses: Tensor, stamp: Hashable, forward: int) -> None:
    """Refuse losses that reach a module output recorded in another forward than ``forward``, or
    that pass through a scalar computed from a recorded module output (the recorded outputs are
    the nodes stamped ``forward`` under ``stamp``: the tape keeps no reference to them, which
    would keep their saved tensors alive through the backward)."""
    root = losses.grad_fn
    if root is None:
        return
    targets: set = set()  # this forward's recorded outputs among the nodes below the losses
    reaches: dict = {}  # node -> whether a recorded output lies below it (set once its children are)
    expanded: set = set()  # nodes whose children were pushed
    earlier = False  # a module output recorded by an earlier forward pass lies below the losses
    stack = [root]
    while stack:
        node = stack[-1]
        if node in reaches:
            stack.pop()
            continue
        children = [child for child, _ in node.next_functions if child is not None]
        if node not in expanded:
            expanded.add(node)
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
        if reaches[node] and node not in targets and _is_scalar(node):
            raise LossShapeError(
                f"The losses pass through a scalar ({type(node).__name__}) computed from the model's outputs over "
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
            "most recent forward, and call engine.backward before the next forward."
        )


def _is_scalar(node) -> bool:
    outputs = getattr(node, "_input_metadata", None)
    if outputs is None:
        return False
    for meta in outputs:
        shape = getattr(meta, "shape", None)
        if shape is not None and len(shape) == 0:
            return True
    return False
