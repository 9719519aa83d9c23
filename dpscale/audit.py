"""An empirical lower bound on epsilon from one training run (Steinke, Nasr and Jagielski, 2023,
"Privacy auditing with one (1) training run", NeurIPS 2023), to set beside the accountant's epsilon.

Why: the accountant's epsilon is a proof about the mechanism dpscale claims to run. The audit checks
the run that actually happened. It plants m canaries, each a member of the training set or not with
probability 1/2 (a fair coin per canary, independent of the noise key), trains once through the
real engine (its Poisson loader draws canaries and ordinary examples alike, its clipping bounds
them, its keyed generator noises the step), then guesses from the final model which canaries were
members. Too many right guesses refute the claimed epsilon: an (eps, delta)-DP run cannot guess
better than randomised response at eps, except with small probability. A correct run must give a
bound below the accountant's epsilon (at the chosen confidence); a run whose noise or clipping is
broken gives a bound above it.

The canaries are Dirac canaries in gradient space, the paper's setting where the bound is tightest:
the model keeps a linear block ``canary`` of m weights that only canaries touch; canary j is the
one-hot input e_j with loss ``C * canary(e_j)``, so its whole gradient is C e_j (C = canary_norm *
max_grad_norm; a correct engine clips it down to max_grad_norm). Ordinary examples train a small
MLP on synthetic regression data and leave the canary block alone. With plain SGD the final canary
weights are the initial ones minus lr times the sum of the noised updates, so the score of canary j,
``(w_0 - w_T)[j] * B / (lr R)``, is the number of steps that sampled it plus the sum of the noise in
coordinate j, in units of the clipping norm.

The bound (the paper's Corollary 5.4 and Appendix D; see ``audit_p_value``) counts v correct among
r guesses (k+ "member" guesses on the highest scores, k- "non-member" guesses on the lowest, fixed
before the run; the other canaries abstain).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from dpscale.accounting import compute_epsilon
from dpscale.config import DPConfig
from dpscale.driver import run_steps
from dpscale.errors import ConfigError
from dpscale.noise import NoiseKey

__all__ = ["AuditResult", "audit_one_run", "audit_p_value", "binomial_tail", "epsilon_lower_bound"]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# The statistics: a tail bound for DP guessers, inverted for epsilon.


def _log_binomial_pmf(r: int, log_p: float, log_1mp: float, k: np.ndarray) -> np.ndarray:
    log_choose = math.lgamma(r + 1) - np.vectorize(math.lgamma)(k + 1) - np.vectorize(math.lgamma)(r - k + 1)
    return log_choose + k * log_p + (r - k) * log_1mp


def _log_accuracy(epsilon: float) -> tuple[float, float]:
    """log p and log(1 - p) for p = e^eps / (1 + e^eps), exact in log space for any eps >= 0."""
    softplus = math.log1p(math.exp(-epsilon))
    return -softplus, -epsilon - softplus


def binomial_tail(trials: int, successes: int, epsilon: float) -> float:
    """P[Binomial(trials, e^eps / (1 + e^eps)) >= successes]: the chance that an eps-DP guesser
    (randomised response at eps, the best one) gets at least ``successes`` of ``trials`` right."""
    r, v = int(trials), int(successes)
    if v <= 0:
        return 1.0
    if v > r:
        return 0.0
    log_p, log_1mp = _log_accuracy(epsilon)
    logs = _log_binomial_pmf(r, log_p, log_1mp, np.arange(v, r + 1, dtype=np.float64))
    top = logs.max()
    return float(min(1.0, math.exp(top) * np.exp(logs - top).sum()))


def audit_p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float = 0.0) -> float:
    """The largest chance that an (eps, delta)-DP run lets ``guesses`` guesses about ``canaries``
    canaries (each a member with probability 1/2) get at least ``correct`` right:

        P[W >= v] <= P[Bin(r, p) >= v] + 2 m delta max_{1 <= i <= v} P[v - i <= Bin(r, p) < v] / i,

    with p = e^eps / (1 + e^eps), m canaries, r guesses, v correct (Steinke, Nasr, Jagielski 2023,
    Corollary 5.4; the computation of their Appendix D). With delta = 0 it is the pure-eps bound:
    the correct count is stochastically dominated by Bin(r, p)."""
    m, r, v = int(canaries), int(guesses), int(correct)
    if not 0 <= v <= r <= m:
        raise ConfigError(f"need 0 <= correct <= guesses <= canaries, got correct={v}, guesses={r}, canaries={m}.")
    if not (epsilon >= 0 and math.isfinite(epsilon)):
        raise ConfigError(f"epsilon must be finite and >= 0, got {epsilon!r}.")
    if not 0 <= delta <= 1:
        raise ConfigError(f"delta must lie in [0, 1], got {delta!r}.")
    beta = binomial_tail(r, v, epsilon)
    if delta == 0 or v == 0:
        return beta
    log_p, log_1mp = _log_accuracy(epsilon)
    below = np.exp(_log_binomial_pmf(r, log_p, log_1mp, np.arange(v - 1, -1, -1, dtype=np.float64)))
    alpha = float((np.cumsum(below) / np.arange(1, v + 1)).max())  # i = 1..v: P[v-i <= W < v] / i
    return min(1.0, beta + 2 * m * delta * alpha)


def epsilon_lower_bound(canaries: int, guesses: int, correct: int, *, delta: float = 0.0,
                        confidence: float = 0.95) -> float:
    """The largest eps that ``correct`` right guesses out of ``guesses`` refute at ``confidence``:
    sup {eps : audit_p_value(eps) < 1 - confidence} (0 when even eps = 0 is not refuted). With
    probability at least ``confidence`` over the canaries' coins and the run, the run is not
    (eps', delta)-DP for any eps' below the value returned, whenever the value is above 0.

    The p-value grows with eps (a larger eps allows a better guesser), so bisection finds the edge."""
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must lie in (0, 1), got {confidence!r}.")
    level = 1 - confidence

    def refuted(epsilon: float) -> bool:
        return audit_p_value(canaries, guesses, correct, epsilon, delta) < level

    if not refuted(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while refuted(high):
        low, high = high, 2 * high
        if high > 1e4:  # cannot happen for finite counts; guards a numerical surprise
            return low
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if refuted(middle) else (low, middle)
    return low


# --------------------------------------------------------------------------------------------
# The run: canaries through the real engine.


class _AuditModel(nn.Module):
    """A small MLP for the ordinary examples and a bias-free linear block of one weight per canary,
    which only canaries reach (ordinary rows carry zeros there)."""

    def __init__(self, features: int, hidden: int, canaries: int) -> None:
        super().__init__()
        self.features = features
        self.body = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.canary = nn.Linear(canaries, 1, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.body(x[:, :self.features]).squeeze(-1), self.canary(x[:, self.features:]).squeeze(-1)


@dataclass(frozen=True)
class AuditResult:
    """One audited run.

    accountant_epsilon: what the engine's accountant says the run spent (inf without noise).
    claimed_epsilon: what the audit tests; the accountant's epsilon unless a claimed sigma was given.
    epsilon_lower_bound: with probability >= confidence the run is not (eps, delta)-DP for any eps
        below it (delta = the accountant's delta).
    epsilon_lower_bound_pure: the same for delta = 0 (pure eps; never below the one above).
    canaries / canaries_included: m, and how many of them the coins put in the training set.
    guesses / correct: r = k+ + k- guesses made, and how many were right.
    refutes_claim: epsilon_lower_bound > claimed_epsilon: the run leaks more than claimed (a correct
        run does so with probability at most 1 - confidence).
    """

    accountant_epsilon: float
    claimed_epsilon: float
    delta: float
    epsilon_lower_bound: float
    epsilon_lower_bound_pure: float
    confidence: float
    canaries: int
    canaries_included: int
    guesses: int
    correct: int
    guesses_member: int
    guesses_non_member: int
    noise_multiplier: float
    claimed_noise_multiplier: float
    sample_rate: float
    steps: int
    dataset_size: int
    max_grad_norm: float
    canary_norm: float

    @property
    def refutes_claim(self) -> bool:
        return self.epsilon_lower_bound > self.claimed_epsilon

    def as_dict(self) -> dict:
        return {**asdict(self), "refutes_claim": self.refutes_claim}

    def describe(self) -> str:
        verdict = ("REFUTES the claim" if self.refutes_claim
                   else "consistent with the claim")
        return (
            f"audited epsilon >= {self.epsilon_lower_bound:.4f} at {self.confidence:.0%} confidence "
            f"(delta = {self.delta:.3g}; pure-eps bound {self.epsilon_lower_bound_pure:.4f}); "
            f"accountant epsilon = {self.accountant_epsilon:.4f}, claimed epsilon = {self.claimed_epsilon:.4f}: "
            f"{verdict}. {self.correct} of {self.guesses} guesses correct "
            f"({self.guesses_member} member, {self.guesses_non_member} non-member) about {self.canaries} canaries "
            f"({self.canaries_included} included); sigma = {self.noise_multiplier:g}, q = {self.sample_rate:g}, "
            f"{self.steps} steps, N = {self.dataset_size}"
        )


def audit_one_run(
    *,
    noise_multiplier: float,
    steps: int = 100,
    canaries: int = 1000,
    guesses: int | tuple[int, int] = 100,
    examples: int = 5000,
    sample_rate: float = 0.05,
    max_grad_norm: float = 1.0,
    canary_norm: float = 10.0,
    confidence: float = 0.95,
    claimed_noise_multiplier: float | None = None,
    seed: int = 0,
    noise_key: NoiseKey | str | None = None,
    rules=None,
    accountant: str = "pld",
    max_physical_batch_size: int = 256,
    learning_rate: float = 0.1,
) -> AuditResult:
    """Train once through dpscale's engine with ``canaries`` Dirac canaries and bound epsilon from
    below (see the module docstring for the canaries and the score).

    noise_multiplier: sigma of the run (0: no noise; the accountant's epsilon is then infinite).
    steps, sample_rate: T logical steps of Poisson sampling at q over the whole training set (the
        ``examples`` ordinary examples and the included canaries; expected batch q N).
    guesses: k, or (k+, k-): k+ "member" guesses on the highest scores and k- "non-member" guesses
        on the lowest, fixed before the run (choosing them after seeing the scores would void the
        confidence). Default 100: 100 of each.
    canary_norm: the canaries' raw gradient norm in units of max_grad_norm (> 1 so that the engine's
        clipping is exercised: a correct engine clips each canary to max_grad_norm).
    claimed_noise_multiplier: the sigma the run claims, if not the one it ran with (a deliberately
        mis-stated run: the audit tests the claimed epsilon, computed for this sigma).
    seed: the canaries' coins, the synthetic data and the initial model (the auditor's randomness,
        apart from the noise key, which drives the sampling and the noise).
    noise_key: the engine's key (a NoiseKey or a key file); default a fresh one.
    rules: a rule registry for the engine (as PrivacyEngine's ``rules``).
    """
    # torch-heavy: imported here so that `dpscale epsilon` never loads the engine
    from dpscale.engine import PrivacyEngine

    m = _positive_int("canaries", canaries)
    k_plus, k_minus = (guesses, guesses) if isinstance(guesses, int) else tuple(guesses)
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus == 0 or k_plus + k_minus > m:
        raise ConfigError(
            f"guesses (k+={k_plus}, k-={k_minus}) must be >= 0, not both 0, and add up to at most the "
            f"{m} canaries; e.g. guesses={max(1, m // 10)}."
        )
    n = _positive_int("examples", examples)
    _positive_int("steps", steps)
    if not canary_norm >= 1:
        raise ConfigError(
            f"canary_norm is the canaries' gradient norm over max_grad_norm; it must be >= 1, got {canary_norm!r}."
        )
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"sample_rate must lie in (0, 1], got {sample_rate!r}.")

    rng = np.random.default_rng(seed)
    member = rng.random(m) < 0.5  # the coins: canary j is in the training set iff member[j]
    included = np.flatnonzero(member)
    features, hidden = 8, 16
    x_real = rng.standard_normal((n, features))
    y_real = np.tanh(x_real @ rng.standard_normal(features) / math.sqrt(features)) + 0.1 * rng.standard_normal(n)
    x = np.zeros((n + included.size, features + m))
    x[:n, :features] = x_real
    x[n + np.arange(included.size), features + included] = 1.0  # canary j: the one-hot e_j
    y = np.concatenate([y_real, np.zeros(included.size)])
    is_canary = np.concatenate([np.zeros(n), np.ones(included.size)])
    dataset = torch.utils.data.TensorDataset(*(torch.from_numpy(a) for a in (x, y, is_canary)))
    size = len(dataset)

    torch_gen = torch.Generator().manual_seed(seed)
    model = _AuditModel(features, hidden, m).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.empty_like(p).uniform_(-0.3, 0.3, generator=torch_gen))
    start = model.canary.weight.detach().clone().reshape(-1)

    batch = sample_rate * size
    config = DPConfig(max_grad_norm=max_grad_norm, expected_batch_size=batch, noise_multiplier=noise_multiplier,
                      dataset_size=size, accountant=accountant)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)
    engine = PrivacyEngine(model, config, optimizer=optimizer, noise_key=noise_key, rules=rules)
    loader = engine.make_data_loader(dataset, max_physical_batch_size=max_physical_batch_size)
    scale = canary_norm * max_grad_norm

    def losses_fn(micro) -> torch.Tensor:
        inputs, targets, canary = micro
        prediction, canary_out = model(inputs)
        return (1 - canary) * (prediction - targets) ** 2 + canary * scale * canary_out

    outcome = run_steps(engine, loader, losses_fn, max_steps=steps)
    engine.detach()
    if outcome.steps != steps:
        raise ConfigError(f"the audit run stopped after {outcome.steps} of {steps} steps ({outcome.stopped}).")

    # (w_0 - w_T) / lr = sum_t noised clipped sum_t / B; times B / R: sampled steps + noise, in units of R
    scores = ((start - model.canary.weight.detach().reshape(-1)) * batch / (learning_rate * max_grad_norm)).numpy()
    order = np.argsort(-scores, kind="stable")
    guess_member, guess_out = order[:k_plus], order[m - k_minus:] if k_minus else order[:0]
    correct = int(member[guess_member].sum() + (~member[guess_out]).sum())
    r = k_plus + k_minus

    delta = engine.delta
    accountant_epsilon = engine.epsilon()
    claimed_sigma = noise_multiplier if claimed_noise_multiplier is None else claimed_noise_multiplier
    if claimed_noise_multiplier is None:
        claimed_epsilon = accountant_epsilon
    elif claimed_sigma == 0:
        claimed_epsilon = math.inf
    else:
        claimed_epsilon = compute_epsilon(claimed_sigma, sample_rate, steps, delta, accountant=accountant,
                                          dataset_size=size)
    result = AuditResult(
        accountant_epsilon=accountant_epsilon,
        claimed_epsilon=claimed_epsilon,
        delta=delta,
        epsilon_lower_bound=epsilon_lower_bound(m, r, correct, delta=delta, confidence=confidence),
        epsilon_lower_bound_pure=epsilon_lower_bound(m, r, correct, delta=0.0, confidence=confidence),
        confidence=confidence,
        canaries=m,
        canaries_included=int(included.size),
        guesses=r,
        correct=correct,
        guesses_member=k_plus,
        guesses_non_member=k_minus,
        noise_multiplier=noise_multiplier,
        claimed_noise_multiplier=claimed_sigma,
        sample_rate=sample_rate,
        steps=steps,
        dataset_size=size,
        max_grad_norm=max_grad_norm,
        canary_norm=canary_norm,
    )
    logger.info("dpscale audit: %s", result.describe())
    return result


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    return value
