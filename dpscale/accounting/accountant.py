"""The privacy state of one run: its history of steps, its epsilon, and the state a checkpoint
keeps of it."""

from __future__ import annotations

import math
import numbers

from dpscale.accounting.epsilon import Segment, epsilon_of
from dpscale.accounting.inputs import (
    check_delta,
    check_kinds,
    check_noise_multiplier,
    check_sample_rate,
    check_steps,
)
from dpscale.errors import ConfigError

__all__ = ["STATE_VERSION", "PrivacyAccountant"]

STATE_VERSION = 1


class PrivacyAccountant:
    """The privacy history of one training run, and its epsilon.

    The history is a list of (noise_multiplier, sample_rate, count) segments, consecutive steps
    with identical parameters merged: a run at fixed settings is one segment whatever its
    length, which keeps checkpoints small and lets dp_accounting compose `count` steps at once.

    A step counts when it is taken, whatever its batch held: under Poisson sampling a step whose
    batch came out empty still released a noised update, and the accountant sees only
    (sigma, q), never the batch.
    """

    def __init__(
        self,
        accountant: str = "pld",
        sampling: str = "poisson",
        dataset_size: int | None = None,
    ) -> None:
        check_kinds(accountant, sampling, dataset_size)
        self.accountant = accountant
        self.sampling = sampling
        self.dataset_size = dataset_size
        self._segments: list[list] = []

    def __repr__(self) -> str:
        return (
            f"PrivacyAccountant(accountant={self.accountant!r}, sampling={self.sampling!r}, "
            f"dataset_size={self.dataset_size!r}, steps={self.steps})"
        )

    def step(self, noise_multiplier: float, sample_rate: float, count: int = 1) -> None:
        """Record `count` steps at (noise_multiplier, sample_rate)."""
        check_noise_multiplier(noise_multiplier)
        check_sample_rate(sample_rate, self.sampling, self.dataset_size)
        check_steps(count, "count")
        if count == 0:
            return
        sigma, q = float(noise_multiplier), float(sample_rate)
        if self._segments and self._segments[-1][0] == sigma and self._segments[-1][1] == q:
            self._segments[-1][2] += int(count)
        else:
            self._segments.append([sigma, q, int(count)])

    @property
    def steps(self) -> int:
        """Steps recorded so far."""
        return sum(count for _, _, count in self._segments)

    @property
    def segments(self) -> list[Segment]:
        """A copy of the history: (noise_multiplier, sample_rate, count), merged."""
        return [(sigma, q, count) for sigma, q, count in self._segments]

    def epsilon(self, delta: float) -> float:
        """Epsilon at `delta` of all steps recorded so far."""
        check_delta(delta, self.dataset_size)
        return epsilon_of(
            self.segments, float(delta), self.accountant, self.sampling, self.dataset_size
        )

    def epsilon_at(self, steps: int, delta: float) -> float:
        """Epsilon at `delta` of the first `steps` steps recorded (a step's own epsilon, read later)."""
        check_delta(delta, self.dataset_size)
        check_steps(steps, "steps")
        if steps > self.steps:
            raise ConfigError(f"epsilon_at(steps={steps}): only {self.steps} steps are recorded.")
        return self._epsilon_after(steps, float(delta))

    def epsilon_curve(self, delta: float, points: int = 50) -> list[tuple[int, float]]:
        """(step, epsilon) at up to `points` step counts spread evenly up to the last step.

        Each point composes the history from scratch, so the last one equals `epsilon(delta)`;
        it costs one epsilon evaluation per point.
        """
        check_delta(delta, self.dataset_size)
        if not isinstance(points, numbers.Integral) or isinstance(points, bool) or points < 1:
            raise ConfigError(f"points={points!r} must be a whole number >= 1.")
        total = self.steps
        if total == 0:
            return []
        count = min(points, total)
        marks = sorted({math.ceil(total * (i + 1) / count) for i in range(count)})
        # the last mark is the whole history: checked once there, its prefixes hold no more
        last = self._epsilon_after(marks[-1], float(delta), gate=True)
        return [(mark, self._epsilon_after(mark, float(delta))) for mark in marks[:-1]] + [(marks[-1], last)]

    def _epsilon_after(self, steps: int, delta: float, gate: bool = False) -> float:
        prefix: list[Segment] = []
        remaining = steps
        for sigma, q, count in self._segments:
            if remaining <= 0:
                break
            prefix.append((sigma, q, min(count, remaining)))
            remaining -= count
        return epsilon_of(prefix, delta, self.accountant, self.sampling, self.dataset_size, gate=gate)

    def state_dict(self) -> dict:
        """The history as plain Python values (JSON, and torch.load(weights_only=True))."""
        return {
            "version": STATE_VERSION,
            "accountant": self.accountant,
            "sampling": self.sampling,
            "dataset_size": self.dataset_size,
            "segments": [list(segment) for segment in self._segments],
        }

    def load_state_dict(self, state: dict) -> None:
        """Replace the history with `state`'s; the kinds must match this accountant's, since
        resuming under another accountant or sampling would change what epsilon means."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ConfigError(
                "This is not a PrivacyAccountant state of version "
                f"{STATE_VERSION}; pass what PrivacyAccountant.state_dict() returned."
            )
        recorded = (state.get("accountant"), state.get("sampling"), state.get("dataset_size"))
        ours = (self.accountant, self.sampling, self.dataset_size)
        if recorded != ours:
            raise ConfigError(
                f"The state was recorded with (accountant, sampling, dataset_size)={recorded}, "
                f"this accountant uses {ours}; build it with the recorded settings, or use "
                "PrivacyAccountant.from_state_dict(state)."
            )
        segments = []
        for segment in state.get("segments", ()):
            if not isinstance(segment, (list, tuple)) or len(segment) != 3:
                raise ConfigError(
                    f"Segment {segment!r} is not [noise_multiplier, sample_rate, count]; the "
                    "state is corrupt."
                )
            sigma, q, count = segment
            check_noise_multiplier(sigma)
            check_sample_rate(q, self.sampling, self.dataset_size)
            check_steps(count, "count")
            segments.append([float(sigma), float(q), int(count)])
        self._segments = segments

    @classmethod
    def from_state_dict(cls, state: dict) -> PrivacyAccountant:
        """A new accountant with the settings and history recorded in `state`."""
        if not isinstance(state, dict):
            raise ConfigError("Pass the dict that PrivacyAccountant.state_dict() returned.")
        new = cls(
            accountant=state.get("accountant", "pld"),
            sampling=state.get("sampling", "poisson"),
            dataset_size=state.get("dataset_size"),
        )
        new.load_state_dict(state)
        return new
