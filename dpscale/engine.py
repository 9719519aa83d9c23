"""PrivacyEngine: the seam. ``backward(losses)`` clips each example's gradient and hands the
clipped sums to the backend's buffers; the attached optimizer's step (or the training engine's)
closes the logical step, the one moment the noised gradients exist in ``p.grad``.

The engine is cut along the DP step, each part in its own file: which modules own which
parameters (``owners``), the backward pipeline (``backward_pass``, one graph walk and one
autograd call per backward), the step boundary (``step_boundary``), the guards that keep every
other gradient and optimizer out (``gradient_guard``), resume (``resume``) and the report
(``report``). The execution plan, built once, is their only source of B, the privacy unit and the
clipping. The engine knows no training engine: backends (``backends``) own the buffers, the
reduction and the step of DDP, DeepSpeed and FSDP2, behind the contract of ``backends.base``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

import torch
from torch import Tensor, nn

from dpscale.accounting import PrivacyAccountant
from dpscale.adaptive_clipping import AdaptiveClipping
from dpscale.backends import BackendContext, GradientBackend, select_backend
from dpscale.backward_pass import BackwardPipeline
from dpscale.checkpoint import load_state, save_atomic
from dpscale.clipping import ClippingPlan, build_plan
from dpscale.config import DPConfig
from dpscale.errors import ConfigError, NoTrainableParametersError
from dpscale.gradient_guard import foreign_backward_error, guard_optimizers, guard_parameters
from dpscale.layers import RuleRegistry, default_registry
from dpscale.noise import DEFAULT_NOISE_AHEAD, NoiseAheadOptions, NoiseKey, load_noise_key
from dpscale.optim import DPAdamBC
from dpscale.owners import find_owners, refuse_example_mixing, refuse_training_batch_norm, trainable_parameters
from dpscale.plan import ExecutionPlan, build_execution_plan
from dpscale.report import build_report
from dpscale.resume import load_privacy_state, privacy_state
from dpscale.sampling import DPDataLoader
from dpscale.step_boundary import StepBoundary
from dpscale.tape import Tape
from dpscale.units import check_privacy_units

__all__ = ["OptimizerFactory", "PrivacyEngine"]

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
"""factory(trainable parameters) -> the optimizer the engine attaches."""

logger = logging.getLogger(__name__)


class PrivacyEngine:
    """DP-SGD for ``model``'s trainable parameters: exact per-example clipping in ``backward``,
    keyed Gaussian noise once per logical step, and the accountant's record of the steps.

    The engine owns the gradient. Between steps ``p.grad`` is None: the clipped sums live in the
    backend's buffers, and become ``p.grad`` (with their noise) only inside the attached
    optimizer's step. So, by construction, and each with a dpscale error naming the fix:

    * a gradient from any backward other than ``engine.backward`` (``loss.backward()``,
      ``accelerator.backward(loss)``, an auxiliary loss, another library's hook) is refused as it
      reaches the model, before any trainable parameter receives it (``ForeignGradientError``);
    * an optimizer the engine does not know finds no gradient, and its step over the engine's
      parameters is refused by name (``ForeignGradientError``);
    * ``backward`` refuses to run until a step is bound: an optimizer attached (``optimizer=`` or
      ``attach_optimizer``), or a backend that hooks its training engine's own step (DeepSpeed);
    * with accounting (``dataset_size``), every step must run on a logical batch drawn by the
      engine's own loader (``make_data_loader``), each drawn batch stepped exactly once, empty
      ones included (``SamplingError``); or the user declares their sampling in the config;
    * with ``target_epsilon``, the step past the budget is refused (``PrivacyBudgetExhausted``).

    model: the model, or what wraps it for training: a DDP wrapper, a ``fully_shard``'ed (FSDP2)
        model or a DeepSpeedEngine; ``select_backend`` picks the backend and the module to hook.
    optimizer: attached now, or later with ``attach_optimizer``: an optimizer over the model's
        parameters (frozen ones are ignored) or a factory called with the trainable ones,
        ``optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3)`` (then ``engine.optimizer``).
    noise_key: a ``NoiseKey`` or the path of a key file (reproducible, resumable runs; required
        with several processes, all reading the same file); default a fresh key. Never logged
        nor saved.
    rules: a registry from ``dpscale.default_registry()`` with rules for custom layers
        registered on it; the engine keeps its own copy. ``engine.rule_names`` says, per module
        owning trainable parameters (by qualified name), which rule differentiates it.
    backend: where clipped sums live, which noise coordinates this process adds, how the step is
        closed and which parameters are split across ranks (tensor parallelism); default: the one
        ``select_backend`` picks for ``model``.
    noise_ahead: the next step's keyed noise is drawn by a background thread while that step's
        forward and backward run (``NoiseAheadOptions``: threads, the most MiB held), and only added
        at the step, with the same values bit for bit; None draws it at the step. Host (CPU)
        gradients only; gradients on an accelerator are noised at the step by the device generator.
    """

    def __init__(
        self,
        model: nn.Module,
        config: DPConfig,
        *,
        optimizer: torch.optim.Optimizer | OptimizerFactory | None = None,
        noise_key: NoiseKey | str | os.PathLike | None = None,
        rules: RuleRegistry | None = None,
        backend: GradientBackend | None = None,
        noise_ahead: NoiseAheadOptions | None = DEFAULT_NOISE_AHEAD,
    ) -> None:
        if not isinstance(config, DPConfig):
            raise ConfigError(f"config must be a dpscale.DPConfig, got {type(config).__name__}.")
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        self.backend, model = select_backend(model, backend)
        _refuse_second_engine(model)
        self.model = model
        self.config = config
        self.rules = (rules or default_registry()).copy()
        self.parameters: Mapping[str, nn.Parameter] = MappingProxyType(trainable_parameters(model))
        if not self.parameters:
            raise NoTrainableParametersError(
                "The model has no parameter with requires_grad=True: nothing to train privately."
            )
        unknown = sorted(self.backend.sharded_parameters - set(self.parameters))
        if unknown:
            raise ConfigError(f"The backend declares sharded parameters that are not trainable here: {unknown[:5]}.")
        refuse_example_mixing(model)
        owners = find_owners(model, dict(self.parameters), self.rules)
        self.rule_names: Mapping[str, str] = MappingProxyType({owner.qualname: owner.rule.name for owner in owners})
        # Modules whose parameters a rule reads after the backward has ended (whole-call rules run
        # then, and a module differentiated through its parent is read by the parent's call), so a
        # sharding backend must keep them gathered until the clipped sums are formed; None: the
        # whole model (a parent's call may read beyond any one module).
        self.modules_read_after_backward: tuple[nn.Module, ...] | None = (
            None if any(owner.through_parent for owner in owners)
            else tuple(owner.module for owner in owners if owner.rule.whole_call))
        self.noise_key = load_noise_key(noise_key)
        clipping: ClippingPlan = build_plan(config, list(self.parameters))
        self.plan: ExecutionPlan = build_execution_plan(
            config, clipping, key_fingerprint=self.noise_key.fingerprint,
            rank=self.backend.rank, world_size=self.backend.world_size,
        )
        self.adaptive_clipping = _adaptive_clipping(self.plan, self.backend)
        self.accountant = PrivacyAccountant(self.plan.accounting.accountant, self.plan.sampling.kind,
                                            self.plan.sampling.dataset_size)
        # [scheme, first step drawn under it]: one entry unless a resume moved to a new scheme on purpose
        self.noise_schemes: list[list] = [[self.plan.noise.scheme, 0]]
        self.data_loader: DPDataLoader | None = None
        self.last_norms: Tensor | None = None
        self.last_group_norms: Tensor | None = None
        self.last_clip_factors: Tensor | None = None
        self._boundary = StepBoundary(self.plan, self.parameters, self.backend, self.noise_key, self.accountant,
                                      lambda: trainable_parameters(self.model), self.adaptive_clipping,
                                      noise_ahead)
        self._tape = Tape(model, owners, self.rules.default, self.rules.batch_dim_inside,
                          on_output_grad=self._run_rule_now, on_foreign_backward=self._refuse_foreign_backward)
        self._pipeline = BackwardPipeline(self._tape, self.parameters, self.plan, self.backend, self.adaptive_clipping,
                                          on_partial=self._boundary.partial_backward)
        self._handles: list = [
            module.register_forward_pre_hook(refuse_training_batch_norm)
            for module in model.modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
        ]
        self._handles.extend(guard_parameters(self.parameters, self._boundary.foreign))
        self._handles.append(guard_optimizers(self.parameters, self, _may_step))
        context = BackendContext(model, self.parameters, self.noise_key.fingerprint,
                                 self.modules_read_after_backward, self._boundary.close, self._boundary.foreign)
        self._handles.extend(self.backend.bind(context))
        for own in self.backend.own_optimizers:  # DeepSpeed's base optimizer may be the user's DPAdamBC
            self._bind_noise_reader(own)
        if optimizer is not None:
            try:
                self.attach_optimizer(optimizer)
            except BaseException:  # a refused optimizer leaves the model as it was found, free for a new engine
                self.detach()
                raise
        _log_plan(self.plan)

    # what the user sees -------------------------------------------------------------------------

    @property
    def clipping(self) -> ClippingPlan:
        return self.plan.clipping

    @property
    def noise_multiplier(self) -> float:
        """sigma: calibrated for target_epsilon, or the one given."""
        return self.plan.noise.noise_multiplier

    @property
    def noise_std(self) -> float:
        """Std of the noise added to each coordinate of the averaged gradient: sigma R / B."""
        return self.plan.noise.std

    @property
    def step_noise_std(self) -> float | None:
        """Std of the noise in each coordinate of the gradient the optimizer is applying now (the step
        last closed): sigma R / B, or with adaptive clipping sigma_delta R_t / B. None before the
        first step. ``DPAdamBC`` reads it."""
        return self._boundary.step_noise_std

    @property
    def clip_thresholds(self) -> tuple[float, ...]:
        """The thresholds R_k the next backward clips with: the plan's, or adaptive clipping's now."""
        adaptive = self.adaptive_clipping
        return self.plan.clipping.thresholds if adaptive is None else adaptive.thresholds

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
        return self._boundary.budget_exhausted

    @property
    def steps_taken(self) -> int:
        return self._boundary.steps_taken

    @property
    def step_norms(self) -> Tensor | None:
        """Per-unit norms of the last finished step (all its backwards, this process)."""
        return self._boundary.step_norms

    @property
    def nonfinite_examples(self) -> int:
        """Units (examples or users) zeroed by the non-finite rule so far, this process."""
        return self._boundary.nonfinite_examples

    def clipped_sums(self) -> dict[str, Tensor]:
        """This process's clipped sums (divided by B) since the last step, by parameter name, in the
        parameters' logical shapes, before any noise or reduction (zeros where no backward of the
        step used a parameter): for checks and monitoring. They are not gradients, and no optimizer
        sees them; the engine's own buffers are returned where they exist, so treat them as
        read-only."""
        held = self.backend.local_sums()
        return {name: held[name] if name in held else
                torch.zeros(self.backend.logical_shape(name), dtype=p.dtype, device=p.device)
                for name, p in self.parameters.items()}

    # the one seam -----------------------------------------------------------------------------

    def backward(self, losses: Tensor, *, users: Sequence[int] | Tensor | None = None) -> None:
        """Back-propagate one loss per example and add sum_i clip(g_i) / B to the step's clipped
        sums (the backend's buffers; ``p.grad`` stays None until the optimizer's step).

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
        boundary = self._boundary
        boundary.check_before_backward()
        boundary.draw_noise_ahead()
        result = self._pipeline.run(losses, users, boundary.users_this_step)
        self.last_norms, self.last_group_norms, self.last_clip_factors = (
            result.norms, result.group_norms, result.factors
        )
        boundary.record_backward(result.norms, result.users, result.nonfinite, result.unclipped)

    @contextlib.contextmanager
    def paused(self):
        """Forward passes in this block are not recorded, and gradients computed in it may pass
        through recorded outputs: for evaluation, or analysis with ``torch.autograd.grad`` (which
        writes no ``p.grad``). A backward that would accumulate a gradient into a trainable
        parameter is still refused."""
        with self._tape.paused():
            yield

    def detach(self) -> None:
        """Remove every hook: the model and optimizer are left as they were found."""
        self._tape.detach()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._boundary.optimizer = None
        self._boundary.noise_ahead.close()
        if self.data_loader is not None:
            self.data_loader.on_draw = None

    # the step boundary ------------------------------------------------------------------------

    def attach_optimizer(self, optimizer: torch.optim.Optimizer | OptimizerFactory) -> torch.optim.Optimizer:
        """Bind the step: the noised gradients exist in ``p.grad`` only inside ``optimizer.step()``,
        through removable step pre- and post-hooks (the optimizer itself is not modified). It must
        update every parameter this engine clips and nothing else of consequence: the model's frozen
        parameters may be in it (``AdamW(model.parameters())`` after LoRA) and are ignored, a parameter
        from elsewhere or a trainable one left out is refused. ``optimizer`` may also be a factory,
        ``lambda params: AdamW(params, lr=...)``, called with the trainable parameters. One optimizer
        per engine. Returns the optimizer."""
        if callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer):
            optimizer = optimizer(list(self.parameters.values()))
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise ConfigError(f"The optimizer factory returned a {type(optimizer).__name__}, not a "
                                  "torch.optim.Optimizer: give e.g. lambda params: torch.optim.AdamW(params, lr=1e-3).")
        frozen = [p for p in self.model.parameters() if not p.requires_grad]
        self._handles.extend(self._boundary.attach(optimizer, frozen))
        self._bind_noise_reader(optimizer)
        return optimizer

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The attached optimizer (built here when a factory was given), for a learning-rate
        scheduler; None before one is attached and where the training engine steps its own."""
        return self._boundary.optimizer

    def _bind_noise_reader(self, optimizer) -> None:
        """An optimizer that corrects for the noise (``DPAdamBC``) reads its std from this engine, so that
        it is always the std of the noise actually added."""
        if isinstance(optimizer, DPAdamBC):
            optimizer.bind_noise_std(lambda: self._boundary.step_noise_std)

    def step(self) -> None:
        """Close the logical step through the backend: the attached optimizer's step (its pre-hook
        checks and records the step and writes the noised gradients) and ``zero_grad``, or the
        DeepSpeedEngine's step. The same as ``optimizer.step(); optimizer.zero_grad()``."""
        self._boundary.check_bound()
        self.backend.step(self._boundary.optimizer)

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
        delta = self.plan.accounting.delta if delta is None else delta
        if self.noise_multiplier == 0 and self.steps_taken:
            return math.inf
        return self.accountant.epsilon(delta)

    def privacy_report(self, directory: str | os.PathLike | None = None, points: int = 50) -> dict:
        """What was spent and how, as a dict; with ``directory``, also privacy_report.json and
        epsilon.png (epsilon against steps) written there."""
        return build_report(self, directory, points)

    # data -------------------------------------------------------------------------------------

    def make_data_loader(
        self, dataset, *, max_physical_batch_size: int, collate_fn=None, user_ids=None
    ) -> DPDataLoader:
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
        user_ids = check_privacy_units(sampling, dataset, user_ids, micro_batch=max_physical_batch_size)
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
        if loader.on_draw is not None and loader.on_draw != self._boundary.on_draw:
            raise ConfigError("This loader is bound to another privacy engine.")
        if self.data_loader is not None and self.data_loader is not loader:
            self.data_loader.on_draw = None  # its batches no longer count for this engine
        loader.on_draw = self._boundary.on_draw
        self.data_loader = loader

    # state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Step counter, accountant history, the data loader's position, the mechanism and the key's
        fingerprint; never the key, nor the sampling seed derived from it (``dpscale.resume``)."""
        return privacy_state(self)

    def load_state_dict(self, state: dict, *, fresh_key: bool = False, new_noise_scheme: bool = False) -> None:
        """Resume: the step counter continues, so no (key, step) pair is ever used twice. What is
        checked, and what ``fresh_key`` and ``new_noise_scheme`` allow: ``dpscale.resume``."""
        load_privacy_state(self, state, fresh_key=fresh_key, new_noise_scheme=new_noise_scheme)

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

    # the tape's callbacks -----------------------------------------------------------------------

    def _run_rule_now(self, call, output_grad: Tensor, saved: tuple) -> None:
        self._pipeline.run_rule_now(call, output_grad, saved)

    def _refuse_foreign_backward(self, qualname: str) -> None:
        raise foreign_backward_error(f"the output of module '{qualname}'" if qualname else "the model's output")


def _may_step(engine: PrivacyEngine, optimizer: torch.optim.Optimizer) -> bool:
    """The optimizers allowed to step the engine's parameters: the attached one, a wrapper whose
    step is the attached one's (Accelerate's ``AcceleratedOptimizer`` holds it as ``.optimizer``),
    and the training engine's own (DeepSpeed's base optimizer)."""
    attached = engine._boundary.optimizer
    if attached is not None and (optimizer is attached or getattr(optimizer, "optimizer", None) is attached):
        return True
    return any(optimizer is own for own in engine.backend.own_optimizers)


def _adaptive_clipping(plan: ExecutionPlan, backend: GradientBackend) -> AdaptiveClipping | None:
    if plan.adaptive is None:
        return None
    if backend.world_size > 1:
        raise ConfigError(
            f"Adaptive clipping (DPConfig.clip_quantile) runs in one data-parallel process for now: its unclipped "
            f"count would need a sum over the {backend.world_size} ranks, which dpscale does not do yet. Train in one "
            "process, or drop clip_quantile (fixed clipping) for multi-process runs."
        )
    return AdaptiveClipping(plan.adaptive, plan.clipping.thresholds, plan.noise.expected_batch_size)


def _refuse_second_engine(model: nn.Module) -> None:
    """Two engines on one model would each take the other's backward for a foreign one, and clip
    and noise twice: refused while the first is attached."""
    for hook in model._forward_pre_hooks.values():
        if isinstance(getattr(hook, "__self__", None), Tape):
            raise ConfigError(
                "This model already has a PrivacyEngine attached (its hooks are on the model). Call "
                "old_engine.detach() before building another engine on it."
            )


def _log_plan(plan: ExecutionPlan) -> None:
    """Once, when the engine is built: what the run will spend and how."""
    acc, sampling = plan.accounting, plan.sampling
    if plan.accounts:
        logger.info(
            "dpscale: sigma %.5g, noise std %.3g, q %.4g (B %g of N %d %ss, %s sampling), delta %.3g, "
            "%s steps planned%s.",
            plan.noise.noise_multiplier, plan.noise.std, sampling.sample_rate, plan.noise.expected_batch_size,
            sampling.dataset_size, sampling.privacy_unit, sampling.kind, acc.delta, acc.planned_steps,
            "" if acc.target_epsilon is None else
            f", target epsilon {acc.target_epsilon:g} (budget {acc.budget_steps} steps)",
        )
    else:
        logger.info("dpscale: sigma %.5g, noise std %.3g; no dataset_size, so no accounting.",
                    plan.noise.noise_multiplier, plan.noise.std)
