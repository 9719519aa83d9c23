"""PrivacyPlan: one frozen record binding what the guarantee depends on (sampling rate, noise
multiplier, sensitivity, expected batch size, accountant, delta), resolved once when the engine is
built. The noise std is derived from the clipping plan's sensitivity here, nowhere else."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

from dpscale.accounting import calibrate_noise_multiplier, compute_epsilon, default_delta
from dpscale.clipping import ClippingPlan
from dpscale.config import DPConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrivacyPlan:
    noise_multiplier: float
    sensitivity: float
    expected_batch_size: float
    sample_rate: float | None
    dataset_size: int | None
    delta: float | None
    accountant: str
    sampling: str
    planned_steps: int | None
    target_epsilon: float | None

    @property
    def noise_std(self) -> float:
        """Std of the noise added to the averaged gradient: sigma * R / B."""
        return self.noise_multiplier * self.sensitivity / self.expected_batch_size

    def planned_epsilon(self) -> float | None:
        """Epsilon the planned run will spend, when the plan knows its length."""
        if self.planned_steps is None or self.sample_rate is None or self.delta is None:
            return None
        return compute_epsilon(
            self.noise_multiplier, self.sample_rate, self.planned_steps, self.delta,
            accountant=self.accountant, sampling=self.sampling, dataset_size=self.dataset_size,
        )

    def as_dict(self) -> dict:
        return asdict(self)


def resolve_plan(config: DPConfig, clipping: ClippingPlan) -> PrivacyPlan:
    """Calibrate sigma for a target epsilon, or take the given sigma; check it all adds up."""
    q = config.sample_rate
    delta = config.target_delta
    if delta is None and config.dataset_size is not None:
        delta = default_delta(config.dataset_size)
    steps = config.steps
    if steps is None and config.epochs is not None and q is not None:
        steps = max(1, math.ceil(config.epochs / q - 1e-9))
    if config.target_epsilon is not None:
        sigma = calibrate_noise_multiplier(
            config.target_epsilon, delta, q, steps,
            accountant=config.accountant, sampling=config.sampling, dataset_size=config.dataset_size,
        )
        logger.info("Calibrated noise multiplier %.5g for epsilon %g at delta %.3g over %d steps (q=%.4g).",
                    sigma, config.target_epsilon, delta, steps, q)
    else:
        sigma = float(config.noise_multiplier)
        if sigma == 0:
            logger.warning("noise_multiplier is 0: the model is clipped but NOT private (epsilon is infinite).")
    return PrivacyPlan(
        noise_multiplier=sigma,
        sensitivity=clipping.sensitivity,
        expected_batch_size=float(config.expected_batch_size),
        sample_rate=q,
        dataset_size=config.dataset_size,
        delta=delta,
        accountant=config.accountant,
        sampling=config.sampling,
        planned_steps=steps,
        target_epsilon=config.target_epsilon,
    )
