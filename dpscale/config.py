"""DPConfig: every knob that changes the privacy guarantee, validated when it is built.

Knobs that cannot change the guarantee (micro-batch size, which norm method a layer uses) do not
live here; they are the engine's business.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from dpscale.errors import ConfigError

CLIP_FUNCTIONS = ("abadi", "automatic")
CLIPPING_MODES = ("flat", "per_layer")
PRIVACY_UNITS = ("example", "user")


@dataclass(frozen=True)
class DPConfig:
    """The DP-SGD step: g = (sum_i clip(g_i) + N(0, sigma^2 R^2 I)) / B.

    max_grad_norm: R, the bound on each example's clipped gradient (its sensitivity).
    expected_batch_size: B = q * N, the expected logical batch size; the clipped sum is divided
        by B (never by the realised Poisson batch size, which would leak it). With
        privacy_unit="user", the expected number of users per step.
    noise_multiplier: sigma; the noise std is sigma * R / expected_batch_size. Exactly one of
        noise_multiplier and target_epsilon.
    target_epsilon, target_delta: sigma is calibrated so that the planned run (steps, or epochs
        of dataset_size examples at rate q = B / N) spends at most this epsilon at this delta
        (default delta N^-1.1, always below 1/N).
    dataset_size: N; needed for accounting (q = B / N). With privacy_unit="user", the number of
        users (and expected_batch_size the expected number of users per step).
    accountant: "pld" (privacy loss distributions, tight) or "rdp" (Renyi DP, looser, faster).
    sampling: "poisson" (what DP-SGD's analysis assumes; use dpscale's data loader) or
        "shuffle" (fixed-size batches without replacement, accounted as such with RDP).
    clipping: "flat" (one norm over all trainable parameters), "per_layer" (one group per
        parameter tensor), or a list of groups, each a list of parameter names or fnmatch
        patterns; every trainable parameter must fall in exactly one group.
    group_max_grad_norms: thresholds R_k of the groups; their squares must add to R^2. Default:
        R / sqrt(K) each.
    clip_fn: "abadi" (min(1, R_k / ||g_i||_k)) or "automatic" (R_k / (||g_i||_k + gamma), AUTO-S).
    automatic_gamma: gamma of automatic clipping (> 0).
    sampling_declared_by_user: False (default): every accounted step must run on a logical batch
        drawn by a dpscale loader bound to the engine (``engine.make_data_loader``), so the
        accountant's sampling assumption holds by construction. True: the user declares that the
        batches they feed are drawn as ``sampling`` says (Poisson at q = B / N, or shuffled);
        dpscale cannot check it, and the privacy report says that the claim is the user's.
    allow_budget_overrun: with target_epsilon, False (default) refuses the step that would take
        epsilon past the target (``PrivacyBudgetExhausted``); True lets the run continue and
        report the larger epsilon.
    privacy_unit: what one neighbouring dataset removes. "example" (default): one example (one
        sequence). "user": one person with all their examples; the loader then draws users (Poisson
        at q = expected_batch_size / dataset_size, both counted in users), the gradient clipped is
        the sum of one user's examples' gradients, and epsilon is a statement about users. A
        person with many examples is protected only at user level: example-level epsilon says
        nothing about them as a whole.
    examples_per_user: with privacy_unit="user", k: at most k examples of each sampled user per
        step (a user with more contributes the next k of theirs, round-robin; with fewer, all they
        have). Default 1 (one example per sampled user, per-example clipping is then per-user).
        It must not exceed the micro-batch size: a user is never split across micro-batches.
    clip_quantile: adaptive clipping (Andrew et al., NeurIPS 2021): None (default) keeps the
        thresholds fixed; a value in (0, 1) makes each group's threshold R_k follow that quantile
        of the per-unit norms, estimated privately each step from a noisy count of the units left
        unclipped (``dpscale.adaptive_clipping``). max_grad_norm (or group_max_grad_norms) is then
        the starting point. Abadi clipping and Poisson sampling only.
    clip_quantile_lr: eta_C of the geometric update R <- R exp(-eta_C (b - clip_quantile)).
    clip_count_std: sigma_b, the std of the noise on each group's unclipped count (sensitivity
        1/2); default expected_batch_size / 20 (the paper's choice). The gradient noise multiplier
        is raised to (sigma^-2 - K (2 sigma_b)^-2)^-1/2 so that the whole step (gradient and K
        counts) is still a Gaussian mechanism of multiplier sigma, which the accountant composes.
    """

    max_grad_norm: float
    expected_batch_size: float
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    target_delta: float | None = None
    dataset_size: int | None = None
    steps: int | None = None
    epochs: float | None = None
    accountant: str = "pld"
    sampling: str = "poisson"
    clipping: str | Sequence[Sequence[str]] = "flat"
    group_max_grad_norms: Sequence[float] | None = None
    clip_fn: str = "abadi"
    automatic_gamma: float = 0.01
    sampling_declared_by_user: bool = False
    allow_budget_overrun: bool = False
    privacy_unit: str = "example"
    examples_per_user: int | None = None
    clip_quantile: float | None = None
    clip_quantile_lr: float = 0.2
    clip_count_std: float | None = None

    @property
    def sample_rate(self) -> float | None:
        """q = B / N, when the dataset size is known (both in users with privacy_unit="user")."""
        if self.dataset_size is None:
            return None
        return self.expected_batch_size / self.dataset_size

    def __post_init__(self) -> None:
        self._check_scales()
        self._check_unit_knobs()
        self._check_privacy_knobs()
        self._check_clipping_knobs()
        self._check_adaptive_knobs()

    def _check_scales(self) -> None:
        """First, since the other checks compare with these numbers."""
        if not _positive(self.max_grad_norm):
            raise ConfigError(f"max_grad_norm must be a positive finite number, got {self.max_grad_norm!r}.")
        if not _positive(self.expected_batch_size):
            raise ConfigError(
                f"expected_batch_size must be positive (sample_rate * dataset_size), got {self.expected_batch_size!r}."
            )

    def _check_unit_knobs(self) -> None:
        if self.privacy_unit not in PRIVACY_UNITS:
            raise ConfigError(f"privacy_unit must be one of {PRIVACY_UNITS}, got {self.privacy_unit!r}.")
        k = self.examples_per_user
        if self.privacy_unit == "example":
            if k is not None:
                raise ConfigError(
                    f"examples_per_user={k!r} is for privacy_unit='user' (examples of one person clipped as one "
                    "unit); with privacy_unit='example' each example is its own unit. Set privacy_unit='user' "
                    "or drop examples_per_user."
                )
            return
        if k is None:
            object.__setattr__(self, "examples_per_user", 1)
        elif isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"examples_per_user must be a positive integer, got {k!r}.")
        if self.sampling != "poisson":
            raise ConfigError(
                f"privacy_unit='user' draws users by Poisson sampling; sampling={self.sampling!r} is not "
                "supported at user level. Use sampling='poisson'."
            )

    def _check_privacy_knobs(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ConfigError(
                "Give exactly one of noise_multiplier (the epsilon it costs is reported) or "
                "target_epsilon (sigma is calibrated to reach it)."
            )
        if self.dataset_size is not None:
            if isinstance(self.dataset_size, bool) or not isinstance(self.dataset_size, int) or self.dataset_size < 1:
                raise ConfigError(f"dataset_size must be a positive integer, got {self.dataset_size!r}.")
            if self.expected_batch_size > self.dataset_size:
                raise ConfigError(
                    f"expected_batch_size {self.expected_batch_size} exceeds dataset_size {self.dataset_size}: "
                    "the sampling rate q = B / N must be at most 1."
                )
        if self.target_epsilon is not None:
            if not _positive(self.target_epsilon):
                raise ConfigError(f"target_epsilon must be a positive finite number, got {self.target_epsilon!r}.")
            if self.dataset_size is None:
                raise ConfigError(
                    "target_epsilon needs dataset_size, to know the sampling rate "
                    "q = expected_batch_size / dataset_size."
                )
            if (self.steps is None) == (self.epochs is None):
                raise ConfigError(
                    "target_epsilon needs exactly one of steps or epochs, the length of the run to calibrate for."
                )
        if self.steps is not None and self.epochs is not None:
            raise ConfigError(
                f"steps={self.steps!r} and epochs={self.epochs!r} both give the length of the run; give one of them."
            )
        if self.steps is not None and (
            isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1
        ):
            raise ConfigError(f"steps must be a positive integer, got {self.steps!r}.")
        if self.epochs is not None and not _positive(self.epochs):
            raise ConfigError(f"epochs must be positive, got {self.epochs!r}.")
        if self.target_delta is not None and not (_positive(self.target_delta) and self.target_delta < 1):
            raise ConfigError(f"target_delta must lie in (0, 1), got {self.target_delta!r}.")
        if (
            self.target_delta is not None and self.dataset_size is not None
            and self.target_delta >= 1 / self.dataset_size
        ):
            raise ConfigError(
                f"target_delta {self.target_delta:g} is not below 1/N = {1 / self.dataset_size:g}: such a delta "
                "allows publishing an example outright. Use a smaller delta (default: N^-1.1)."
            )
        if self.accountant not in ("pld", "rdp"):
            raise ConfigError(f"accountant must be 'pld' or 'rdp', got {self.accountant!r}.")
        if self.sampling not in ("poisson", "shuffle"):
            raise ConfigError(f"sampling must be 'poisson' or 'shuffle', got {self.sampling!r}.")
        for flag in ("sampling_declared_by_user", "allow_budget_overrun"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag} must be True or False, got {getattr(self, flag)!r}.")

    def _check_clipping_knobs(self) -> None:
        if self.noise_multiplier is not None and not (
            isinstance(self.noise_multiplier, (int, float)) and not isinstance(self.noise_multiplier, bool)
            and math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0
        ):
            raise ConfigError(f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier!r}.")
        if self.clip_fn not in CLIP_FUNCTIONS:
            raise ConfigError(f"clip_fn must be one of {CLIP_FUNCTIONS}, got {self.clip_fn!r}.")
        if self.clip_fn == "automatic" and not _positive(self.automatic_gamma):
            raise ConfigError(
                f"automatic_gamma must be > 0 (gamma = 0 divides by a zero norm), got {self.automatic_gamma!r}."
            )
        if isinstance(self.clipping, str):
            if self.clipping not in CLIPPING_MODES:
                raise ConfigError(
                    f"clipping must be one of {CLIPPING_MODES} or a list of parameter groups, got {self.clipping!r}."
                )
        else:
            groups = _groups(self.clipping)
            if not groups or any(not group or not all(isinstance(p, str) for p in group) for group in groups):
                raise ConfigError(
                    f"clipping must be one of {CLIPPING_MODES} or a non-empty list of parameter groups, each a "
                    f"non-empty list of parameter names or patterns (e.g. [['encoder.*'], ['head.*']]); "
                    f"got {self.clipping!r}."
                )
            object.__setattr__(self, "clipping", tuple(tuple(group) for group in groups))
        if self.group_max_grad_norms is not None:
            norms = tuple(self.group_max_grad_norms) if _iterable(self.group_max_grad_norms) else ()
            if not norms or not all(_positive(r) for r in norms):
                raise ConfigError(
                    f"group_max_grad_norms must be a list of positive numbers, got {self.group_max_grad_norms!r}."
                )
            norms = tuple(float(r) for r in norms)
            total = math.sqrt(sum(r * r for r in norms))
            if not math.isclose(total, self.max_grad_norm, rel_tol=1e-6):
                raise ConfigError(
                    f"The group thresholds' squares must add up to max_grad_norm^2 (so that each example's "
                    f"clipped gradient has norm <= max_grad_norm); sqrt(sum R_k^2) = {total:.6g}, "
                    f"max_grad_norm = {self.max_grad_norm}."
                )
            object.__setattr__(self, "group_max_grad_norms", norms)


    def _check_adaptive_knobs(self) -> None:
        """Adaptive clipping's knobs go together, and only with what its analysis covers."""
        if self.clip_quantile is None:
            for name in ("clip_count_std",):
                if getattr(self, name) is not None:
                    raise ConfigError(
                        f"{name}={getattr(self, name)!r} is a knob of adaptive clipping, which is off: give "
                        "clip_quantile (e.g. 0.5) to turn it on, or drop it."
                    )
            if self.clip_quantile_lr != 0.2:
                raise ConfigError(
                    f"clip_quantile_lr={self.clip_quantile_lr!r} is a knob of adaptive clipping, which is off: give "
                    "clip_quantile (e.g. 0.5) to turn it on, or drop it."
                )
            return
        if not (_positive(self.clip_quantile) and self.clip_quantile < 1):
            raise ConfigError(f"clip_quantile must lie in (0, 1), got {self.clip_quantile!r}.")
        if not _positive(self.clip_quantile_lr):
            raise ConfigError(f"clip_quantile_lr must be a positive number, got {self.clip_quantile_lr!r}.")
        if self.clip_count_std is None:
            object.__setattr__(self, "clip_count_std", float(self.expected_batch_size) / 20.0)
        elif not _positive(self.clip_count_std):
            raise ConfigError(f"clip_count_std must be a positive number, got {self.clip_count_std!r}.")
        if self.clip_fn != "abadi":
            raise ConfigError(
                f"Adaptive clipping (clip_quantile) follows a quantile of the norms that Abadi clipping leaves "
                f"unclipped; clip_fn={self.clip_fn!r} scales every example and has no unclipped ones. Use "
                "clip_fn='abadi' (--clip-fn abadi), or drop clip_quantile to keep automatic clipping."
            )
        if self.sampling != "poisson":
            raise ConfigError(
                f"Adaptive clipping's noisy count is accounted for Poisson sampling (add-or-remove-one neighbours, "
                f"sensitivity 1/2); sampling={self.sampling!r} is not covered. Use sampling='poisson', or drop "
                "clip_quantile."
            )


def _iterable(value) -> bool:
    return not isinstance(value, (str, bytes)) and hasattr(value, "__iter__")


def _groups(clipping) -> list[list]:
    """The clipping groups as lists; [] for anything that is not a list of lists of names (a bare
    string is one name, not a group of characters)."""
    if not _iterable(clipping) or not all(_iterable(group) for group in clipping):
        return []
    return [list(group) for group in clipping]


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
