"""One ``engine.backward``: per-example losses in, each parameter's clipped sum (divided by B)
handed to the backend, nothing written to ``p.grad``.

The pipeline, in order: the losses' shape; the user of each example (user level); one walk of the
losses' graph (reentrant checkpointing, batch-mixing scalars, stale forwards, and the trainable
leaves reached, each of which must have been used through a recorded module call); one
``torch.autograd.grad`` over the recorded module outputs only, so that no parameter receives a
non-private weight gradient (eager rules run inside it as each output's gradient arrives); the
remaining rules; per-example squared norms (summed over the model-parallel group by the backend
where a parameter is sharded); clip factors; the non-finite rule; the clipped sums.

The numbers of the step come from the execution plan alone: the expected batch size B, the
privacy unit and the examples a user may bring, the clipping groups and thresholds.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dpscale.adaptive_clipping import AdaptiveClipping
from dpscale.backends.base import GradientBackend
from dpscale.clipped_sum import ClippedSum
from dpscale.errors import ConfigError, LossShapeError, SamplingError, TapeError, UnsupportedModuleError
from dpscale.layers.rule import CallInputs
from dpscale.loss_graph import REENTRANT_CHECKPOINTING, passes_reentrant_checkpointing, walk_loss_graph
from dpscale.per_example import GramCache, PerExampleGrad, UnitLayout, total_squared_norm, zero_units
from dpscale.plan import ExecutionPlan
from dpscale.sampling import PADDING_USER
from dpscale.tape import ModuleCall, Tape

__all__ = ["BackwardPipeline", "BackwardResult"]


@dataclass(frozen=True)
class BackwardResult:
    """norms: per-unit gradient norms over all trainable parameters; group_norms: per clipping
    group ([groups, units]); factors: the clip factors applied ([groups, units]); users: the drawn
    users this backward brought (user level); nonfinite: units zeroed by the non-finite rule;
    unclipped: with adaptive clipping, each group's centred count of units left unclipped ([groups])."""

    norms: Tensor
    group_norms: Tensor
    factors: Tensor
    users: frozenset
    nonfinite: int
    unclipped: Tensor | None = None


