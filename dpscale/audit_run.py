"""Audit your own run: canaries planted in the user's training job, black-box (Steinke, Nasr and
Jagielski, "Privacy auditing with one (1) training run", NeurIPS 2023).

Why: ``dpscale audit`` (``dpscale/audit.py``) checks the mechanism on a built-in model. A mistake in
the user's own pipeline (a gradient that escapes clipping, a loss that mixes examples, a sampler
that is not the engine's) only shows in the user's own run. ``CanaryAudit`` plants m canaries in
that run, trains them through the same engine as every other example, and scores the final model.

The design, and why each piece is as it is:

* **A fixed dataset, a keyed coin per canary.** ``wrap(dataset)`` appends all m canaries to the
  user's N examples: the training set always has N + m rows, whatever the coins. Each canary j
  carries a weight ``coin_j`` in {0, 1} and ``weigh(losses_fn)`` multiplies its per-example loss by
  it, so an excluded canary (coin 0) has a gradient of exactly zero: the clipped sum of every step is
  that of the dataset without it. N, the sample rate q = B / (N + m), the expected batch B and the
  realised batch sizes are then functions of public numbers only, never of the coins; a coin changes
  one summand of the noised sum, which is exactly the add/remove neighbour the accountant's epsilon
  covers (Poisson sampling at the fixed q, noise sigma R). The accountant's epsilon therefore
  covers every real example and every canary, and the bound below tests exactly it.
* **The coins are keyed and recorded.** They come from the run's secret key
  (``NoiseKey.derive_seed``, under their own purpose name, so computationally independent of the
  noise and the sampling), never from anything released: the model, the report or a public seed.
  ``coins`` holds them for the record (the job writes them to ``audit.json``, never into the model
  folder or the privacy report).
* **Black-box score.** After training, each canary's score is its loss before training minus its
  loss after (the per-example loss the run trains on, under ``torch.no_grad``): a canary the model
  memorised scores high. Subtracting the loss the initial model had on the same canary removes
  most of the canary-to-canary spread that has nothing to do with training.
* **Guesses fixed before the run.** "member" on the ``k+`` highest scores, "non-member" on the
  ``k-`` lowest, abstain on the rest; r = k+ + k- guesses, v correct. The default is k+ = m // 10
  and k- = 0: in a black-box audit a member the sampler never drew looks exactly like a non-member,
  so the low end of the scores is a mix and "non-member" guesses there cost more than they show.
* **The bound** is ``dpscale.audit.epsilon_lower_bound`` (the paper's Theorem, with delta): the
  largest eps that v correct of r guesses refute at the confidence.

Use from your own loop (the engine's loader and ``run_steps``, or your own)::

    audit = CanaryAudit(canary_items, key=noise_key, collate=collate)
    train_set = audit.wrap(train_set)          # N + m items, each with its weight
    losses_fn = audit.weigh(my_losses)         # my_losses(batch) -> [B] per-example losses
    audit.start(my_losses, model=model)        # the canaries' losses before training
    ... train on train_set with losses_fn through the PrivacyEngine ...
    result = audit.finish(my_losses, epsilon=engine.epsilon(), delta=engine.delta, model=model)
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from dpscale.errors import ConfigError

__all__ = ["CanaryAudit", "CanaryAuditResult", "CanaryDataset", "WEIGHT_KEY", "check_audit_options",
           "default_guesses"]

logger = logging.getLogger(__name__)

WEIGHT_KEY = "canary_weight"  # the key a dict item carries its weight under (tuple items: the last element)
_COINS_PURPOSE = "canary-audit coins v1"


def default_guesses(canaries: int) -> tuple[int, int]:
    """(k+, k-) = (m // 10, 0), at least one guess."""
    return max(1, canaries // 10), 0


def check_audit_options(canaries, guesses, confidence) -> tuple[int, int]:
    """The audit's knobs, refused before anything loads; returns (k+, k-)."""
    if isinstance(canaries, bool) or not isinstance(canaries, int) or canaries < 1:
        raise ConfigError(f"the number of canaries must be a positive integer, got {canaries!r} "
                          "(--audit-canaries, audit_canaries:).")
    if guesses is None:
        k_plus, k_minus = default_guesses(canaries)
    elif isinstance(guesses, int) and not isinstance(guesses, bool):
        k_plus, k_minus = guesses, 0
    else:
        k_plus, k_minus = (int(g) for g in guesses)
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus == 0 or k_plus + k_minus > canaries:
        raise ConfigError(
            f"guesses (k+={k_plus}, k-={k_minus}) must be >= 0, not both 0, and add up to at most the {canaries} "
            f"canaries (--audit-guesses, audit_guesses:); e.g. {default_guesses(canaries)[0]}."
        )
    if not (isinstance(confidence, (int, float)) and 0 < confidence < 1):
        raise ConfigError(f"the audit's confidence must lie in (0, 1), got {confidence!r} (--audit-confidence).")
    return k_plus, k_minus


@dataclass(frozen=True)
class CanaryAuditResult:
    """One audited run.

    epsilon_lower_bound: with probability >= confidence (over the coins and the run) the run is not
        (eps, delta)-DP for any eps below it; delta is the accountant's.
    epsilon_lower_bound_pure: the same statement for delta = 0 (never below the one above).
    epsilon_ceiling: the bound if every one of the r guesses were right: the most this audit could
        show, whatever the run (a claim above it cannot be refuted by this many guesses).
    refutes_accountant: epsilon_lower_bound > accountant_epsilon: the run leaks more than its
        accountant says (a correct run does so with probability at most 1 - confidence).
    score: what was ranked; mean_score_*: its mean over included and excluded canaries.
    """

    canaries: int
    canaries_included: int
    guesses_member: int
    guesses_non_member: int
    guesses: int
    correct: int
    confidence: float
    delta: float
    accountant_epsilon: float
    epsilon_lower_bound: float
    epsilon_lower_bound_pure: float
    epsilon_ceiling: float
    score: str
    mean_score_included: float
    mean_score_excluded: float

    @property
    def refutes_accountant(self) -> bool:
        return self.epsilon_lower_bound > self.accountant_epsilon

    def as_dict(self) -> dict:
        return {**asdict(self), "refutes_accountant": self.refutes_accountant}

    def describe(self) -> str:
        verdict = "REFUTES the accountant" if self.refutes_accountant else "consistent with the accountant"
        return (f"canary audit: epsilon >= {self.epsilon_lower_bound:.4f} at {self.confidence:.0%} confidence "
                f"(delta {self.delta:.3g}; pure {self.epsilon_lower_bound_pure:.4f}; at most "
                f"{self.epsilon_ceiling:.4f} with these guesses) vs accountant epsilon "
                f"{self.accountant_epsilon:.4f}: {verdict}. {self.correct} of {self.guesses} guesses right "
                f"({self.guesses_member} member, {self.guesses_non_member} non-member) about {self.canaries} "
                f"canaries ({self.canaries_included} included)")


class CanaryDataset:
    """The user's N examples followed by the m canaries (map-style: any sampler, the engine's Poisson
    loader included, draws from it). Every item carries its weight: 1 for the user's examples,
    the coin for a canary. Dict items get ``WEIGHT_KEY`` (a 0-dim float tensor, which the job's
    ``pad_batch`` and torch's default collate stack); tuple and list items get it as a last element."""

    def __init__(self, dataset, canaries: Sequence, coins: np.ndarray) -> None:
        self.dataset = dataset
        self.canaries = canaries
        self.coins = coins
        self.examples = len(dataset)

    def __len__(self) -> int:
        return self.examples + len(self.canaries)

    def __getitem__(self, index: int):
        import torch

        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        if index < self.examples:
            item, weight = self.dataset[index], 1.0
        else:
            j = index - self.examples
            item, weight = self.canaries[j], float(self.coins[j])
        return _with_weight(item, torch.tensor(weight, dtype=torch.float32))


def _with_weight(item, weight):
    if isinstance(item, Mapping):
        if WEIGHT_KEY in item:
            raise ConfigError(f"a training item already has the key {WEIGHT_KEY!r} that CanaryAudit adds.")
        return {**item, WEIGHT_KEY: weight}
    if isinstance(item, (tuple, list)):
        return (*item, weight)
    raise ConfigError(f"CanaryAudit wraps datasets of dict, tuple or list items, not {type(item).__name__}.")


class CanaryAudit:
    """m canaries planted in the user's own run (see the module docstring).

    canaries: m training items in the form the user's dataset yields (the same keys or arity), each
        easy to memorise and unlike the real data: random token sequences for a language model,
        random inputs with random labels for a classifier.
    key: the secret the coins derive from (a NoiseKey or a key file: the run's noise key is the
        natural choice); never anything released.
    guesses: k+ (member guesses on the highest scores) or (k+, k-); default (m // 10, 0).
    collate: how a list of canary items becomes a batch for scoring (default torch's).
    """

    def __init__(self, canaries: Sequence, *, key, guesses: int | tuple[int, int] | None = None,
                 confidence: float = 0.95, collate: Callable | None = None, batch_size: int = 32) -> None:
        from dpscale.noise import load_noise_key

        if key is None:
            raise ConfigError("CanaryAudit needs the secret key its coins derive from (key=noise key or key file); "
                              "coins from a public seed would be public, and the audit void.")
        self.canaries = list(canaries)
        m = len(self.canaries)
        self.guesses_member, self.guesses_non_member = check_audit_options(m, guesses, confidence)
        self.confidence = float(confidence)
        self.batch_size = int(batch_size)
        if collate is None:
            from torch.utils.data import default_collate as collate
        self.collate = collate
        seed = load_noise_key(key).derive_seed(_COINS_PURPOSE)
        self.coins = np.random.default_rng(int.from_bytes(seed, "big")).integers(0, 2, size=m).astype(bool)
        self.before: np.ndarray | None = None
        self.after: np.ndarray | None = None

    @property
    def included(self) -> int:
        return int(self.coins.sum())

    # training ---------------------------------------------------------------------------------

    def wrap(self, dataset) -> CanaryDataset:
        """The training set with the canaries: N + m items, each with its weight."""
        return CanaryDataset(dataset, self.canaries, self.coins)

    @staticmethod
    def split(batch):
        """(the batch without the weights, the [B] weights)."""
        if isinstance(batch, Mapping):
            if WEIGHT_KEY not in batch:
                raise ConfigError(
                    f"The batch has no {WEIGHT_KEY!r}: train on CanaryAudit.wrap(dataset) and keep the key in the "
                    "collate function, or an excluded canary would be trained on.")
            return {k: v for k, v in batch.items() if k != WEIGHT_KEY}, batch[WEIGHT_KEY]
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            return type(batch)(batch[:-1]) if isinstance(batch, tuple) else list(batch[:-1]), batch[-1]
        raise ConfigError(f"Cannot find the canary weights in a batch of type {type(batch).__name__}.")

    def weigh(self, losses_fn: Callable) -> Callable:
        """``losses_fn(batch) -> [B]`` per-example losses, as the wrapped dataset's batches need it:
        the weights taken off the batch, each loss multiplied by its weight (an excluded canary's is
        0, so its gradient is exactly 0)."""

        def weighted(batch):
            inputs, weights = self.split(batch)
            losses = losses_fn(inputs)
            if tuple(weights.shape) != tuple(losses.shape):
                raise ConfigError(f"{tuple(weights.shape)} canary weights for losses of shape {tuple(losses.shape)}: "
                                  "losses_fn must return one loss per example.")
            return losses * weights.to(device=losses.device, dtype=losses.dtype)

        return weighted

    # scoring ----------------------------------------------------------------------------------

    def canary_losses(self, losses_fn: Callable, model=None) -> np.ndarray:
        """[m] float64: each canary's loss under ``losses_fn`` (the unweighted one), without
        gradients, ``model`` (if given) in eval mode for the call and restored after."""
        import torch

        out = []
        with _eval_mode(model), torch.no_grad():
            for start in range(0, len(self.canaries), self.batch_size):
                batch = self.collate(self.canaries[start:start + self.batch_size])
                out.append(losses_fn(batch).detach().double().cpu().numpy().reshape(-1))
        losses = np.concatenate(out) if out else np.zeros(0)
        if losses.shape != (len(self.canaries),):
            raise ConfigError(f"losses_fn gave {losses.size} losses for {len(self.canaries)} canaries.")
        return losses

    def start(self, losses_fn: Callable, model=None) -> np.ndarray:
        """Record the canaries' losses before training (the score's reference)."""
        self.before = self.canary_losses(losses_fn, model)
        return self.before

    def finish(self, losses_fn: Callable, *, epsilon: float, delta: float, model=None) -> CanaryAuditResult:
        """Score the final model, guess, and bound epsilon from below."""
        if self.before is None:
            raise ConfigError("CanaryAudit.finish before start: record the canaries' losses before training "
                              "(audit.start(losses_fn, model=model)).")
        self.after = self.canary_losses(losses_fn, model)
        return self.result(self.before - self.after, epsilon=epsilon, delta=delta,
                           score="loss before training - loss after")

    def result(self, scores: np.ndarray, *, epsilon: float, delta: float, score: str = "") -> CanaryAuditResult:
        """The guesses on ``scores`` (higher: more likely a member) and the bound they give."""
        from dpscale.audit import epsilon_lower_bound

        scores = np.asarray(scores, dtype=np.float64)
        m = len(self.canaries)
        if scores.shape != (m,) or not np.isfinite(scores).all():
            raise ConfigError(f"need {m} finite scores, got shape {scores.shape} "
                              f"({int((~np.isfinite(scores)).sum())} not finite).")
        k_plus, k_minus = self.guesses_member, self.guesses_non_member
        order = np.lexsort((np.arange(m), -scores))  # highest first; ties by canary index
        member, non_member = order[:k_plus], order[m - k_minus:] if k_minus else order[:0]
        correct = int(self.coins[member].sum() + (~self.coins[non_member]).sum())
        r = k_plus + k_minus
        bound = {d: epsilon_lower_bound(m, r, correct, delta=d, confidence=self.confidence) for d in (delta, 0.0)}
        included = self.coins
        result = CanaryAuditResult(
            canaries=m, canaries_included=self.included, guesses_member=k_plus, guesses_non_member=k_minus,
            guesses=r, correct=correct, confidence=self.confidence, delta=float(delta),
            accountant_epsilon=float(epsilon), epsilon_lower_bound=bound[delta], epsilon_lower_bound_pure=bound[0.0],
            epsilon_ceiling=epsilon_lower_bound(m, r, r, delta=delta, confidence=self.confidence), score=score,
            mean_score_included=_mean(scores[included]), mean_score_excluded=_mean(scores[~included]),
        )
        logger.info("dpscale: %s", result.describe())
        return result


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else math.nan


@contextlib.contextmanager
def _eval_mode(model):
    if model is None:
        yield
        return
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
