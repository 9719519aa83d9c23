"""The execution plan: one frozen record of what a DP step is, resolved once when the engine is
built and read by everything that needs to know it (the engine, its data loaders, the privacy
report, the checkpoint).

It binds the four parts of the mechanism that only make sense together (jax_privacy's
``DPExecutionPlan`` is the model):

- sampling: how each logical batch is drawn (Poisson or shuffled, at q = B / N) and which part of
  the global draw this process takes (its data-parallel position);
- clipping: the groups and thresholds, hence the sensitivity;
- noise: the scheme, the noise multiplier and the std derived from the sensitivity (nowhere else),
  and the fingerprint of the key it is drawn from;
- adaptive clipping, when on: the target quantile, its learning rate, the count's noise and the
  gradient noise multiplier that keeps each step a Gaussian mechanism of the accounted sigma;
- accounting: the event each step adds to the accountant, delta, the target epsilon and the step
  budget that keeps the run within it.

Knobs that cannot change the guarantee (micro-batch size, which norm method a layer uses) are not
part of it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace

from dpscale.accounting import calibrate_noise_multiplier, compute_epsilon, default_delta, steps_for_epochs
from dpscale.accounting.inputs import check_noise_multiplier
from dpscale.accounting.limits import PLDOutOfRange, check_pld_computable
from dpscale.adaptive_clipping import AdaptiveClippingPlan, build_adaptive_plan
from dpscale.clipping import ClippingPlan
from dpscale.config import DPConfig
from dpscale.errors import ConfigError
from dpscale.noise import SCHEME as NOISE_SCHEME

__all__ = ["AccountingPlan", "ExecutionPlan", "NoisePlan", "SamplingPlan", "build_execution_plan", "planned_steps"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingPlan:
    """How each logical batch is drawn, and this process's part of it.

    declared_by_user: the batches do not come from a dpscale sampler; the user declared (with
        ``DPConfig(sampling_declared_by_user=True)``) that they are drawn as ``kind`` says. dpscale
        cannot check that claim; the privacy report states it.
    privacy_unit: "example" or "user": what is drawn at ``sample_rate`` and what ``dataset_size``
        counts; at user level each drawn user brings at most ``examples_per_user`` examples.
    """

    kind: str
    sample_rate: float | None
    dataset_size: int | None
    steps: int | None
    rank: int
    world_size: int
    declared_by_user: bool
    privacy_unit: str = "example"
    examples_per_user: int | None = None


@dataclass(frozen=True)
class NoisePlan:
    """noise_multiplier: sigma, what the accountant composes. gradient_noise_multiplier: the
    multiplier of the noise added to the gradient when it differs from sigma (adaptive clipping
    spends part of sigma on its counts, ``dpscale.adaptive_clipping``); None: sigma."""

    scheme: str
    noise_multiplier: float
    sensitivity: float
    expected_batch_size: float
    key_fingerprint: str
    gradient_noise_multiplier: float | None = None

    @property
    def std(self) -> float:
        """Std of the noise added to each coordinate of the averaged gradient: sigma * sensitivity / B
        (with adaptive clipping, sigma_delta * the initial R / B: see ``std_at``)."""
        return self.std_at(self.sensitivity)

    def std_at(self, sensitivity: float) -> float:
        """The std for a step clipped with this sensitivity (adaptive clipping moves it per step)."""
        multiplier = self.noise_multiplier if self.gradient_noise_multiplier is None else self.gradient_noise_multiplier
        return multiplier * sensitivity / self.expected_batch_size


@dataclass(frozen=True)
class AccountingPlan:
    """budget_steps: with a target epsilon, the most steps whose epsilon stays within it (at least
    the planned steps, which sigma was calibrated for); None without a target."""

    accountant: str
    delta: float | None
    target_epsilon: float | None
    planned_steps: int | None
    budget_steps: int | None
    allow_budget_overrun: bool


@dataclass(frozen=True)
class ExecutionPlan:
    sampling: SamplingPlan
    clipping: ClippingPlan
    noise: NoisePlan
    accounting: AccountingPlan
    adaptive: AdaptiveClippingPlan | None = None

    @property
    def accounts(self) -> bool:
        """Whether steps are accounted: the dataset size (hence q) is known."""
        return self.sampling.sample_rate is not None

    def step_event(self) -> tuple[float, float]:
        """(noise multiplier, sample rate): what one step adds to the accountant."""
        return self.noise.noise_multiplier, self.sampling.sample_rate

    def planned_epsilon(self) -> float | None:
        """Epsilon the planned run will spend, when the plan knows its length."""
        acc = self.accounting
        if acc.planned_steps is None or not self.accounts or acc.delta is None:
            return None
        return _epsilon_after(self, acc.planned_steps)

    def mechanism(self) -> dict:
        """The fields a resumed run must share with the run it continues: they define what the
        accountant composed (never the key itself; its fingerprint is checked separately)."""
        return {
            "noise_multiplier": self.noise.noise_multiplier,
            "sensitivity": self.noise.sensitivity,
            "expected_batch_size": self.noise.expected_batch_size,
            "sample_rate": self.sampling.sample_rate,
            "sampling": self.sampling.kind,
            "accountant": self.accounting.accountant,
            "privacy_unit": self.sampling.privacy_unit,
            "adaptive_clipping": None if self.adaptive is None else self.adaptive.as_dict(),
        }

    def as_dict(self) -> dict:
        return asdict(self)


def build_execution_plan(config: DPConfig, clipping: ClippingPlan, *, key_fingerprint: str, rank: int = 0,
                         world_size: int = 1) -> ExecutionPlan:
    """Calibrate sigma for a target epsilon (or take the given sigma), derive the noise std from the
    clipping plan's sensitivity and the step budget from the target."""
    q = config.sample_rate
    delta = config.target_delta
    if delta is None and config.dataset_size is not None:
        delta = default_delta(config.dataset_size)
    steps = planned_steps(config)
    if config.target_epsilon is not None:
        sigma = calibrate_noise_multiplier(
            config.target_epsilon, delta, q, steps,
            accountant=config.accountant, sampling=config.sampling, dataset_size=config.dataset_size,
        )
    else:
        sigma = float(config.noise_multiplier)
        if sigma == 0:
            logger.warning("noise_multiplier is 0: the model is clipped but NOT private (epsilon is infinite).")
        _refuse_unaccountable(config, sigma, q, steps, delta)
    adaptive = build_adaptive_plan(config, len(clipping.groups), sigma)
    plan = ExecutionPlan(
        sampling=SamplingPlan(config.sampling, q, config.dataset_size, steps, rank, world_size,
                              config.sampling_declared_by_user, config.privacy_unit, config.examples_per_user),
        clipping=clipping,
        noise=NoisePlan(NOISE_SCHEME, sigma, clipping.sensitivity, float(config.expected_batch_size), key_fingerprint,
                        None if adaptive is None else adaptive.gradient_noise_multiplier),
        accounting=AccountingPlan(config.accountant, delta, config.target_epsilon, steps, None,
                                  config.allow_budget_overrun),
        adaptive=adaptive,
    )
    _refuse_unrepresentable_scales(plan)
    if config.target_epsilon is not None:
        budget = _budget_steps(plan, config.target_epsilon, steps)
        plan = replace(plan, accounting=AccountingPlan(config.accountant, delta, config.target_epsilon, steps, budget,
                                                       config.allow_budget_overrun))
    return plan