class BackwardPipeline:
    """Owned by one engine; holds no state between backwards (the step's state is the step
    boundary's)."""

    def __init__(self, tape: Tape, parameters: Mapping[str, nn.Parameter], plan: ExecutionPlan,
                 backend: GradientBackend, adaptive: AdaptiveClipping | None = None) -> None:
        self.tape = tape
        self.parameters = parameters
        self.plan = plan
        self.clipping = plan.clipping
        self.backend = backend
        self._group_of = self.clipping.group_of()
        self._sharded = backend.sharded_parameters
        self.adaptive = adaptive  # read only: its thresholds are the step's (the step boundary moves them)

    def run(self, losses: Tensor, users, users_this_step: set) -> BackwardResult:
        batch = self._check_losses(losses)
        layout, drawn_users = self._unit_layout(users, batch, losses.device, users_this_step)
        tape = self.tape
        calls = tape.take()
        reached = walk_loss_graph(losses, tape.stamp, tape.forward)
        self._check_all_uses_recorded(reached, calls)
        edges = [edge for call in calls for edge in call.edges]
        eager = [call for call in calls if call.eager]
        targets = edges + [tape.anchor] if eager else edges
        with tape.replaying():  # checkpointed regions re-run their forward in here
            grads = list(torch.autograd.grad(losses.sum(), targets, allow_unused=True)) if targets else []
        del grads[len(edges):]  # the anchor's: always None (see dpscale.tape)
        if calls and not (any(g is not None for g in grads) or any(call.result is not None for call in eager)):
            raise TapeError(
                "The losses do not depend on any module call of the last forward pass: compute them "
                "from the most recent forward, and call engine.backward before the next one."
            )
        with torch.no_grad(), tape.paused():
            uses = self._per_example_grads(calls, grads)
            del calls, grads
            bad_losses = ~torch.isfinite(losses.detach())
            if layout is not None:  # sum each user's examples: the unit clipped is the user
                uses = {name: [layout.per_unit(use) for use in grad_uses] for name, grad_uses in uses.items()}
                batch = layout.units
                bad_losses = torch.zeros(batch, dtype=torch.long, device=losses.device).index_add_(
                    0, layout.unit.to(losses.device), bad_losses.long()) > 0  # a user with a bad example
            return self._clip_and_hand_over(uses, batch, bad_losses, frozenset(drawn_users))

    def run_rule_now(self, call: ModuleCall, output_grad: Tensor, saved: tuple) -> None:
        """An eager call's rule, inside the backward, as soon as its output's gradient exists: what
        it returns is kept and its input released (see ``dpscale.tape``)."""
        inputs = call.inputs
        if saved:
            inputs = CallInputs(saved[:1] + tuple(inputs[1:]), inputs.kwargs)
        with torch.no_grad(), self.tape.paused():
            call.result = _rule_grads(call, inputs, call.output_grad([output_grad]))
        call.inputs = CallInputs()

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

    def _per_example_grads(self, calls: list[ModuleCall], grads: list) -> dict[str, list[PerExampleGrad]]:
        """Every recorded call through its own rule, the same way: {global name: its uses}."""
        uses: dict[str, list[PerExampleGrad]] = defaultdict(list)
        position = 0
        for call in calls:
            if call.eager:  # its rule ran inside the backward
                local, call.result = call.result, None
                if local is None:
                    continue
            else:
                count = len(call.edges)
                call_grads = grads[position : position + count]
                grads[position : position + count] = [None] * count  # free as we go
                position += count
                if all(g is None for g in call_grads):
                    continue
                local = _rule_grads(call, call.inputs, call.output_grad(call_grads))
            for name, global_name in zip(call.names, call.global_names):
                uses[global_name].append(local[name])
        return uses

    def _clip_and_hand_over(self, uses: dict[str, list[PerExampleGrad]], batch: int, bad_losses: Tensor,
                            users: frozenset) -> BackwardResult:
        parameters = self.parameters
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in parameters.values()) else torch.float32
        device = next(iter(parameters.values())).device
        norms2 = torch.zeros(len(self.clipping.groups), batch, dtype=dtype, device=device)
        sharded2 = torch.zeros_like(norms2) if self._sharded else norms2
        grams = GramCache()
        for name, grad_uses in uses.items():
            target = sharded2 if name in self._sharded else norms2
            target[self._group_of[name]] += total_squared_norm(grad_uses, grams).to(dtype)
        del grams
        if self._sharded:
            # A sharded parameter's per-example gradient is split over the model-parallel ranks: its
            # squared norm is the sum of the shards'. Replicated parameters count once. Never summed
            # over data-parallel ranks (they hold other examples).
            self.backend.reduce_sharded_norms(sharded2)
            norms2 = norms2 + sharded2
        norms = norms2.sqrt()
        factors = self.clipping.factors(norms, None if self.adaptive is None else self.adaptive.thresholds)
        # The non-finite rule (docs/RELIABILITY.md): a unit whose loss or any group's norm is not
        # finite contributes exactly zero. Its factors are masked, and so are its per-example forms,
        # since a zero weight times a NaN is still NaN; the noise and the step go on as usual.
        bad = bad_losses.to(norms.device) | ~torch.isfinite(norms).all(0)
        nonfinite = int(bad.sum())
        unclipped = None if self.adaptive is None else self.adaptive.unclipped_counts(norms, bad)
        if nonfinite:
            factors = torch.where(bad, torch.zeros_like(factors), factors)
            uses = {name: [zero_units(use, bad) for use in grad_uses] for name, grad_uses in uses.items()}
        weights = factors / self.plan.noise.expected_batch_size
        for name, p in parameters.items():
            # computed where the backend writes it (its bucket, its rows), not first here and then copied
            grad_uses = uses.pop(name, [])
            clipped = ClippedSum(grad_uses, weights[self._group_of[name]], p.dtype) if grad_uses else None
            self.backend.accumulate(name, clipped)
        return BackwardResult(norms2.sum(0).sqrt(), norms, factors, users, nonfinite, unclipped)


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

