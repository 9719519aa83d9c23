"""Adaptive clipping: each group's threshold follows a target quantile of the per-unit gradient
norms, estimated privately at every step (Andrew, Thakkar, McMahan and Ramaswamy, "Differentially
private learning with adaptive clipping", NeurIPS 2021; the estimator as in their reference
implementation, TF Privacy's ``QuantileEstimatorQuery`` with geometric updates).

At step t, for each clipping group k (one group under flat clipping), with B the expected batch
size and the step's units i (examples, or users at user level):

    c_k   = sum_i (1[||g_i||_k <= R_k,t] - 1/2)         centred count: sensitivity 1/2
    b_k   = clamp((c_k + sigma_b z_k) / B + 1/2, 0, 1)  z_k ~ N(0, 1), keyed (below)
    R_k,t+1 = R_k,t * exp(-eta_C (b_k - gamma))          gamma: the target quantile

and the step's gradient noise is N(0, (sigma_delta * R_t / B)^2) per coordinate of the averaged
gradient, R_t = sqrt(sum_k R_k,t^2) being the step's sensitivity.

Why the accounting is unchanged. One step releases the noised clipped sum (sensitivity R_t, noise
sigma_delta R_t) and K centred counts (sensitivity 1/2 each, so sqrt(K)/2 together, noise sigma_b
each) on the same Poisson sample. Scaled to unit noise, the whole release is one Gaussian
mechanism whose L2 sensitivity is sqrt(sigma_delta^-2 + K (2 sigma_b)^-2); with

    sigma_delta = (sigma^-2 - K (2 sigma_b)^-2)^(-1/2)

that is exactly a Gaussian mechanism of noise multiplier sigma (the paper's Theorem 1, with K
counts). R_t is a function of earlier releases only, so the steps compose adaptively as the
accountant assumes: it records (sigma, q) per step, as for fixed clipping, and sigma is the one
calibrated for the target epsilon. The centring matters: an uncentred count has sensitivity 1 and
would need sigma_b in place of 2 sigma_b above. B, never the realised batch size, divides the
count (the realised size is not private).

The count noise comes from the run's keyed generator (``dpscale.noise``) under a name no parameter
can have (full parameter names never start with a dot), element k for group k, at the step's
index: it is independent of every gradient coordinate's noise and the same on every resume.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from dpscale.errors import CheckpointError, ConfigError
from dpscale.noise import NoiseKey, gaussian

__all__ = [
    "COUNT_NOISE_NAME",
    "AdaptiveClipping",
    "AdaptiveClippingPlan",
    "build_adaptive_plan",
    "gradient_noise_multiplier",
    "next_threshold",
    "noisy_unclipped_fraction",
]

COUNT_NOISE_NAME = ".dpscale.adaptive_clipping.unclipped_count"


@dataclass(frozen=True)
class AdaptiveClippingPlan:
    """target_quantile (gamma), learning_rate (eta_C), count_noise_std (sigma_b), and
    gradient_noise_multiplier (sigma_delta, the multiplier of the gradient noise actually added;
    the accountant's is the plan's noise_multiplier sigma)."""

    target_quantile: float
    learning_rate: float
    count_noise_std: float
    gradient_noise_multiplier: float

    def as_dict(self) -> dict:
        return asdict(self)


def gradient_noise_multiplier(sigma: float, count_std: float, groups: int) -> float:
    """sigma_delta = (sigma^-2 - K (2 sigma_b)^-2)^(-1/2): the gradient's share of a step that
    must stay a Gaussian mechanism of multiplier sigma. Refused where the counts alone would spend
    more than sigma allows."""
    if sigma == 0:
        return 0.0  # not private anyway (epsilon is infinite); the counts keep their noise
    rest = sigma ** -2 - groups * (2.0 * count_std) ** -2
    if not rest > 0:
        least = math.sqrt(groups) * sigma / 2.0
        raise ConfigError(
            f"Adaptive clipping's {groups} noisy count(s) with clip_count_std={count_std:g} would alone spend more "
            f"than the noise multiplier sigma={sigma:.5g} allows (the step must stay a Gaussian mechanism of "
            f"multiplier sigma): clip_count_std must exceed sqrt(K) * sigma / 2 = {least:.4g}. Raise "
            f"clip_count_std (--clip-count-std) well above that (e.g. {4 * least:.4g})"
            + (", or use flat clipping (one count)." if groups > 1 else ".")
        )
    return rest ** -0.5


def build_adaptive_plan(config, groups: int, sigma: float) -> AdaptiveClippingPlan | None:
    if config.clip_quantile is None:
        return None
    return AdaptiveClippingPlan(float(config.clip_quantile), float(config.clip_quantile_lr),
                                float(config.clip_count_std),
                                gradient_noise_multiplier(sigma, float(config.clip_count_std), groups))


def noisy_unclipped_fraction(centred_count: float, noise: float, expected_batch_size: float) -> float:
    """b = clamp((c + noise) / B + 1/2, 0, 1): the private estimate of the fraction unclipped."""
    return min(1.0, max(0.0, (centred_count + noise) / expected_batch_size + 0.5))


def next_threshold(threshold: float, fraction: float, target_quantile: float, learning_rate: float) -> float:
    """The geometric update R exp(-eta_C (b - gamma)): R shrinks while more than the target
    fraction is unclipped, grows while fewer is."""
    return threshold * math.exp(-learning_rate * (fraction - target_quantile))


class AdaptiveClipping:
    """The thresholds now, the centred counts of the step in progress, and R over the steps taken;
    owned by one engine (the step boundary closes it, the backward pipeline reads the thresholds,
    the privacy state saves it)."""

    def __init__(self, plan: AdaptiveClippingPlan, initial: tuple[float, ...], expected_batch_size: float) -> None:
        self.plan = plan
        self.expected_batch_size = float(expected_batch_size)
        self.thresholds: tuple[float, ...] = tuple(float(r) for r in initial)
        self.history: list[float] = []  # R_t = sqrt(sum_k R_k,t^2) that step t clipped with
        self.last_fractions: tuple[float, ...] | None = None  # the noisy b_k of the last step
        self.reset_step()

    @property
    def sensitivity(self) -> float:
        return math.sqrt(sum(r * r for r in self.thresholds))

    def reset_step(self) -> None:
        self._counts: Tensor | None = None

    def unclipped_counts(self, group_norms: Tensor, bad: Tensor) -> Tensor:
        """[K] centred counts of one backward: 1/2 for each unit a group leaves unclipped, -1/2 for
        each it clips. ``bad``: [K, units] (or [units], every group alike), True where the non-finite
        rule zeroed the unit in that group, which counts as clipped there."""
        thresholds = torch.tensor(self.thresholds, dtype=group_norms.dtype, device=group_norms.device)[:, None]
        unclipped = (group_norms <= thresholds) & ~bad.to(group_norms.device)
        return (unclipped.to(torch.float64) - 0.5).sum(1)

    def record(self, centred: Tensor) -> None:
        centred = centred.detach().to(device="cpu", dtype=torch.float64)
        self._counts = centred if self._counts is None else self._counts + centred

    def close(self, key: NoiseKey, step: int) -> float:
        """End step ``step``: return the sensitivity R_t it was clipped with, then move every
        threshold by its noisy fraction."""
        used = self.sensitivity
        groups = len(self.thresholds)
        counts = self._counts if self._counts is not None else torch.zeros(groups, dtype=torch.float64)
        noise = gaussian(key, step, COUNT_NOISE_NAME, groups, dtype=torch.float64) * self.plan.count_noise_std
        plan = self.plan
        fractions = tuple(noisy_unclipped_fraction(float(c), float(z), self.expected_batch_size)
                          for c, z in zip(counts.tolist(), noise.tolist()))
        self.thresholds = tuple(next_threshold(r, b, plan.target_quantile, plan.learning_rate)
                                for r, b in zip(self.thresholds, fractions))
        self.last_fractions = fractions
        self.history.append(used)
        self.reset_step()
        return used

    def state_dict(self) -> dict:
        return {"plan": self.plan.as_dict(), "thresholds": list(self.thresholds), "history": list(self.history),
                "last_fractions": None if self.last_fractions is None else list(self.last_fractions)}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("plan") != self.plan.as_dict():
            raise CheckpointError(
                "The checkpoint's adaptive clipping state is missing or of other settings (clip_quantile, "
                "clip_quantile_lr, clip_count_std): resume with the DPConfig the run began with."
            )
        thresholds = state.get("thresholds")
        if not (isinstance(thresholds, list) and len(thresholds) == len(self.thresholds)
                and all(isinstance(r, float) and math.isfinite(r) and r > 0 for r in thresholds)):
            raise CheckpointError("The checkpoint's adaptive clipping thresholds are damaged; start over.")
        self.thresholds = tuple(thresholds)
        self.history = [float(r) for r in state.get("history", [])]
        fractions = state.get("last_fractions")
        self.last_fractions = None if fractions is None else tuple(float(b) for b in fractions)
        self.reset_step()