def _refuse_unaccountable(config: DPConfig, sigma: float, q, steps, delta) -> None:
    """A given noise multiplier the accountant cannot compute is refused when the engine is built, not
    at the first epsilon: outside the range of both accountants, or (PLD) a planned run whose PLD would
    not fit in bounded memory (dpscale.accounting.limits)."""
    check_noise_multiplier(sigma)
    if config.accountant == "pld" and sigma > 0 and None not in (q, steps, delta) and steps > 0:
        check_pld_computable([(sigma, q, steps)], delta)


def planned_steps(config: DPConfig) -> int | None:
    """The run's length in steps: ``steps``, or ``epochs`` at q = B / N; None when unknown."""
    if config.steps is not None:
        return config.steps
    if config.epochs is not None and config.sample_rate is not None:
        return steps_for_epochs(config.epochs, config.sample_rate)
    return None


def _epsilon_after(plan: ExecutionPlan, steps: int) -> float:
    sampling = plan.sampling
    return compute_epsilon(
        plan.noise.noise_multiplier, sampling.sample_rate, steps, plan.accounting.delta,
        accountant=plan.accounting.accountant, sampling=sampling.kind, dataset_size=sampling.dataset_size,
    )


def _fits(plan: ExecutionPlan, steps: int, target: float) -> bool:
    """Epsilon after ``steps`` is within ``target``; a run past what a PLD holds (an epsilon in the
    hundreds, far above any target calibrated) is not."""
    try:
        return _epsilon_after(plan, steps) <= target
    except PLDOutOfRange:
        return False


def _budget_steps(plan: ExecutionPlan, target: float, planned: int) -> int:
    """The largest step count whose epsilon is at most ``target``. Sigma was calibrated so that
    ``planned`` steps fit; the rounding of sigma may leave room for a few more. One extra epsilon
    evaluation in the common case (planned + 1 already exceeds the target)."""
    fits = planned
    step = 1
    while _fits(plan, fits + step, target):
        fits += step
        step *= 2
    # fits fits and fits + step does not: bisect in between.
    low, high = fits, fits + step
    while high - low > 1:
        middle = (low + high) // 2
        if _fits(plan, middle, target):
            low = middle
        else:
            high = middle
    return low


# float32's normal range (bf16 shares its exponent): a noise std or a clip bound per example (R / B)
# outside it becomes 0 or inf in the parameters' dtype, so the noise would silently vanish or the
# update overflow.
_FLOAT32_TINY, _FLOAT32_MAX = 1.1754943508222875e-38, 3.4028234663852886e38


def _refuse_unrepresentable_scales(plan: ExecutionPlan) -> None:
    noise = plan.noise
    scales = {"the noise std sigma * R / B": noise.std} if noise.noise_multiplier > 0 else {}
    scales["R / B, the largest clipped contribution of one example"] = noise.sensitivity / noise.expected_batch_size
    for what, value in scales.items():
        if not _FLOAT32_TINY <= value <= _FLOAT32_MAX:
            raise ConfigError(
                f"{what} is {value:.3g}, outside float32's range [{_FLOAT32_TINY:.3g}, {_FLOAT32_MAX:.3g}]: in the "
                "parameters' dtype it would become 0 (the noise silently vanishes) or inf. Choose max_grad_norm, "
                "expected_batch_size and the noise multiplier so that these scales are ordinary numbers."
            )
