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
from typing import Collection, Mapping

import torch
from torch import Tensor, nn

from dpscale.accounting import PrivacyAccountant
from dpscale.backends import GradientBackend, LocalBackend
from dpscale.backends.data_parallel import DataParallelBackend, attach_ddp
from dpscale.checkpoint import load_state, save_atomic
from dpscale.clipping import ClippingPlan, build_plan
from dpscale.config import DPConfig
from dpscale.errors import ConfigError, LossShapeError, NoTrainableParametersError, TapeError, UnsupportedModuleError
from dpscale.layers import RuleRegistry, default_registry
from dpscale.noise import SCHEME as NOISE_SCHEME
from dpscale.noise import NoiseKey, add_gaussian_noise_
from dpscale.per_example import GramCache, PerExampleGrad, total_squared_norm, weighted_sum
from dpscale.privacy import PrivacyPlan, resolve_plan
from dpscale.report import write_report
from dpscale.sampling import DPDataLoader
from dpscale.tape import ModuleCall, Owner, Tape

logger = logging.getLogger(__name__)


class PrivacyEngine:
    """DP-SGD for ``model``'s trainable parameters: exact per-example clipping in ``backward``,
    keyed Gaussian noise once per optimizer step, and the accountant's record of the steps.

    optimizer: attached now, or later with ``attach_optimizer``; noise is added in its step
        pre-hook, once per ``optimizer.step()`` whatever the number of ``backward`` calls.
    noise_key: a ``NoiseKey`` or the path of a key file (reproducible runs); default a fresh key
        from os.urandom. The key is never logged nor saved in a checkpoint.
    rules: a registry from ``dpscale.default_registry()`` with rules for custom layers
        registered on it; the engine keeps its own copy. ``engine.rule_names`` says, per module
        owning trainable parameters (by qualified name), which rule differentiates it.
    backend: where clipped sums go and which noise coordinates this process adds (default: one
        process, ``LocalBackend``).
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
            raise TypeError("config must be a dpscale.DPConfig")
        # DistributedDataParallel: hooks and names on the inner module (the names key the noise),
        # DDP's own reducer kept idle while attached, data-parallel backend by default.
        self._ddp = attach_ddp(model)
        if self._ddp is not None:
            model = self._ddp.module
            if backend is None:
                backend = DataParallelBackend(self._ddp.process_group)
            elif isinstance(backend, LocalBackend):
                raise ConfigError("A DDP-wrapped model needs a backend that reduces across ranks (DataParallelBackend), not LocalBackend.")
        self.model = model
        self.config = config
        self.rules = (rules or default_registry()).copy()
        self.backend: GradientBackend = backend if backend is not None else LocalBackend()
        declared = getattr(self.backend, "model_parallel", None)  # a backend that knows the split (AutoTP)
        if declared is not None and model_parallel_group is None and sharded_parameters is None:
            model_parallel_group, sharded_parameters = declared
        self.model_parallel_group = model_parallel_group
        self._sharded = frozenset(sharded_parameters or ())
        if (model_parallel_group is None) != (sharded_parameters is None):
            raise ConfigError(
                "model_parallel_group and sharded_parameters go together: name the parameters split across "
                "the group, so that replicated ones are not counted once per rank."
            )
        self.parameters: dict[str, nn.Parameter] = {
            name: p for name, p in model.named_parameters() if p.requires_grad
        }
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
        self.clipping: ClippingPlan = build_plan(config, list(self.parameters))
        self._group_of = self.clipping.group_of()
        self._tape = Tape(model, owners, self.rules.default)
        if self._ddp is not None:
            self._ddp.silence()
        self._handles = [
            module.register_forward_pre_hook(_refuse_training_batch_norm)
            for module in model.modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
        ]
        self.last_norms: Tensor | None = None
        self.last_group_norms: Tensor | None = None
        self.last_clip_factors: Tensor | None = None
        self.plan: PrivacyPlan = resolve_plan(config, self.clipping)
        self.noise_key = _as_key(noise_key)
        self.accountant = PrivacyAccountant(self.plan.accountant, self.plan.sampling, self.plan.dataset_size)
        self.steps_taken = 0
        self.data_loader: DPDataLoader | None = None
        self._optimizer_handles: list = []
        bind = getattr(self.backend, "bind", None)  # a backend that hooks its engine's own step
        if bind is not None:
            self._optimizer_handles.extend(bind(self))
        if optimizer is not None:
            self.attach_optimizer(optimizer)

    # the one seam -----------------------------------------------------------------------------

    def backward(self, losses: Tensor) -> None:
        """Back-propagate one loss per example and add sum_i clip(g_i) / B to each ``p.grad``.

        Several calls before an optimizer step accumulate, as ``loss.backward()`` does."""
        batch = self._check_losses(losses)
        calls = self._tape.take()
        self._check_all_uses_recorded(losses, calls)
        edges = [edge for call in calls for edge in call.edges]
        grads = list(torch.autograd.grad(losses.sum(), edges, allow_unused=True)) if edges else []
        if grads and all(g is None for g in grads):
            raise TapeError(
                "The losses do not depend on any module call of the last forward pass: compute them "
                "from the most recent forward, and call engine.backward before the next one."
            )
        with torch.no_grad(), self._tape.paused():
            uses = self._per_example_grads(calls, grads)
            del calls, grads
            self._accumulate_clipped(uses, batch)

    def detach(self) -> None:
        """Remove every hook: the model and optimizer are left as they were found."""
        self._tape.detach()
        if self._ddp is not None:
            self._ddp.restore()
        for handle in self._handles + self._optimizer_handles:
            handle.remove()
        self._handles.clear()
        self._optimizer_handles.clear()

    # the step boundary ------------------------------------------------------------------------

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Noise enters at ``optimizer.step()`` through a removable step pre-hook (the optimizer
        itself is not modified). Every parameter it updates must be one this engine clips."""
        ours = {id(p) for p in self.parameters.values()}
        foreign = [i for group in optimizer.param_groups for i, p in enumerate(group["params"]) if id(p) not in ours]
        if foreign:
            raise ConfigError(
                f"The optimizer updates {len(foreign)} parameter(s) that this engine does not clip (frozen or "
                "not part of the model); their gradients would not be private. Build the optimizer over "
                "engine.parameters.values()."
            )
        self._optimizer_handles.append(optimizer.register_step_pre_hook(lambda *_: self.finish_step()))
        return optimizer

    def finish_step(self) -> None:
        """Close one logical step: add noise to every trainable gradient exactly once and record
        the step with the accountant. Called by the attached optimizer's step pre-hook; call it
        yourself only when no optimizer is attached."""
        std, step, key = self.plan.noise_std, self.steps_taken, self.noise_key

        def add_noise(name: str, flat: Tensor, offset: int) -> None:
            if std > 0 and flat.numel():
                add_gaussian_noise_(flat, key, step, name, std, offset=offset)

        self.backend.finish_step(self.parameters, add_noise)
        if self.plan.sample_rate is not None:
            self.accountant.step(self.plan.noise_multiplier, self.plan.sample_rate)
        self.steps_taken += 1

    # accounting -------------------------------------------------------------------------------

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent over the steps taken so far (empty batches included)."""
        delta = self.plan.delta if delta is None else delta
        if self.plan.sample_rate is None or delta is None:
            raise ConfigError("Epsilon needs the dataset size: give DPConfig(dataset_size=N).")
        if self.plan.noise_multiplier == 0 and self.steps_taken:
            return math.inf
        return self.accountant.epsilon(delta)

    def privacy_report(self, directory: str | os.PathLike | None = None, points: int = 50) -> dict:
        """What was spent and how, as a dict; with ``directory``, also privacy_report.json and
        epsilon.png (epsilon against steps) written there."""
        curve = []
        if self.plan.sample_rate is not None and self.plan.delta is not None and self.plan.noise_multiplier > 0:
            curve = [(int(t), float(e)) for t, e in self.accountant.epsilon_curve(self.plan.delta, points)]
        report = {
            "epsilon": self.epsilon() if self.plan.sample_rate is not None else None,
            "delta": self.plan.delta,
            "noise_multiplier": self.plan.noise_multiplier,
            "sample_rate": self.plan.sample_rate,
            "steps": self.steps_taken,
            "planned_steps": self.plan.planned_steps,
            "target_epsilon": self.plan.target_epsilon,
            "accountant": self.plan.accountant,
            "sampling": self.plan.sampling,
            "clipping": self.config.clipping if isinstance(self.config.clipping, str) else "groups",
            "clip_fn": self.config.clip_fn,
            "max_grad_norm": self.config.max_grad_norm,
            "group_max_grad_norms": list(self.clipping.thresholds),
            "expected_batch_size": self.plan.expected_batch_size,
            "dataset_size": self.plan.dataset_size,
            "noise": {"scheme": NOISE_SCHEME, "key_fingerprint": self.noise_key.fingerprint},
            "trainable_parameters": int(sum(p.numel() for p in self.parameters.values())),
        }
        if directory is not None:
            write_report(report, curve, directory)
        return report

    # data -------------------------------------------------------------------------------------

    def make_data_loader(self, dataset, *, max_physical_batch_size: int, collate_fn=None, rank: int | None = None,
                         world_size: int | None = None) -> DPDataLoader:
        """The loader whose sampling the accountant assumes: Poisson at q = B / N (or shuffled
        fixed-size batches when DPConfig says sampling="shuffle"), split into micro-batches of at
        most ``max_physical_batch_size``. Its randomness is derived from the secret noise key.

        rank, world_size: this process's part of each global batch. By default its position in the
        backend's data-parallel group: ranks that hold shards of one model (tensor parallel) see the
        same examples, data-parallel ranks disjoint ones."""
        if rank is None and world_size is None:
            rank, world_size = getattr(self.backend, "rank", 0), getattr(self.backend, "world_size", 1)
        elif rank is None or world_size is None:
            raise ConfigError("make_data_loader: give both rank and world_size, or neither.")
        if self.plan.sample_rate is None:
            raise ConfigError("make_data_loader needs DPConfig(dataset_size=N).")
        if len(dataset) != self.plan.dataset_size:
            raise ConfigError(f"The dataset has {len(dataset)} examples but DPConfig(dataset_size={self.plan.dataset_size}).")
        loader = DPDataLoader(
            dataset, sample_rate=self.plan.sample_rate, max_physical_batch_size=max_physical_batch_size,
            collate_fn=collate_fn, steps=self.plan.planned_steps, seed=self.noise_key.derive_seed("sampling"),
            rank=rank, world_size=world_size, sampling=self.plan.sampling,
        )
        self.data_loader = loader
        return loader

    # state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Step counter, accountant history, the data loader's position and the plan; never the
        key, nor the sampling seed derived from it."""
        state = {
            "format": 1,
            "steps_taken": self.steps_taken,
            "accountant": self.accountant.state_dict(),
            "plan": self.plan.as_dict(),
        }
        if self.data_loader is not None:
            loader_state = dict(self.data_loader.state_dict())
            loader_state.pop("seed", None)
            state["data_loader"] = loader_state
        return state

    def load_state_dict(self, state: dict) -> None:
        """Resume: the step counter continues, so no (key, step) pair is ever used twice; with
        another key (none given on resume) the noise and the batches are fresh draws."""
        if state.get("format") != 1:
            raise ConfigError("Not a dpscale privacy state (format 1).")
        saved = state["plan"]
        for field in ("noise_multiplier", "sample_rate", "sensitivity", "expected_batch_size", "accountant", "sampling"):
            if saved.get(field) != getattr(self.plan, field):
                raise ConfigError(
                    f"The checkpoint was written with {field}={saved.get(field)!r} but this engine has "
                    f"{getattr(self.plan, field)!r}; resuming would change the mechanism the accountant composed."
                )
        self.accountant.load_state_dict(state["accountant"])
        self.steps_taken = int(state["steps_taken"])
        if "data_loader" in state:
            if self.data_loader is None:
                raise ConfigError("The checkpoint has a data loader position: build it with engine.make_data_loader first.")
            self.data_loader.load_state_dict({**state["data_loader"], "seed": list(self.noise_key.derive_seed("sampling"))})

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        save_atomic(self.state_dict(), path)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        self.load_state_dict(load_state(path))

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

    def _per_example_grads(self, calls: list[ModuleCall], grads: list) -> dict[str, list[PerExampleGrad]]:
        """Every recorded call through its own rule, the same way: {global name: its uses}."""
        uses: dict[str, list[PerExampleGrad]] = defaultdict(list)
        position = 0
        for call in calls:
            count = len(call.edges)
            call_grads = grads[position : position + count]
            grads[position : position + count] = [None] * count  # free as we go
            position += count
            if all(g is None for g in call_grads):
                continue
            try:
                local = call.rule.grads(call.module, call.inputs, call.output_grad(call_grads), call.names)
            except UnsupportedModuleError as error:
                raise UnsupportedModuleError(f"Module '{call.qualname}', rule '{call.rule.name}': {error}") from error
            if set(local) != set(call.names):
                raise UnsupportedModuleError(
                    f"Rule '{call.rule.name}' for '{call.qualname}' returned gradients for {sorted(local)} "
                    f"but the module's trainable parameters are {sorted(call.names)}."
                )
            for name, global_name in zip(call.names, call.global_names):
                uses[global_name].append(local[name])
        return uses

    def _accumulate_clipped(self, uses: dict[str, list[PerExampleGrad]], batch: int) -> None:
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


def _as_key(key) -> NoiseKey:
    if key is None:
        return NoiseKey.generate()
    if isinstance(key, NoiseKey):
        return key
    return NoiseKey.from_file(key)


def find_owners(model: nn.Module, parameters: dict[str, nn.Parameter], rules: RuleRegistry) -> list[Owner]:
    """Each module that owns trainable parameters directly, with the rule that differentiates it
    (the registry's default where nothing else matches, and for a module differentiated through
    its parent, where the default runs at the enclosing call).

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
        through_parent = rules.through_parent(qualname)
        rule = rules.default if through_parent else rules.rule_for(module)
        if rule.validate is not None:
            rule.validate(module)
        if rule is rules.default:
            logger.info("No rule for %s ('%s'): its parameters use the fallback, rule '%s'.", type(module).__name__, qualname, rule.name)
        owners.append(Owner(module, qualname, rule, tuple(n for n, _ in names), tuple(g for _, g in names), through_parent))
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
