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
import math
import os
from collections import defaultdict
from types import MappingProxyType
from typing import Collection, Mapping, Sequence

import torch
from torch import Tensor, nn

from dpscale.accounting import PrivacyAccountant
from dpscale.backends import GradientBackend, select_backend
from dpscale.checkpoint import load_state, save_atomic
from dpscale.clipping import ClippingPlan, build_plan
from dpscale.config import DPConfig
from dpscale.errors import (
    CheckpointError,
    ConfigError,
    LossShapeError,
    NoTrainableParametersError,
    PrivacyBudgetExhausted,
    SamplingError,
    StepBoundaryError,
    TapeError,
    UnsupportedModuleError,
)
from dpscale.layers import RuleRegistry, default_registry
from dpscale.loss_graph import check_loss_graph
from dpscale.noise import NoiseKey, add_gaussian_noise_, load_noise_key
from dpscale.per_example import (
    GramCache,
    PerExampleGrad,
    UnitLayout,
    total_squared_norm,
    weighted_sum,
    zero_units,
)
from dpscale.plan import ExecutionPlan, build_execution_plan
from dpscale.report import write_report
from dpscale.sampling import PADDING_USER, DPDataLoader, LogicalBatch, resolve_user_ids
from dpscale.layers.rule import CallInputs
from dpscale.tape import ModuleCall, Owner, Tape

logger = logging.getLogger(__name__)


