"""One backward's clipping, group by group: a clipping group's per-example norms, clip factors and
clipped sums are formed as soon as every use of its parameters has its per-example forms, and handed
to the backend then, so that those forms (for a ghost-norm layer its input and its output gradient)
are released during the backward instead of at its end.

When a group is complete. Every recorded call names the parameters it uses. A parameter is
complete once every call that uses it has been through its rule (a tied embedding and LM head:
after the embedding, the last call of the backward), a group once all its parameters are. Eager
rules (``dpscale.tape``) run inside autograd's backward as each output's gradient arrives, so a
group read only by eager calls completes there: under per-layer clipping every layer as soon as
its output gradient exists, under flat clipping the one group with the last call. Whole-call rules
run after the backward; a group they touch completes then.

Where a group is finished. Inside the backward only where the backend takes sums then and in any
order (``GradientBackend.accumulates_during_backward``) and the group holds no sharded parameter
(whose squared norms are summed over the model-parallel group once, with all the others', after
the backward). Every other group is finished after the backward, and then every sum not handed
over yet is handed over in the engine's parameter order.

The numbers are those of clipping the whole backward at once: a group's squared norm is the sum,
over its parameters in the order of their first call, of the squared norm of all their uses (cross
terms of a tied parameter included); its factors read that group's norm and threshold only; its
clipped sums its factors only. Which groups finish early changes no number, only when it is formed.

The non-finite rule (docs/RELIABILITY.md) is per group: a unit whose loss is not finite contributes
zero in every group (the losses are known before the backward); a unit whose norm in group k is not
finite contributes zero in group k. A later group's norm is not known when an earlier group is
finished, so "zero in every group once any group's norm is bad" cannot be decided then. The bound
holds exactly either way: each group's contribution of a unit is either clipped to R_k or zero, so
a unit moves the sum by at most sqrt(sum_k R_k^2), the sensitivity the noise is calibrated to, and
whether a group zeroes a unit depends on that unit's own gradient alone. Under flat clipping (one
group) the rule is unchanged.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dpscale.backends.base import GradientBackend
from dpscale.clipped_sum import ClippedSum
from dpscale.per_example import GramCache, Outer, PerExampleGrad, UnitLayout, total_squared_norm, zero_units
from dpscale.plan import ExecutionPlan
from dpscale.tape import ModuleCall

__all__ = ["BackwardResult", "GroupClipper"]


@dataclass(frozen=True)
class BackwardResult:
    """norms: per-unit gradient norms over all trainable parameters; group_norms: per clipping
    group ([groups, units]); factors: the clip factors applied ([groups, units]); users: the drawn
    users this backward brought (user level); nonfinite: units zeroed by the non-finite rule (in
    at least one group); unclipped: with adaptive clipping, each group's centred count of units
    left unclipped ([groups])."""

    norms: Tensor
    group_norms: Tensor
    factors: Tensor
    users: frozenset
    nonfinite: int
    unclipped: Tensor | None = None


class GroupClipper:
    """The clipping state of one backward, built before autograd runs: ``add`` takes each call's
    per-example forms (inside the backward for eager calls), ``close`` finishes what is left once
    the backward is over and returns the backward's numbers. ``handed`` counts the sums given to
    the backend so far (the engine refuses to close a step whose backward failed after some).

    units: the units clipped (examples, or users at user level); bad_losses: [units] True where a
    unit's loss is not finite; layout: how examples form users (None: each example is a unit);
    thresholds: the step's group thresholds (adaptive clipping's, or the plan's)."""

    def __init__(self, calls: list[ModuleCall], parameters: Mapping[str, nn.Parameter], plan: ExecutionPlan,
                 backend: GradientBackend, group_of: Mapping[str, int], units: int, bad_losses: Tensor,
                 layout: UnitLayout | None, thresholds: tuple[float, ...], adaptive=None) -> None:
        self.parameters = parameters
        self.clipping = plan.clipping
        self.expected_batch_size = plan.noise.expected_batch_size
        self.backend = backend
        self.group_of = group_of
        self.sharded = backend.sharded_parameters
        self.layout = layout
        self.thresholds = thresholds
        self.adaptive = adaptive
        groups = self.clipping.groups
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in parameters.values()) else torch.float32
        device = next(iter(parameters.values())).device
        self.norms2 = torch.zeros(len(groups), units, dtype=dtype, device=device)
        self.sharded2 = torch.zeros_like(self.norms2) if self.sharded else self.norms2
        self.norms = torch.zeros_like(self.norms2)
        self.factors = torch.zeros_like(self.norms2)
        self.bad = torch.zeros(len(groups), units, dtype=torch.bool, device=device)
        self.bad_losses = bad_losses.to(device)
        self.position = {id(call): index for index, call in enumerate(calls)}
        self.pending = Counter(name for call in calls for name in set(call.global_names))  # calls to come
        self.open = [sum(1 for name in group if self.pending[name]) for group in groups]  # parameters to come
        early = backend.accumulates_during_backward
        self.early = [early and not any(name in self.sharded for name in group) for group in groups]
        self.finished = [False] * len(groups)
        self.uses: dict[str, list[tuple[int, PerExampleGrad]]] = defaultdict(list)
        self.grams = GramCache()
        self.received = 0  # calls whose forms arrived
        self.lock = threading.Lock()
        self.handed = 0

    def add(self, call: ModuleCall, local: Mapping[str, PerExampleGrad]) -> None:
        """One call's per-example forms ({relative name: form}); finishes the groups it completes
        where they may be finished now. Autograd runs each device's backward on a thread of its
        own, so eager rules of a model spread over devices may call this concurrently: one at a
        time."""
        with self.lock:
            self._add(call, local)

    def _add(self, call: ModuleCall, local: Mapping[str, PerExampleGrad]) -> None:
        position = self.position.get(id(call))
        if position is None:  # not a call of this backward (a replayed one's): nothing reads it, as ever
            return
        self.received += 1
        for name, global_name in zip(call.names, call.global_names):
            self.uses[global_name].append((position, local[name]))
        ready = []
        for global_name in set(call.global_names):
            self.pending[global_name] -= 1
            if self.pending[global_name] == 0:
                k = self.group_of[global_name]
                self.open[k] -= 1
                if self.open[k] == 0 and self.early[k]:
                    ready.append(k)
        for k in ready:
            self._finish([k])

    def close(self, users: frozenset) -> BackwardResult:
        """After the backward: finish every group not finished yet (their calls done, or never
        reached by the losses), hand over what is left in the engine's order, and report."""
        self._finish([k for k, done in enumerate(self.finished) if not done], last=True)
        bad = self.bad.any(0)
        unclipped = None if self.adaptive is None else self.adaptive.unclipped_counts(self.norms, self.bad)
        return BackwardResult(self.norms2.sum(0).sqrt(), self.norms, self.factors, users, int(bad.sum()), unclipped)

    # internals ----------------------------------------------------------------------------------

    def _finish(self, groups: list[int], last: bool = False) -> None:
        """Norms, factors and clipped sums of ``groups``, handed to the backend (a group finished
        during the backward: its parameters in its own order; the last call: every parameter left,
        in the engine's order); their forms dropped."""
        forms: dict[str, list[PerExampleGrad]] = {}
        for k in groups:
            group = [name for name in self.clipping.groups[k] if name in self.uses]
            first = {name: min(position for position, _ in self.uses[name]) for name in group}
            for name in sorted(group, key=first.__getitem__):  # the order of the calls, as one clip of all
                uses = [form for _, form in sorted(self.uses.pop(name), key=lambda entry: entry[0])]
                if self.layout is not None:  # the unit clipped is the user: each user's examples summed
                    uses = [self.layout.per_unit(use) for use in uses]
                target = self.sharded2 if name in self.sharded else self.norms2
                target[k] += total_squared_norm(uses, self.grams).to(self.norms2.dtype)
                forms[name] = uses
            self.finished[k] = True
        self._forget_what_no_later_group_reads(last)
        if last and self.sharded:
            # A sharded parameter's per-example gradient is split over the model-parallel ranks: its
            # squared norm is the sum of the shards'. Replicated parameters count once. Never summed
            # over data-parallel ranks (they hold other examples). Groups finished earlier hold no
            # sharded parameter: their rows here are zero.
            self.backend.reduce_sharded_norms(self.sharded2)
            self.norms2 = self.norms2 + self.sharded2
        if not groups:
            return
        rows = torch.tensor(groups, device=self.norms2.device)
        norms = self.norms2[rows].sqrt()
        factors = self.clipping.factors(norms, tuple(self.thresholds[k] for k in groups))
        # The non-finite rule, per group (module docstring). The bad units' factors are masked, and so
        # are their forms, since a zero weight times a NaN is still NaN; the noise and the step go on.
        bad = self.bad_losses[None, :] | ~torch.isfinite(norms)
        factors = torch.where(bad, torch.zeros_like(factors), factors)
        self.norms[rows], self.factors[rows], self.bad[rows] = norms, factors, bad
        weights = factors / self.expected_batch_size
        masked = bad.any(1).tolist()  # one read by the host per finish
        row_of = {k: row for row, k in enumerate(groups)}
        if last:
            names = [name for name in self.parameters if self.group_of[name] in row_of]
        else:
            names = [name for k in groups for name in self.clipping.groups[k]]
        for name in names:
            row = row_of[self.group_of[name]]
            uses = forms.pop(name, [])
            if uses and masked[row]:
                uses = [zero_units(use, bad[row]) for use in uses]
            # computed where the backend writes it (its bucket, its rows), not first here and then copied
            self.backend.accumulate(name, ClippedSum(uses, weights[row], self.parameters[name].dtype) if uses else None)
            self.handed += 1

    def _forget_what_no_later_group_reads(self, last: bool) -> None:
        """Before the sums are allocated: the Gram matrices (and at user level the regrouped
        factors) cached for groups finished now are kept only where a later group may read them.
        While calls are still to come that is any whose tensor lives (the next projection of a
        shared activation arrives after this one is finished); once none is, only those of forms
        already in and not finished."""
        if not last and any(count > 0 for count in self.pending.values()):
            keep = None
        else:
            keep = [t for uses in self.uses.values() for _, use in uses if isinstance(use, Outer)
                    for t in (use.left, use.right)]
        if self.layout is not None:
            self.layout.prune(keep)
            if keep is not None:
                keep = [r for r in map(self.layout.regrouped, keep) if r is not None]
        self.grams.prune(keep)
