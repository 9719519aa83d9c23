"""The two batch samplers: Poisson (the mechanism the accountant assumes) and shuffled fixed-size
batches, both keyed streams (dpscale.noise.scheme's `sampling_stream`), so that a batch is a
function of (seed, step) alone and any rank can compute any step."""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from dpscale.accounting import steps_for_epochs
from dpscale.errors import ConfigError
from dpscale.noise.scheme import sampling_stream, sampling_stream_key
from dpscale.sampling.checks import int_arg, sample_rate_arg

__all__ = ["PoissonBatchSampler", "Seed", "ShuffleBatchSampler"]

logger = logging.getLogger(__name__)

Seed = int | bytes

_STATE_VERSION = 1
_FRESH_SEED_BYTES = 16  # 128 bits: beyond guessing, small enough to broadcast and checkpoint.
_CHUNK = 1 << 20  # examples per keystream chunk: a draw's scratch memory stays ~8 MiB for any N.
# The fix the refusals below name: a secret seed every rank derives alike, without a collective.
_SHARED_SEED = (
    'seed=NoiseKey.from_file(path).derive_seed("sampling") on every rank, with the run\'s key file '
    "(as PrivacyEngine.make_data_loader does)"
)


def _seed_bytes(seed: Seed | None) -> tuple[bytes, bool]:
    """Seed material as bytes, and whether it is fresh (an int stands for its LE bytes)."""
    if seed is None:
        return os.urandom(_FRESH_SEED_BYTES), True
    if isinstance(seed, bool) or not isinstance(seed, (numbers.Integral, bytes, bytearray)):
        raise ConfigError(
            f"seed must be None, a non-negative int or bytes, got {type(seed).__name__}; for a "
            f"secret seed shared by all ranks pass {_SHARED_SEED}"
        )
    if isinstance(seed, (bytes, bytearray)):
        if not seed:
            raise ConfigError(f"seed is empty bytes; pass seed=None (one process) or {_SHARED_SEED}")
        return bytes(seed), False
    value = int(seed)
    if value < 0:
        raise ConfigError(
            f"seed must be non-negative, got {value}; pass seed=None (one process) or {_SHARED_SEED}"
        )
    return value.to_bytes(max(1, (value.bit_length() + 7) // 8), "little"), False


def _uint64_words(stream: Any, count: int) -> np.ndarray:
    return np.frombuffer(stream.update(bytes(8 * count)), dtype="<u8")


class _StepSampler(Sampler[list[int]]):
    """What both samplers share: global steps, seed, the rank split, iteration and resume state.

    A subclass only says how the global batch of one step is drawn (``_draw``).
    """

    sampling: str

    def __init__(
        self, dataset_size: int, steps: int, seed: Seed | None, rank: int, world_size: int
    ) -> None:
        super().__init__()
        self.dataset_size = int_arg("dataset_size", dataset_size, 1)
        self.steps = int_arg("steps", steps, 1)
        self.world_size = int_arg("world_size", world_size, 1)
        self.rank = int_arg("rank", rank, 0, self.world_size - 1)
        if seed is None and self.world_size > 1:
            raise ConfigError(
                f"world_size={self.world_size} needs the same seed on every rank, or the ranks "
                f"would draw different batches; pass {_SHARED_SEED}"
            )
        material, fresh = _seed_bytes(seed)
        if not fresh:
            logger.info(
                "%s sampler uses a given seed: batches are reproducible and only as secret as "
                "the seed",
                self.sampling,
            )
        self._set_seed(material)
        self._next_step = 0

    def _set_seed(self, seed: bytes) -> None:
        self._seed = seed
        self._key = sampling_stream_key(self.sampling, seed)

    def _draw(self, step: int) -> np.ndarray:
        """Sorted int64 indices of the global logical batch of ``step``."""
        raise NotImplementedError

    @property
    def next_step(self) -> int:
        """The global index of the next logical batch this sampler will yield."""
        return self._next_step

    def global_batch(self, step: int) -> list[int]:
        """All examples of logical batch ``step`` over all ranks (a function of seed and step)."""
        return self._draw(int_arg("step", step, 0)).tolist()

    def _epoch_end(self) -> int:
        return (self._next_step // self.steps + 1) * self.steps

    def _iter_global(self, make: Callable[[int, np.ndarray], Any] | None = None) -> Iterator[Any]:
        """(step, global batch), or what ``make(step, global batch)`` builds of it, up to the end of
        the current epoch-equivalent.

        The position moves past a batch as it is handed out, so a state_dict saved after the
        consumer finished with batch t resumes at t + 1; ``make`` runs before that, so a batch it
        refuses (it raises) leaves the position at it. Steps count on across epochs: a later epoch
        never repeats an earlier one's batches.
        """
        for step in range(self._next_step, self._epoch_end()):
            batch = self._draw(step)
            item = (step, batch) if make is None else make(step, batch)
            self._next_step = step + 1
            yield item

    def __iter__(self) -> Iterator[list[int]]:
        for _, batch in self._iter_global():
            yield batch[self.rank :: self.world_size].tolist()

    def __len__(self) -> int:
        """Batches the next ``iter()`` yields: ``steps``, or the rest of an epoch resumed midway."""
        return self._epoch_end() - self._next_step

    def _mechanism(self) -> dict[str, Any]:
        """The state fields that must match on resume: they define what the accountant assumes."""
        return {"sampling": self.sampling, "dataset_size": self.dataset_size}

    def state_dict(self) -> dict[str, Any]:
        """Position and seed in plain types (ints, a list of byte values, a str, a float).

        It holds the secret seed: store it with the same care as the training data. Rank and world
        size are not part of it: a run may resume on another number of ranks and still draw the same
        global batches.
        """
        return {
            "version": _STATE_VERSION,
            **self._mechanism(),
            "next_step": self._next_step,
            "seed": list(self._seed),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where ``state`` was saved, with the same seed and batches.

        Refuses a state saved for another sampling kind, dataset size or sample rate: resuming it
        would change the mechanism the accountant has been composing.
        """
        if "sampling" in state and state["sampling"] != self.sampling:
            raise ConfigError(
                f"sampler state was saved by {state['sampling']!r} sampling but this sampler is "
                f"{self.sampling!r}; resume with the sampling the run began with"
            )
        missing = {"version", "next_step", "seed", *self._mechanism()} - set(state)
        if missing:
            raise ConfigError(
                f"sampler state lacks {sorted(missing)}; pass what state_dict() returned"
            )
        if state["version"] != _STATE_VERSION:
            raise ConfigError(
                f"sampler state version {state['version']} is not {_STATE_VERSION}; it was saved "
                "by another dpscale version"
            )
        for name, expected in self._mechanism().items():
            if state[name] != expected:
                raise ConfigError(
                    f"sampler state was saved with {name}={state[name]!r} but this sampler has "
                    f"{name}={expected!r}; build the sampler with the saved settings to resume"
                )
        seed = state["seed"]
        if (
            not isinstance(seed, (list, tuple))
            or not seed
            or not all(isinstance(b, int) and 0 <= b < 256 for b in seed)
        ):
            raise ConfigError("sampler state 'seed' must be a non-empty list of byte values")
        next_step = int_arg("next_step", state["next_step"], 0)
        self._set_seed(bytes(seed))
        self._next_step = next_step


class PoissonBatchSampler(_StepSampler):
    """Poisson batches: each of the N examples joins each logical batch independently with rate q.

    This is the sampling the DP-SGD accountant assumes. Batch sizes are Binomial(N, q); empty
    batches happen and are yielded as empty lists (a plain DataLoader's collate_fn must then accept
    ``[]``; DPDataLoader never calls it with one). ``steps`` logical batches make one
    epoch-equivalent (default ceil(1 / q), ``steps_for_epochs(1, q)``); steps keep counting across epochs.

    With ``world_size > 1`` every rank draws the same global batch and keeps the sampled indices at
    positions ``rank::world_size``, so the parts are disjoint, their union is the global batch, and
    every rank yields the same number of batches (some possibly empty locally). That needs the
    same secret seed on every rank: PrivacyEngine.make_data_loader passes the run's
    ``NoiseKey.derive_seed("sampling")``, which every rank derives from the same key file.
    """

    sampling = "poisson"

    def __init__(
        self,
        dataset_size: int,
        sample_rate: float,
        steps: int | None = None,
        seed: Seed | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.sample_rate = sample_rate_arg(sample_rate)
        if steps is None:
            steps = steps_for_epochs(1.0, self.sample_rate)
        super().__init__(dataset_size, steps, seed, rank, world_size)
        self._threshold = (
            None if self.sample_rate >= 1.0 else np.uint64(math.floor(self.sample_rate * 2.0**64))
        )

    @property
    def expected_batch_size(self) -> float:
        """q * N: the global denominator of the DP-SGD update, whatever size was drawn."""
        return self.sample_rate * self.dataset_size

    def _mechanism(self) -> dict[str, Any]:
        return {**super()._mechanism(), "sample_rate": self.sample_rate}

    def _draw(self, step: int) -> np.ndarray:
        if self._threshold is None:
            return np.arange(self.dataset_size, dtype=np.int64)
        stream = sampling_stream(self._key, step)
        hits = []
        for start in range(0, self.dataset_size, _CHUNK):
            words = _uint64_words(stream, min(_CHUNK, self.dataset_size - start))
            found = np.flatnonzero(words < self._threshold)
            if found.size:
                hits.append(found.astype(np.int64) + start)
        return np.concatenate(hits) if hits else np.empty(0, dtype=np.int64)


class ShuffleBatchSampler(_StepSampler):
    """Fixed-size batches from a fresh random permutation each epoch (sampling without replacement).

    For users who accept the matching accountant (it is not Poisson: the engine refuses to account
    it as such). An epoch is ``dataset_size // batch_size`` steps; the last ``dataset_size %
    batch_size`` examples of each permutation are left out so that every batch has exactly
    ``batch_size`` examples. Ranks split each batch at positions ``rank::world_size``.
    """

    sampling = "shuffle"

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        seed: Seed | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        dataset_size = int_arg("dataset_size", dataset_size, 1)
        self.batch_size = int_arg("batch_size", batch_size, 1, dataset_size)
        super().__init__(dataset_size, dataset_size // self.batch_size, seed, rank, world_size)
        self._permutation_epoch = -1
        self._permutation = np.empty(0, dtype=np.int64)

    @property
    def sample_rate(self) -> float:
        return self.batch_size / self.dataset_size

    @property
    def expected_batch_size(self) -> float:
        return float(self.batch_size)

    def _mechanism(self) -> dict[str, Any]:
        return {**super()._mechanism(), "batch_size": self.batch_size}

    def _set_seed(self, seed: bytes) -> None:
        super()._set_seed(seed)
        self._permutation_epoch = -1  # the cached permutation belonged to the old seed

    def _permutation_of(self, epoch: int) -> np.ndarray:
        """A uniform permutation: sort by 128-bit random keys (a tie has probability ~N^2/2^129)."""
        if epoch != self._permutation_epoch:
            words = _uint64_words(sampling_stream(self._key, epoch), 2 * self.dataset_size)
            words = words.reshape(self.dataset_size, 2)
            self._permutation = np.lexsort((words[:, 1], words[:, 0])).astype(np.int64)
            self._permutation_epoch = epoch
        return self._permutation

    def _draw(self, step: int) -> np.ndarray:
        epoch, position = divmod(step, self.steps)
        start = position * self.batch_size
        return np.sort(self._permutation_of(epoch)[start : start + self.batch_size])
