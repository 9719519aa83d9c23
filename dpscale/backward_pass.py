"""One ``engine.backward``: per-example losses in, each parameter's clipped sum (divided by B)
handed to the backend, nothing written to ``p.grad``.

The pipeline, in order: the losses' shape; the user of each example (user level); one walk of the
losses' graph (reentrant checkpointing, batch-mixing scalars, stale forwards, and the trainable
leaves reached, each of which must have been used through a recorded module call); one
``torch.autograd.grad`` over the recorded module outputs only, so that no parameter receives a
non-private weight gradient (eager rules run inside it as each output's gradient arrives); the
remaining rules; then, per clipping group, per-example squared norms (summed over the
model-parallel group by the backend where a parameter is sharded), clip factors, the non-finite
rule and the clipped sums (``dpscale.group_clipping``: a group is finished, and its per-example
forms released, as soon as all its parameters' uses are in, inside the backward where the backend
allows it). A backward that fails after handing some sums over is reported (``on_partial``): the
step then holds part of its examples' clipped gradients, and the engine refuses to close it.

The numbers of the step come from the execution plan alone: the expected batch size B, the
privacy unit and the examples a user may bring, the clipping groups and thresholds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from dpscale.adaptive_clipping import AdaptiveClipping
from dpscale.backends.base import GradientBackend
from dpscale.errors import ConfigError, LossShapeError, SamplingError, TapeError, UnsupportedModuleError
from dpscale.group_clipping import BackwardResult, GroupClipper
from dpscale.layers.rule import CallInputs
from dpscale.loss_graph import REENTRANT_CHECKPOINTING, passes_reentrant_checkpointing, walk_loss_graph
from dpscale.per_example import UnitLayout
from dpscale.plan import ExecutionPlan
from dpscale.sampling import PADDING_USER
from dpscale.tape import ModuleCall, Tape

__all__ = ["BackwardPipeline", "BackwardResult"]


class BackwardPipeline:
    """Owned by one engine; holds no state between backwards (the step's state is the step
    boundary's)."""

    def __init__(self, tape: Tape, parameters: Mapping[str, nn.Parameter], plan: ExecutionPlan,
                 backend: GradientBackend, adaptive: AdaptiveClipping | None = None,
                 on_partial: Callable[[], None] = lambda: None) -> None:
        self.tape = tape
        self.parameters = parameters
        self.plan = plan
        self.clipping = plan.clipping
        self.backend = backend
        self._group_of = self.clipping.group_of()
        self.adaptive = adaptive  # read only: its thresholds are the step's (the step boundary moves them)
        self._on_partial = on_partial  # told when a backward fails after handing some sums over
        self._clipper: GroupClipper | None = None  # the backward in progress's, inside run only

    def run(self, losses: Tensor, users, users_this_step: set) -> BackwardResult:
        batch = self._check_losses(losses)
        layout, drawn_users = self._unit_layout(users, batch, losses.device, users_this_step)
        tape = self.tape
        calls = tape.take()
        reached = walk_loss_graph(losses, tape.stamp, tape.forward)
        self._check_all_uses_recorded(reached, calls)
        bad_losses = ~torch.isfinite(losses.detach())
        if layout is not None:  # the unit clipped is the user: a user with a bad example is bad
            bad_losses = torch.zeros(layout.units, dtype=torch.long, device=losses.device).index_add_(
                0, layout.unit.to(losses.device), bad_losses.long()) > 0
        thresholds = self.clipping.thresholds if self.adaptive is None else self.adaptive.thresholds
        clipper = self._clipper = GroupClipper(calls, self.parameters, self.plan, self.backend, self._group_of,
                                               len(bad_losses), bad_losses, layout, thresholds, self.adaptive)
        try:
            edges = [edge for call in calls for edge in call.edges]
            eager = any(call.eager for call in calls)
            targets = edges + [tape.anchor] if eager else edges
            with tape.replaying():  # checkpointed regions re-run their forward in here
                grads = list(torch.autograd.grad(losses.sum(), targets, allow_unused=True)) if targets else []
            del grads[len(edges):]  # the anchor's: always None (see dpscale.tape)
            if calls and not (any(g is not None for g in grads) or clipper.received):
                raise TapeError(
                    "The losses do not depend on any module call of the last forward pass: compute them "
                    "from the most recent forward, and call engine.backward before the next one."
                )
            with torch.no_grad(), tape.paused():
                self._run_late_rules(calls, grads)
                del calls, grads
                return clipper.close(frozenset(drawn_users))
        except BaseException:
            if clipper.handed:
                self._on_partial()
            raise
        finally:
            self._clipper = None

    def run_rule_now(self, call: ModuleCall, output_grad: Tensor, saved: tuple) -> None:
        """An eager call's rule, inside the backward, as soon as its output's gradient exists: its
        forms go to the clipper (which finishes the groups they complete) and its input is released
        (see ``dpscale.tape``)."""
        inputs = call.inputs
        if saved:
            inputs = CallInputs(saved[:1] + tuple(inputs[1:]), inputs.kwargs)
        with torch.no_grad(), self.tape.paused():
            local = _rule_grads(call, inputs, call.output_grad([output_grad]))
            call.inputs = inputs = CallInputs()
            self._clipper.add(call, local)

    # the steps ----------------------------------------------------------------------------------

    def _check_losses(self, losses: Tensor) -> int:
        if not isinstance(losses, Tensor):
            raise LossShapeError(
                f"engine.backward expects a tensor of per-example losses, got {type(losses).__name__}."
            )
        batch = self.tape.batch_size
        if batch is None:
            if passes_reentrant_checkpointing(losses):  # the whole model checkpointed: no autograd in its forward
                raise UnsupportedModuleError(REENTRANT_CHECKPOINTING)
            raise TapeError(
                "No forward pass with gradients enabled was recorded; run the model before engine.backward."
            )
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

    def _unit_layout(self, users, batch: int, device: torch.device,
                     users_this_step: set) -> tuple[UnitLayout | None, set]:
        """User level: which examples of this call form one user (None when each example is its own
        unit), and the drawn users it brings; refuses what would clip a user in pieces."""
        sampling = self.plan.sampling
        if sampling.privacy_unit == "example":
            if users is not None:
                raise ConfigError(
                    "engine.backward got users=, but DPConfig(privacy_unit='example') protects each example on its "
                    "own. For user-level privacy build the engine with DPConfig(privacy_unit='user', ...)."
                )
            return None, set()
        k = sampling.examples_per_user
        if users is None:
            if k == 1:
                return None, set()  # one example per user: per-example clipping is per-user clipping
            raise ConfigError(
                f"DPConfig(privacy_unit='user', examples_per_user={k}) clips the sum of each user's examples, so "
                "engine.backward needs the user of each example: engine.backward(losses, "
                "users=logical_batch.micro_batches.units_of(j)) (dpscale.run_logical_step passes it)."
            )
        ids = users.tolist() if isinstance(users, Tensor) else list(users)
        if len(ids) != batch:
            raise LossShapeError(
                f"users= names {len(ids)} users for a forward pass over {batch} examples: give one per example."
            )
        layout = UnitLayout.from_ids(ids, device)
        counts = torch.bincount(layout.unit, minlength=layout.units)
        crowded = [ids[int((layout.unit == u).nonzero()[0])] for u in (counts > k).nonzero().flatten().tolist()]
        if crowded:
            raise SamplingError(
                f"User(s) {crowded[:5]} have more than examples_per_user={k} examples in this backward. Draw the "
                "batches with engine.make_data_loader(..., user_ids=...), which brings at most k per user, or raise "
                "DPConfig(examples_per_user)."
            )
        drawn = {u for u in ids if u != PADDING_USER}
        split = sorted(drawn & users_this_step, key=repr)
        if split:
            raise SamplingError(
                f"User(s) {split[:5]} already had examples in an earlier backward of this step: a user's examples "
                "must be clipped together, in one micro-batch on one rank, or their sensitivity doubles. Use the "
                "micro-batches of engine.make_data_loader(..., user_ids=...), which keep each user whole."
            )
        return (None if layout.trivial else layout), drawn

    def _check_all_uses_recorded(self, reached: set[int], calls: list) -> None:
        """Every trainable parameter that the losses depend on must have been used through a
        recorded module call; a parameter used directly by another module's forward would
        otherwise lose its gradient silently."""
        recorded = {name for call in calls for name in call.global_names}
        missing = [name for name, p in self.parameters.items() if id(p) in reached and name not in recorded]
        if missing:
            raise UnsupportedModuleError(
                f"Trainable parameters {missing[:5]} are used outside the forward of the module that owns them "
                "(e.g. a parent reads child.weight directly), so dpscale cannot see their per-example "
                "gradients. Freeze them or register a rule for the module that uses them."
            )

    def _run_late_rules(self, calls: list[ModuleCall], grads: list) -> None:
        """The calls whose rules did not run inside the backward (whole-call rules), each through its
        own rule, in the order recorded; their forms go to the clipper."""
        position = 0
        for call in calls:
            if call.eager:  # its rule ran inside the backward (or its output got no gradient)
                continue
            count = len(call.edges)
            call_grads = grads[position : position + count]
            grads[position : position + count] = [None] * count  # free as we go
            position += count
            if all(g is None for g in call_grads):
                continue
            self._clipper.add(call, _rule_grads(call, call.inputs, call.output_grad(call_grads)))


def _rule_grads(call: ModuleCall, inputs: CallInputs, output_grad) -> dict:
    try:
        local = call.rule.grads(call.module, inputs, output_grad, call.names)
    except UnsupportedModuleError as error:
        raise UnsupportedModuleError(f"Module '{call.qualname}', rule '{call.rule.name}': {error}") from error
    if set(local) != set(call.names):
        raise UnsupportedModuleError(
            f"Rule '{call.rule.name}' for '{call.qualname}' returned gradients for {sorted(local)} "
            f"but the module's trainable parameters are {sorted(call.names)}."
        )
    return local