class PrivacyEngine:
    """DP-SGD for ``model``'s trainable parameters: exact per-example clipping in ``backward``,
    keyed Gaussian noise once per logical step, and the accountant's record of the steps.

    The engine owns the step boundary. A parameter never moves without its noise and no step is
    accounted under a sampling assumption its batch did not satisfy; each way of getting this
    wrong raises a dpscale error naming the fix:

    * ``backward`` refuses to run until a step is bound: an optimizer attached (``optimizer=`` or
      ``attach_optimizer``, whose step pre-hook adds the noise), or a backend that hooks its
      training engine's own step (DeepSpeed).
    * Parameters that move between a ``backward`` and the engine's step (an optimizer the engine
      does not know consumed the clipped sums without noise) are detected at the next
      ``backward``, step, ``epsilon()``, report or checkpoint (``StepBoundaryError``).
    * With accounting (``dataset_size``), every step must run on a logical batch drawn by the
      engine's own loader (``make_data_loader``), each drawn batch stepped exactly once, empty
      ones included (``SamplingError``); or the user declares their sampling in the config.
    * With ``target_epsilon``, the step past the budget is refused (``PrivacyBudgetExhausted``).

    optimizer: attached now, or later with ``attach_optimizer``.
    noise_key: a ``NoiseKey`` or the path of a key file (reproducible, resumable runs; required
        with several processes, all reading the same file); default a fresh key. Never logged
        nor saved.
    rules: a registry from ``dpscale.default_registry()`` with rules for custom layers
        registered on it; the engine keeps its own copy. ``engine.rule_names`` says, per module
        owning trainable parameters (by qualified name), which rule differentiates it.
    backend: where clipped sums go, which noise coordinates this process adds, how the step is
        closed (default: ``LocalBackend``; a DDP-wrapped model gets ``DataParallelBackend``).
    model_parallel_group: a torch.distributed group whose ranks hold disjoint slices of each
        example's gradient (tensor-parallel shards); per-example squared norms of the sharded
        parameters are summed over it before clipping. Data-parallel ranks never belong in it.
    sharded_parameters: with ``model_parallel_group``, the names of the parameters split across
        it; every other trainable parameter is replicated there and counted once. Both default to
        what the backend declares (the DeepSpeed backend reads DeepSpeed AutoTP's split).
    """

    def __init__(
        self,
        model: nn.Module,
        config: DPConfig,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        noise_key: NoiseKey | str | os.PathLike | None = None,
        rules: RuleRegistry | None = None,
        backend: GradientBackend | None = None,
        model_parallel_group=None,
        sharded_parameters: Collection[str] | None = None,
    ) -> None:
        if not isinstance(config, DPConfig):
            raise ConfigError(f"config must be a dpscale.DPConfig, got {type(config).__name__}.")
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        self.backend, model = select_backend(model, backend)
        self.model = model
        self.config = config
        self.rules = (rules or default_registry()).copy()
        declared = self.backend.model_parallel  # a backend that knows the split (AutoTP)
        if declared is not None and model_parallel_group is None and sharded_parameters is None:
            model_parallel_group, sharded_parameters = declared
        self.model_parallel_group = model_parallel_group
        self._sharded = frozenset(sharded_parameters or ())
        if (model_parallel_group is None) != (sharded_parameters is None):
            raise ConfigError(
                "model_parallel_group and sharded_parameters go together: name the parameters split across "
                "the group, so that replicated ones are not counted once per rank."
            )
        self.parameters: dict[str, nn.Parameter] = trainable_parameters(model)
        if not self.parameters:
            raise NoTrainableParametersError(
                "The model has no parameter with requires_grad=True: nothing to train privately."
            )
        unknown = sorted(self._sharded - set(self.parameters))
        if unknown:
            raise ConfigError(f"sharded_parameters names parameters that are not trainable here: {unknown[:5]}.")
        _refuse_example_mixing(model)
        owners = find_owners(model, self.parameters, self.rules)
        self.rule_names: Mapping[str, str] = MappingProxyType({owner.qualname: owner.rule.name for owner in owners})
        # Modules whose parameters a rule reads after the backward has ended (whole-call rules run
        # then, and a module differentiated through its parent is read by the parent's call), so a
        # sharding backend must keep them gathered until the clipped sums are formed; None: the
        # whole model (a parent's call may read beyond any one module).
        self.modules_read_after_backward: tuple[nn.Module, ...] | None = (
            None if any(owner.through_parent for owner in owners)
            else tuple(owner.module for owner in owners if owner.rule.whole_call))
        self.clipping: ClippingPlan = build_plan(config, list(self.parameters))
        self._group_of = self.clipping.group_of()
        self.noise_key = load_noise_key(noise_key)
        self.plan: ExecutionPlan = build_execution_plan(
            config, self.clipping, key_fingerprint=self.noise_key.fingerprint,
            rank=self.backend.rank, world_size=self.backend.world_size,
        )
        self.accountant = PrivacyAccountant(self.plan.accounting.accountant, self.plan.sampling.kind,
                                            self.plan.sampling.dataset_size)
        self.steps_taken = 0
        # [scheme, first step drawn under it]: one entry unless a resume moved to a new scheme on purpose
        self._noise_schemes: list[list] = [[self.plan.noise.scheme, 0]]
        self.data_loader: DPDataLoader | None = None
        self.last_norms: Tensor | None = None
        self.last_group_norms: Tensor | None = None
        self.last_clip_factors: Tensor | None = None
        self.step_norms: Tensor | None = None  # per-example norms of the last finished step (all its backwards)
        self._norms_this_step: list[Tensor] = []
        self.nonfinite_examples = 0  # units (examples or users) zeroed by the non-finite rule, this process
        self._nonfinite_this_step = 0
        self._optimizer: torch.optim.Optimizer | None = None
        self._pending_versions: tuple[int, ...] | None = None  # clipped sums written, not yet stepped
        self._drawn_step: int | None = None  # the logical batch the bound loader handed out for this step
        self._users_this_step: set = set()  # user level: users whose examples a backward of this step saw
        self._tape = Tape(model, owners, self.rules.default, self.rules.batch_dim_inside, self._run_rule_now)
        self._handles: list = [
            module.register_forward_pre_hook(_refuse_training_batch_norm)
            for module in model.modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
        ]
        self._handles.extend(self.backend.bind(self))
        if optimizer is not None:
            self.attach_optimizer(optimizer)
        _log_plan(self.plan)

    # what the user sees -------------------------------------------------------------------------

    @property
    def noise_multiplier(self) -> float:
        """sigma: calibrated for target_epsilon, or the one given."""
        return self.plan.noise.noise_multiplier

    @property
    def noise_std(self) -> float:
        """Std of the noise added to each coordinate of the averaged gradient: sigma R / B."""
        return self.plan.noise.std

    @property
    def delta(self) -> float | None:
        return self.plan.accounting.delta

    @property
    def sample_rate(self) -> float | None:
        """q = B / N (None without dataset_size)."""
        return self.plan.sampling.sample_rate

    @property
    def planned_steps(self) -> int | None:
        return self.plan.accounting.planned_steps

    @property
    def target_epsilon(self) -> float | None:
        return self.plan.accounting.target_epsilon

    @property
    def budget_steps(self) -> int | None:
        """With target_epsilon: the most steps whose epsilon stays within it (None otherwise)."""
        return self.plan.accounting.budget_steps

    @property
    def budget_exhausted(self) -> bool:
        """True when the next step would take epsilon past the target (and overrun is not allowed):
        a driver stops here, saves, and says so."""
        acc = self.plan.accounting
        return acc.budget_steps is not None and not acc.allow_budget_overrun and self.steps_taken >= acc.budget_steps

    # the one seam -----------------------------------------------------------------------------

    def backward(self, losses: Tensor, *, users: Sequence[int] | Tensor | None = None) -> None:
        """Back-propagate one loss per example and add sum_i clip(g_i) / B to each ``p.grad``.

        Several calls before the step accumulate, as ``loss.backward()`` does.

        users: with ``privacy_unit="user"``, the user of each example (what the loader's
            ``micro_batches.units_of(j)`` gives; the step driver passes it). The examples of one user
            are summed, then clipped as one unit: sum_u clip(sum_{i in u} g_i) / B. A user's examples
            must all be in this one call (the same user in two calls of one step would be clipped
            twice, doubling their sensitivity: refused). May be left out when examples_per_user is 1
            (each example is then its own user).

        Non-reentrant activation checkpointing re-runs the checkpointed forwards inside this call;
        what the hooks record there is discarded (``Tape.replaying``); eager rules read their inputs
        as saved tensors, which checkpointing rebuilds (memory: see ``dpscale.tape``). Reentrant
        checkpointing is refused here, before any gradient is computed."""
        self._check_step_bound()
        self._check_model_unchanged()
        self._check_no_unseen_step()
        self._check_budget()
        if self._checks_sampling and self._drawn_step is None:
            raise SamplingError(
                "engine.backward ran on a batch that no dpscale loader bound to this engine drew, so the "
                "accountant's Poisson assumption would be unchecked. Draw the logical batches with "
                "loader = engine.make_data_loader(dataset, max_physical_batch_size=...) and iterate "
                "`for logical_batch in loader: for micro in logical_batch.micro_batches: ...`, or, if your "
                "own sampler really draws as DPConfig.sampling says, declare it with "
                "DPConfig(sampling_declared_by_user=True) (the privacy report then says so)."
            )
        batch = self._check_losses(losses)
        layout, drawn_users = self._unit_layout(users, batch, losses.device)
        calls = self._tape.take()
        self._check_all_uses_recorded(losses, calls)
        check_loss_graph(losses, self._tape.stamp, self._tape.forward)
        edges = [edge for call in calls for edge in call.edges]
        eager = [call for call in calls if call.eager]
        targets = edges + [self._tape.anchor] if eager else edges
        with self._tape.replaying():  # checkpointed regions re-run their forward in here
            grads = list(torch.autograd.grad(losses.sum(), targets, allow_unused=True)) if targets else []
        del grads[len(edges):]  # the anchor's: always None (see dpscale.tape)
        reached = any(g is not None for g in grads) or any(call.result is not None for call in eager)
        if calls and not reached:
            raise TapeError(
                "The losses do not depend on any module call of the last forward pass: compute them "
                "from the most recent forward, and call engine.backward before the next one."
            )
        with torch.no_grad(), self._tape.paused():
            uses = self._per_example_grads(calls, grads)
            del calls, grads
            bad_losses = ~torch.isfinite(losses.detach())
            if layout is not None:  # sum each user's examples: the unit clipped is the user
                uses = {name: [layout.per_unit(use) for use in grad_uses] for name, grad_uses in uses.items()}
                batch = layout.units
                bad_losses = torch.zeros(batch, dtype=torch.long, device=losses.device).index_add_(
                    0, layout.unit.to(losses.device), bad_losses.long()) > 0  # a user with a bad example
            self._accumulate_clipped(uses, batch, bad_losses)
        self._users_this_step |= drawn_users
        self._norms_this_step.append(self.last_norms)
        self._pending_versions = self._parameter_versions()

    def detach(self) -> None:
        """Remove every hook: the model and optimizer are left as they were found."""
        self._tape.detach()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._optimizer = None
        if self.data_loader is not None:
            self.data_loader.on_draw = None

    # the step boundary ------------------------------------------------------------------------

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Bind the step: noise enters at ``optimizer.step()`` through a removable step pre-hook
        (the optimizer itself is not modified). Every parameter it updates must be one this engine
        clips; one optimizer per engine. Returns the optimizer."""
        if self.backend.owns_step:
            raise ConfigError(
                f"{type(self.backend).__name__} steps its training engine's own optimizer (its step adds the "
                "noise): do not attach another one; close each logical step with engine.step()."
            )
        if self._optimizer is not None:
            raise ConfigError("An optimizer is already attached to this engine: one optimizer per engine.")
        ours = {id(p) for p in self.parameters.values()}
        foreign = [i for group in optimizer.param_groups for i, p in enumerate(group["params"]) if id(p) not in ours]
        if foreign:
            raise ConfigError(
                f"The optimizer updates {len(foreign)} parameter(s) that this engine does not clip (frozen or "
                "not part of the model); their gradients would not be private. Build the optimizer over "
                "engine.parameters.values()."
            )
        self._handles.append(optimizer.register_step_pre_hook(lambda *_: self.finish_step()))
        self._optimizer = optimizer
        return optimizer

    def step(self) -> None:
        """Close the logical step through the backend: the attached optimizer's step (its pre-hook
        adds the noise and records the step) and ``zero_grad``, or the DeepSpeedEngine's step. The
        same as calling ``optimizer.step(); optimizer.zero_grad()`` yourself, on every backend."""
        self._check_step_bound()
        self.backend.step(self._optimizer)

    def finish_step(self) -> None:
        """Add noise to every trainable gradient exactly once and record the step with the
        accountant. Runs in the attached optimizer's step pre-hook (or the backend's); never call it
        and then update parameters with an optimizer that is not attached."""
        self._check_model_unchanged()
        self._check_no_unseen_step()
        self._check_budget()
        if self._checks_sampling and self._drawn_step is None:
            raise SamplingError(
                f"Step {self.steps_taken} has no logical batch from the engine's loader: draw each step's batch "
                "with engine.make_data_loader(...) (an empty Poisson batch is still drawn, then stepped), or "
                "declare your own sampling with DPConfig(sampling_declared_by_user=True)."
            )
        std, step, key = self.plan.noise.std, self.steps_taken, self.noise_key

        def add_noise(name: str, flat: Tensor, offset: int) -> None:
            if std > 0 and flat.numel():
                add_gaussian_noise_(flat, key, step, name, std, offset=offset)

        self.backend.finish_step(self.parameters, add_noise)
        if self.plan.accounts:
            self.accountant.step(*self.plan.step_event())
        self.steps_taken += 1
        self._pending_versions = None
        self._drawn_step = None
        self._users_this_step = set()
        norms, self._norms_this_step = self._norms_this_step, []
        self.step_norms = torch.cat(norms) if norms else torch.zeros(0)
        if self._nonfinite_this_step:
            logger.warning(
                "dpscale: step %d: %d %s(s) on this process had a non-finite loss or gradient norm and contributed "
                "zero; the step went on and was charged to the budget as usual.",
                step, self._nonfinite_this_step, self.plan.sampling.privacy_unit,
            )
            self.nonfinite_examples += self._nonfinite_this_step
            self._nonfinite_this_step = 0

    def _check_step_bound(self) -> None:
        if self._optimizer is None and not self.backend.owns_step:
            raise StepBoundaryError(
                "No optimizer is attached to the privacy engine, so nothing would add the noise: an optimizer "
                "stepping these parameters would train without privacy. Attach it before training: "
                "optimizer = engine.attach_optimizer(torch.optim.AdamW(engine.parameters.values(), lr=...)) "
                "(or PrivacyEngine(..., optimizer=optimizer)), and close each logical step with engine.step() "
                "or optimizer.step()."
            )

    def _check_model_unchanged(self) -> None:
        """The trainable parameters (names, objects, ties) and the attached optimizer's parameters are
        the ones the engine was built with: a parameter added, frozen, unfrozen, replaced or re-tied
        afterwards would be trained without noise, noised but not trained, or keyed wrongly."""
        now = trainable_parameters(self.model)
        ours = self.parameters
        changed = now.keys() != ours.keys()
        if not self.backend.swaps_parameters:  # else the objects change by design: names only
            changed = changed or any(now[name] is not p for name, p in ours.items())
        if changed:
            added = sorted(now.keys() - ours.keys())
            gone = sorted(ours.keys() - now.keys())
            replaced = sorted(name for name in now.keys() & ours.keys() if now[name] is not ours[name])
            what = [f"{label}: {names[:5]}" for label, names in (("added or unfrozen", added), (
                "frozen, removed or tied to another", gone), ("replaced by another tensor", replaced)) if names]
            raise ConfigError(
                f"The model's trainable parameters changed after the PrivacyEngine was built ({'; '.join(what)}). The "
                "engine clips, noises and accounts the parameters it was built with. Change the model first, then "
                "build the engine and its optimizer (or build a new engine)."
            )
        if self._optimizer is not None:
            ids = {id(p) for p in ours.values()}
            if any(id(p) not in ids for group in self._optimizer.param_groups for p in group["params"]):
                raise ConfigError(
                    "The attached optimizer was given parameters that this engine does not clip after it was "
                    "attached (add_param_group?): they would be updated without noise. Build the optimizer over "
                    "engine.parameters.values() and do not add parameters to it."
                )

    def _check_no_unseen_step(self) -> None:
        if self._pending_versions is not None and self._parameter_versions() != self._pending_versions:
            raise StepBoundaryError(
                "Parameters changed after engine.backward but before the engine's step: an optimizer the "
                "engine does not know (not attached) consumed the clipped gradients without their noise, so "
                "that update was NOT private. Use one optimizer over engine.parameters.values(), attached with "
                "engine.attach_optimizer, and step only it (or engine.step()) once per logical batch."
            )

    def _check_budget(self) -> None:
        if self.budget_exhausted:
            acc = self.plan.accounting
            raise PrivacyBudgetExhausted(
                f"The privacy budget is spent: {self.steps_taken} steps taken, and step {self.steps_taken + 1} "
                f"would take epsilon past target_epsilon={acc.target_epsilon} at delta={acc.delta:.3g} "
                f"(sigma={self.noise_multiplier:.5g} was calibrated for {acc.planned_steps} steps). Stop and save "
                "here, or give DPConfig(allow_budget_overrun=True) to go on and report the larger epsilon."
            )

    def _parameter_versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self.parameters.values())

    @property
    def _checks_sampling(self) -> bool:
        return self.plan.accounts and not self.plan.sampling.declared_by_user

    def _on_draw(self, batch: LogicalBatch) -> None:
        """Called by the bound loader before it hands out a logical batch (its position has not
        moved yet, so a refused draw leaves the loader where the checkpoint expects it)."""
        if self._drawn_step is not None:
            raise SamplingError(
                f"A new logical batch was drawn while batch {self._drawn_step} was never stepped. Step every "
                "logical batch exactly once, empty ones included (skipping a batch because of its size leaks "
                "it): engine.step() or optimizer.step() after its micro-batches."
            )
        self._check_no_unseen_step()
        self._check_budget()
        if batch.step != self.steps_taken:
            raise SamplingError(
                f"The loader is at logical batch {batch.step} but the engine has taken {self.steps_taken} steps: "
                "restore both from the same checkpoint (engine.load_checkpoint restores the loader's position)."
            )
        self._drawn_step = batch.step

    # accounting -------------------------------------------------------------------------------

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent over the steps taken so far (empty batches included). Raises when it
        cannot be computed; never 0 for a run that took steps."""
        if not self.plan.accounts:
            raise ConfigError(
                f"Epsilon cannot be computed: DPConfig has no dataset_size, so the sampling rate q = B / N "
                f"is unknown ({self.steps_taken} steps taken). Give DPConfig(dataset_size=N) and draw batches "
                "with engine.make_data_loader."
            )
        self._check_no_unseen_step()
        delta = self.plan.accounting.delta if delta is None else delta
        if self.noise_multiplier == 0 and self.steps_taken:
            return math.inf
        return self.accountant.epsilon(delta)

    def privacy_report(self, directory: str | os.PathLike | None = None, points: int = 50) -> dict:
        """What was spent and how, as a dict; with ``directory``, also privacy_report.json and
        epsilon.png (epsilon against steps) written there."""
        plan = self.plan
        accounts, delta = plan.accounts, plan.accounting.delta
        curve = []
        if accounts and self.noise_multiplier > 0:
            curve = [(int(t), float(e)) for t, e in self.accountant.epsilon_curve(delta, points)]
        if not accounts:
            sampling_source = "none: no dataset_size, so no accounting"
        elif plan.sampling.declared_by_user:
            sampling_source = (f"declared by the user (DPConfig.sampling_declared_by_user): dpscale did not draw "
                               f"the batches and cannot check that they are {plan.sampling.kind} at q")
        else:
            sampling_source = "dpscale loader bound to the engine (checked at every step)"
        report = {
            "epsilon": self.epsilon() if accounts else None,
            "delta": delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps_taken,
            "planned_steps": self.planned_steps,
            "budget_steps": self.budget_steps,
            "target_epsilon": self.target_epsilon,
            "allow_budget_overrun": plan.accounting.allow_budget_overrun,
            "accountant": plan.accounting.accountant,
            "sampling": plan.sampling.kind,
            "sampling_source": sampling_source,
            "clipping": self.config.clipping if isinstance(self.config.clipping, str) else "groups",
            "clip_fn": self.config.clip_fn,
            "max_grad_norm": self.config.max_grad_norm,
            "group_max_grad_norms": list(self.clipping.thresholds),
            "expected_batch_size": plan.noise.expected_batch_size,
            "dataset_size": plan.sampling.dataset_size,
            "privacy_unit": plan.sampling.privacy_unit,
            "examples_per_user": plan.sampling.examples_per_user,
            "protects": (f"each user (all their examples; dataset_size and expected_batch_size count users, at most "
                         f"{plan.sampling.examples_per_user} example(s) per user per step)"
                         if plan.sampling.privacy_unit == "user" else "each example (one sequence)"),
            "noise": {"scheme": plan.noise.scheme, "key_fingerprint": plan.noise.key_fingerprint,
                      "schemes_by_first_step": [list(entry) for entry in self._noise_schemes]},
            "trainable_parameters": int(sum(p.numel() for p in self.parameters.values())),
        }
        if directory is not None:
            write_report(report, curve, directory)
        return report

    # data -------------------------------------------------------------------------------------

    def make_data_loader(self, dataset, *, max_physical_batch_size: int, collate_fn=None, user_ids=None) -> DPDataLoader:
        """The loader whose sampling the accountant assumes, bound to this engine: Poisson at
        q = B / N (or shuffled fixed-size batches when DPConfig says sampling="shuffle"), split into
        micro-batches of at most ``max_physical_batch_size``. Its randomness is derived from the
        secret noise key. This process takes its part of each global batch by its position in the
        backend's data-parallel group (ranks holding shards of one model share their examples).

        user_ids: with DPConfig(privacy_unit="user"), the user of every example (a sequence in
            dataset order, or the name of a dataset column). The loader then draws users at q, each
            bringing at most examples_per_user of their examples, kept whole in one micro-batch on
            one rank; DPConfig.dataset_size must be the number of distinct users."""
        sampling = self.plan.sampling
        if sampling.sample_rate is None:
            raise ConfigError("make_data_loader needs DPConfig(dataset_size=N).")
        if sampling.privacy_unit == "user":
            if user_ids is None:
                raise ConfigError(
                    "DPConfig(privacy_unit='user') protects users, so the loader must know whose each example is: "
                    "engine.make_data_loader(dataset, ..., user_ids=[the user of each example] or a column name)."
                )
            k = sampling.examples_per_user
            if k > max_physical_batch_size:
                raise ConfigError(
                    f"DPConfig(examples_per_user={k}) exceeds max_physical_batch_size={max_physical_batch_size}: a "
                    "user's examples are clipped as one unit and must fit in one micro-batch. Lower examples_per_user "
                    f"or use max_physical_batch_size >= {k}."
                )
            user_ids = resolve_user_ids(dataset, user_ids)
            users = len(set(user_ids))
            if users != sampling.dataset_size:
                raise ConfigError(
                    f"The dataset's {len(dataset)} examples belong to {users} users but DPConfig(dataset_size="
                    f"{sampling.dataset_size}); at user level dataset_size is the number of users."
                )
        else:
            if user_ids is not None:
                raise ConfigError(
                    "user_ids= was given but DPConfig(privacy_unit='example') protects single examples; set "
                    "DPConfig(privacy_unit='user', dataset_size=<number of users>) for user-level privacy."
                )
            if len(dataset) != sampling.dataset_size:
                raise ConfigError(f"The dataset has {len(dataset)} examples but DPConfig(dataset_size={sampling.dataset_size}).")
        loader = DPDataLoader(
            dataset, sample_rate=sampling.sample_rate, max_physical_batch_size=max_physical_batch_size,
            collate_fn=collate_fn, steps=sampling.steps, seed=self.noise_key.derive_seed("sampling"),
            rank=sampling.rank, world_size=sampling.world_size, sampling=sampling.kind,
            user_ids=user_ids, examples_per_user=sampling.examples_per_user,
        )
        self.bind_data_loader(loader)
        return loader

    def bind_data_loader(self, loader: DPDataLoader) -> None:
        """Make ``loader`` the one whose batches this engine steps on (``make_data_loader`` does
        this). Its sampling, rate, dataset size and data-parallel position must be the plan's."""
        sampling = self.plan.sampling
        theirs = (loader.sampling, loader.sample_rate, loader.dataset_size, loader.batch_sampler.rank,
                  loader.batch_sampler.world_size, loader.privacy_unit, loader.examples_per_user)
        ours = (sampling.kind, sampling.sample_rate, sampling.dataset_size, sampling.rank, sampling.world_size,
                sampling.privacy_unit, sampling.examples_per_user)
        if theirs != ours:
            raise ConfigError(
                f"The loader draws (sampling, q, N, rank, world_size, privacy_unit, examples_per_user) = {theirs} but "
                f"the engine's plan is {ours}; build it with engine.make_data_loader."
            )
        if loader.on_draw is not None and loader.on_draw != self._on_draw:
            raise ConfigError("This loader is bound to another privacy engine.")
        if self.data_loader is not None and self.data_loader is not loader:
            self.data_loader.on_draw = None  # its batches no longer count for this engine
        loader.on_draw = self._on_draw
        self.data_loader = loader

    # state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Step counter, accountant history, the data loader's position, the mechanism and the key's
        fingerprint; never the key, nor the sampling seed derived from it."""
        self._check_no_unseen_step()
        state = {
            "format": 2,
            "steps_taken": self.steps_taken,
            "accountant": self.accountant.state_dict(),
            "mechanism": self.plan.mechanism(),
            "key_fingerprint": self.noise_key.fingerprint,
            "noise_schemes": [list(entry) for entry in self._noise_schemes],
            "plan": self.plan.as_dict(),
            "resume_check": self._resume_check(),
        }
        if self.data_loader is not None:
            loader_state = dict(self.data_loader.state_dict())
            loader_state.pop("seed", None)
            state["data_loader"] = loader_state
        return state

    def _resume_check(self) -> dict:
        """What a resumed run must share with the run it continues beyond the accounted mechanism:
        the trainable parameters (names and shapes: the noise of each coordinate is keyed by them)
        and the clipping (function, groups, thresholds, gamma) and the examples a user may bring."""
        clipping = self.clipping
        return {
            "parameters": [[name, list(getattr(p, "ds_shape", None) or p.shape)]
                           for name, p in self.parameters.items()],
            "clip_fn": clipping.clip_fn,
            "clip_gamma": clipping.gamma if clipping.clip_fn != "abadi" else None,
            "clip_groups": [list(group) for group in clipping.groups],
            "clip_thresholds": list(clipping.thresholds),
            "examples_per_user": self.plan.sampling.examples_per_user,
        }

    def load_state_dict(self, state: dict, *, fresh_key: bool = False, new_noise_scheme: bool = False) -> None:
        """Resume: the step counter continues, so no (key, step) pair is ever used twice.

        The key must be the one the run started with (its fingerprint is checked), so that the
        batches and the noise continue the same draw; ``fresh_key=True`` resumes with another key
        on purpose (the rest of the run draws fresh batches and noise). Likewise the noise scheme
        (dpscale.noise.SCHEME): a state written under another one (by an older dpscale) is refused,
        because the rest of the run would add other noise than the run it continues; the guarantee
        would hold (each step's noise is a fresh draw under either scheme, and the schemes' streams
        are independent), so ``new_noise_scheme=True`` continues under this dpscale's scheme on
        purpose, says so in the log, and the state and the privacy report record from which step.
        A state of another mechanism or model is refused, and a refused state leaves the engine
        (and its loader) as they were: everything is checked first, and a part that fails to load
        rolls the others back."""
        if not isinstance(state, dict) or state.get("format") != 2:
            raise CheckpointError("Not a dpscale privacy state (format 2): point to the privacy.pt the run wrote.")
        missing = sorted({"steps_taken", "accountant", "mechanism", "key_fingerprint"} - set(state))
        if missing or not isinstance(state["mechanism"], dict):
            raise CheckpointError(f"The privacy state lacks {missing or ['mechanism']}: it is damaged; start over.")
        saved, ours = state["mechanism"], self.plan.mechanism()
        legacy = {"privacy_unit": "example"}  # checkpoints written before the field existed
        for field, value in ours.items():
            if saved.get(field, legacy.get(field)) != value:
                raise CheckpointError(
                    f"The checkpoint was written with {field}={saved.get(field)!r} but this engine has "
                    f"{value!r}; resuming would change the mechanism the accountant composed."
                )
        # absent from states written before it existed; those resume as they did
        for field, value in self._resume_check().items():
            recorded = state.get("resume_check", {}).get(field, value)
            if recorded != value:
                shown = _first_difference(recorded, value) if field in ("parameters", "clip_groups") else \
                    f"{recorded!r} but this engine has {value!r}"
                raise CheckpointError(
                    f"The checkpoint was written with another {field}: {shown}. Resume with the model, trainable "
                    "parameters and DPConfig the run began with, or start a new run in another folder."
                )
        if state["key_fingerprint"] != self.noise_key.fingerprint and not fresh_key:
            raise CheckpointError(
                f"The checkpoint was written with noise key {state['key_fingerprint']} but this engine holds "
                f"{self.noise_key.fingerprint}: resume with the key file the run started with (noise_key=path). "
                "To continue with a new key on purpose (fresh batches and noise from here on), pass fresh_key=True."
            )
        schemes = _recorded_noise_schemes(state)
        previous, ours = schemes[-1][0], self.plan.noise.scheme
        if previous != ours:
            if not new_noise_scheme:
                raise CheckpointError(
                    f"The checkpoint was written under noise scheme {previous!r} but this dpscale draws "
                    f"{ours!r}: the rest of the run would add other noise than the run it continues (the "
                    "guarantee would hold, the reproducibility of the run would not). Resume with the dpscale "
                    "version that wrote it, or pass new_noise_scheme=True to continue under the new scheme on "
                    "purpose (the privacy report then records both)."
                )
            schemes = [*schemes, [ours, int(state["steps_taken"])]]
        if "data_loader" in state and self.data_loader is None:
            raise ConfigError("The checkpoint has a data loader position: build it with engine.make_data_loader first.")
        before = (self.accountant.state_dict(), self.steps_taken,
                  None if self.data_loader is None else self.data_loader.state_dict())
        try:
            self.accountant.load_state_dict(state["accountant"])
            self.steps_taken = int(state["steps_taken"])
            if "data_loader" in state:
                self.data_loader.load_state_dict(
                    {**state["data_loader"], "seed": list(self.noise_key.derive_seed("sampling"))})
        except BaseException:
            self.accountant.load_state_dict(before[0])
            self.steps_taken = before[1]
            if before[2] is not None:
                self.data_loader.load_state_dict(before[2])
            raise
        if previous != ours:
            logger.warning(
                "Resumed at step %d under noise scheme %s; the steps before it drew their noise under %s. The "
                "accounting is unaffected; the noise from here on is not what the run would have drawn without "
                "the change.", self.steps_taken, ours, previous,
            )
        self._noise_schemes = schemes
        self._pending_versions = None
        self._drawn_step = None
        self._users_this_step = set()

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """The privacy state (``state_dict``), written atomically and sealed with its SHA-256
        (dpscale.checkpoint); never the key."""
        save_atomic(self.state_dict(), path, kind="privacy")

    def load_checkpoint(self, path: str | os.PathLike, *, fresh_key: bool = False,
                        new_noise_scheme: bool = False) -> None:
        """Resume from ``save_checkpoint``'s file: a torn, altered or foreign file, or one of another
        model, mechanism or noise scheme, raises CheckpointError and leaves the engine as it was
        (``load_state_dict`` says when ``fresh_key`` and ``new_noise_scheme`` continue anyway)."""
        self.load_state_dict(load_state(path, kind="privacy"), fresh_key=fresh_key,
                             new_noise_scheme=new_noise_scheme)

    # steps of backward --------------------------------------------------------------------------

    def _check_losses(self, losses: Tensor) -> int:
        if not isinstance(losses, Tensor):
            raise LossShapeError(f"engine.backward expects a tensor of per-example losses, got {type(losses).__name__}.")
        batch = self._tape.batch_size
        if batch is None:
            if _walk_graph(losses)[1]:  # the whole model checkpointed: its forward ran without autograd
                raise UnsupportedModuleError(_REENTRANT_CHECKPOINTING)
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

    def _unit_layout(self, users, batch: int, device: torch.device) -> tuple[UnitLayout | None, set]:
        """User level: which examples of this call form one user (None when each example is its own
        unit), and the drawn users it brings; refuses what would clip a user in pieces."""
        config = self.config
        if config.privacy_unit == "example":
            if users is not None:
                raise ConfigError(
                    "engine.backward got users=, but DPConfig(privacy_unit='example') protects each example on its "
                    "own. For user-level privacy build the engine with DPConfig(privacy_unit='user', ...)."
                )
            return None, set()
        k = config.examples_per_user
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
            raise LossShapeError(f"users= names {len(ids)} users for a forward pass over {batch} examples: give one per example.")
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
        split = sorted(drawn & self._users_this_step, key=repr)
        if split:
            raise SamplingError(
                f"User(s) {split[:5]} already had examples in an earlier backward of this step: a user's examples "
                "must be clipped together, in one micro-batch on one rank, or their sensitivity doubles. Use the "
                "micro-batches of engine.make_data_loader(..., user_ids=...), which keep each user whole."
            )
        return (None if layout.trivial else layout), drawn

    def _check_all_uses_recorded(self, losses: Tensor, calls: list) -> None:
        """Every trainable parameter that the losses depend on must have been used through a
        recorded module call; a parameter used directly by another module's forward would
        otherwise lose its gradient silently."""
        recorded = {name for call in calls for name in call.global_names}
        reached, reentrant = _walk_graph(losses)
        if reentrant:
            raise UnsupportedModuleError(_REENTRANT_CHECKPOINTING)
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
                local = self._rule_grads(call, call.inputs, call.output_grad(call_grads))
            for name, global_name in zip(call.names, call.global_names):
                uses[global_name].append(local[name])
        return uses

    def _run_rule_now(self, call: ModuleCall, output_grad: Tensor, saved: tuple) -> None:
        """An eager call's rule, inside the backward, as soon as its output's gradient exists: what
        it returns is kept and its input released (see ``dpscale.tape``)."""
        inputs = call.inputs
        if saved:
            inputs = CallInputs(saved[:1] + tuple(inputs[1:]), inputs.kwargs)
        with torch.no_grad(), self._tape.paused():
            call.result = self._rule_grads(call, inputs, call.output_grad([output_grad]))
        call.inputs = CallInputs()

    @staticmethod
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

    def _accumulate_clipped(self, uses: dict[str, list[PerExampleGrad]], batch: int, bad_losses: Tensor) -> None:
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.parameters.values()) else torch.float32
        device = next(iter(self.parameters.values())).device
        norms2 = torch.zeros(len(self.clipping.groups), batch, dtype=dtype, device=device)
        sharded2 = torch.zeros_like(norms2) if self.model_parallel_group is not None else norms2
        grams = GramCache()
        for name, grad_uses in uses.items():
            target = sharded2 if name in self._sharded else norms2
            target[self._group_of[name]] += total_squared_norm(grad_uses, grams).to(dtype)
        del grams
        if self.model_parallel_group is not None:
            # A sharded parameter's per-example gradient is split over these ranks: its squared
            # norm is the sum of the shards'. Replicated parameters count once. Never summed over
            # data-parallel ranks (they hold other examples).
            torch.distributed.all_reduce(sharded2, group=self.model_parallel_group)
            norms2 = norms2 + sharded2
        norms = norms2.sqrt()
        factors = self.clipping.factors(norms)
        # The non-finite rule (docs/RELIABILITY.md): a unit whose loss or any group's norm is not
        # finite contributes exactly zero. Its factors are masked, and so are its per-example forms,
        # since a zero weight times a NaN is still NaN; the noise and the step go on as usual.
        bad = bad_losses.to(norms.device) | ~torch.isfinite(norms).all(0)
        if bool(bad.any()):
            factors = torch.where(bad, torch.zeros_like(factors), factors)
            uses = {name: [zero_units(use, bad) for use in grad_uses] for name, grad_uses in uses.items()}
            self._nonfinite_this_step += int(bad.sum())
        weights = factors / self.config.expected_batch_size
        for name, p in self.parameters.items():
            grad_uses = uses.pop(name, [])
            clipped = None
            for use in grad_uses:
                term = weighted_sum(use, weights[self._group_of[name]], p.dtype)
                clipped = term if clipped is None else clipped + term
            if clipped is None:
                clipped = torch.zeros_like(p)
            self.backend.accumulate(name, p, clipped)
        self.last_group_norms = norms
        self.last_norms = norms2.sum(0).sqrt()
        self.last_clip_factors = factors


def _log_plan(plan: ExecutionPlan) -> None:
    """Once, when the engine is built: what the run will spend and how."""
    acc, sampling = plan.accounting, plan.sampling
    if plan.accounts:
        logger.info(
            "dpscale: sigma %.5g, noise std %.3g, q %.4g (B %g of N %d %ss, %s sampling), delta %.3g, %s steps planned%s.",
            plan.noise.noise_multiplier, plan.noise.std, sampling.sample_rate, plan.noise.expected_batch_size,
            sampling.dataset_size, sampling.privacy_unit, sampling.kind, acc.delta, acc.planned_steps,
            "" if acc.target_epsilon is None else
            f", target epsilon {acc.target_epsilon:g} (budget {acc.budget_steps} steps)",
        )
    else:
        logger.info("dpscale: sigma %.5g, noise std %.3g; no dataset_size, so no accounting.",
                    plan.noise.noise_multiplier, plan.noise.std)


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
                raise UnsupportedModuleError(f"TorchScript module '{qualname}' has trainable parameters; dpscale needs eager modules.")
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
            logger.info("No rule for %s ('%s'): its parameters use the fallback, rule '%s'.", type(module).__name__, qualname, rule.name)
        owners.append(Owner(module, qualname, rule, tuple(n for n, _ in names), tuple(g for _, g in names), through_parent))
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


_FIRST_NOISE_SCHEME = "dpscale.noise.gaussian.v1"  # every state written before states recorded a scheme


def _recorded_noise_schemes(state: dict) -> list[list]:
    """The noise schemes a saved run drew under, as [scheme, first step] pairs: its "noise_schemes"
    record; for a state written before that record existed, the scheme of its plan (then, as
    before the plan was saved, the first scheme, the only one there was)."""
    recorded = state.get("noise_schemes")
    if recorded is None:
        plan = state.get("plan")
        noise = plan.get("noise") if isinstance(plan, dict) else None
        scheme = noise.get("scheme") if isinstance(noise, dict) else None
        return [[scheme if isinstance(scheme, str) else _FIRST_NOISE_SCHEME, 0]]
    if not (isinstance(recorded, list) and recorded and all(
            isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)
            and isinstance(entry[1], int) for entry in recorded)):
        raise CheckpointError("The privacy state's noise_schemes record is damaged; start over.")
    return [list(entry) for entry in recorded]


def _first_difference(recorded: list, ours: list) -> str:
    """Where two lists (of parameters or clipping groups) part, in words short enough for a message."""
    for index, (theirs, mine) in enumerate(zip(recorded, ours)):
        if theirs != mine:
            return f"entry {index} is {theirs!r} in the checkpoint, {mine!r} here"
    return f"the checkpoint has {len(recorded)} entries, this engine {len(ours)}"


def _refuse_example_mixing(model: nn.Module) -> None:
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


# The backward node of torch.utils.checkpoint's reentrant Function, named as autograd names the
# nodes of every custom Function (no public handle on the class). Should torch rename it, torch's
# own error (reentrant checkpointing refuses torch.autograd.grad) still stops the backward.
_REENTRANT_CHECKPOINT_NODE = "CheckpointFunctionBackward"

_REENTRANT_CHECKPOINTING = (
    "The losses pass through reentrant activation checkpointing (torch.utils.checkpoint with use_reentrant=True, "
    "or without use_reentrant). It runs the checkpointed forward without autograd, so dpscale sees no module call "
    "inside it, and back-propagates it in a nested backward that writes non-private weight gradients. Use the "
    "non-reentrant kind, which dpscale supports exactly: model.gradient_checkpointing_enable("
    "gradient_checkpointing_kwargs={'use_reentrant': False}) (the default when no kwargs are given), or "
    "torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)."
)


def _walk_graph(losses: Tensor) -> tuple[set[int], bool]:
    """(ids of the leaf tensors whose AccumulateGrad nodes the losses' graph reaches, whether it
    passes through reentrant activation checkpointing)."""
    reached: set[int] = set()
    reentrant = False
    root = losses.grad_fn
    if root is None:
        return reached, reentrant
    seen = {root}
    stack = [root]
    while stack:
        node = stack.pop()
        variable = getattr(node, "variable", None)
        if variable is not None:
            reached.add(id(variable))
        reentrant = reentrant or type(node).__name__ == _REENTRANT_CHECKPOINT_NODE
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                stack.append(child)
    return reached, reentrant
