"""Which examples form each logical batch, how ranks share it, and how it is cut into micro-batches.

The accountant composes the *Poisson*-subsampled Gaussian: every logical batch must include each of
the N examples independently with probability q, and nobody who later sees the model may know which
examples were drawn. A shuffled, fixed-size loader is a different mechanism with a different
accountant, so each sampler states what it did (``sampling``, ``sample_rate``, ``dataset_size``,
``steps``) and the engine can refuse a mismatch instead of reporting a wrong epsilon.

Randomness (part of the privacy mechanism, so stated plainly):

- The inclusion bits and the shuffles come from ChaCha20, a cryptographically secure stream cipher
  (through the ``cryptography`` package), keyed by SHA-256 of the seed and of the sampler kind, with
  the step (Poisson) or the epoch (shuffle) as the nonce. A batch is therefore a function of
  (seed, step) alone: resuming is exact, any rank can compute any step, and without the seed the
  batches are as unpredictable as the cipher is strong.
- ``seed=None`` draws 128 bits from ``os.urandom``: unpredictable, never reproducible. A given seed
  makes the run reproducible and makes the batches exactly as secret as that seed. A seed written
  in a published config (or a small integer) makes the batches public, the amplification by
  subsampling void, and the reported epsilon optimistic. ``state_dict()`` holds the seed: keep
  checkpoints as private as the training data. The seed is never logged.
- An example joins a batch when a 64-bit word of the stream is below floor(q * 2**64), so the real
  rate is within 2**-64 of q and never above it: the accountant's q is an upper bound.
- User level (``user_ids``): the Poisson draw is over users, not examples; each sampled user
  brings at most ``examples_per_user`` (k) of their examples, the next k in round-robin order over
  the user's examples (k = 1 is dp-transformers' PoissonAuthorSampler scheme). Which examples those
  are is a function of the draws so far, hence of the secret seed: resuming replays the draws.
  A user's examples always travel together, in one micro-batch on one rank.
- Not hidden here: the size of each logical batch varies and is visible to anyone who can watch
  step times or micro-batch counts. That is inherent to Poisson sampling.
"""

from __future__ import annotations

import hashlib
import logging
import math
import numbers
import os
from collections import UserDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from torch.utils.data import IterableDataset, Sampler, default_collate

from dpscale.accounting import steps_for_epochs
from dpscale.errors import ConfigError

__all__ = [
    "PADDING_USER",
    "DPDataLoader",
    "LogicalBatch",
    "MicroBatches",
    "PoissonBatchSampler",
    "ShuffleBatchSampler",
    "resolve_user_ids",
    "shared_seed",
    "split_physical",
]

logger = logging.getLogger(__name__)

Seed = int | bytes

_STATE_VERSION = 1
_FRESH_SEED_BYTES = 16  # 128 bits: beyond guessing, small enough to broadcast and checkpoint.
_CHUNK = 1 << 20  # examples per keystream chunk: a draw's scratch memory stays ~8 MiB for any N.
_KEY_DOMAIN = b"dpscale.sampling.v1\x00"
PADDING_USER = -1  # the user id of a padding pass's example (``MicroBatches.padding_units``)


# ----------------------------------------------------------------------------- seeds and streams


def shared_seed(process_group: Any = None) -> int:
    """A fresh 128-bit secret seed, the same on every rank of ``process_group``.

    All ranks must draw the same global Poisson batch (each keeps a disjoint part of it), so they
    need the same seed. When torch.distributed is initialised this is a collective: rank 0 of the
    group draws from ``os.urandom`` and broadcasts, and every rank of the group must call it.
    Otherwise it simply returns a fresh seed. Pass the result as ``seed=`` to the sampler or loader.
    """
    seed = int.from_bytes(os.urandom(_FRESH_SEED_BYTES), "little")
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return seed
    src = 0 if process_group is None else torch.distributed.get_global_rank(process_group, 0)
    box = [seed]
    torch.distributed.broadcast_object_list(box, src=src, group=process_group)
    return int(box[0])


def _seed_bytes(seed: Seed | None) -> tuple[bytes, bool]:
    """Seed material as bytes, and whether it is fresh (an int stands for its LE bytes)."""
    if seed is None:
        return os.urandom(_FRESH_SEED_BYTES), True
    if isinstance(seed, bool) or not isinstance(seed, (numbers.Integral, bytes, bytearray)):
        raise ConfigError(
            f"seed must be None, a non-negative int or bytes, got {type(seed).__name__}; "
            "pass seed=shared_seed() for a secret seed shared by all ranks"
        )
    if isinstance(seed, (bytes, bytearray)):
        if not seed:
            raise ConfigError("seed is empty bytes; pass seed=None or seed=shared_seed()")
        return bytes(seed), False
    value = int(seed)
    if value < 0:
        raise ConfigError(f"seed must be non-negative, got {value}; pass seed=shared_seed()")
    return value.to_bytes(max(1, (value.bit_length() + 7) // 8), "little"), False


def _stream_key(kind: str, seed: bytes) -> bytes:
    """A 256-bit ChaCha20 key; the kind separates the Poisson and shuffle streams of one seed."""
    return hashlib.sha256(_KEY_DOMAIN + kind.encode("ascii") + b"\x00" + seed).digest()


def _keystream(key: bytes, index: int) -> Any:
    """The ChaCha20 stream for one step (or epoch); ``.update(bytes(n))`` gives its next n bytes."""
    if not 0 <= index < 1 << 64:
        raise ConfigError(f"step or epoch {index} is outside [0, 2**64); restart with a new seed")
    nonce = bytes(4) + index.to_bytes(8, "little") + bytes(4)  # 32-bit block counter, then nonce.
    return Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()


def _uint64_words(stream: Any, count: int) -> np.ndarray:
    return np.frombuffer(stream.update(bytes(8 * count)), dtype="<u8")


# ----------------------------------------------------------------------------- argument checks


def _int_arg(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an int, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{name} must be {bound}, got {value}")
    return value


def _sample_rate_arg(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"sample_rate must be a float in (0, 1], got {value!r}")
    rate = float(value)
    if not 0.0 < rate <= 1.0:
        raise ConfigError(
            f"sample_rate must be in (0, 1], got {rate}; it is the expected batch size over the "
            "dataset size"
        )
    if rate < 1.0 and math.floor(rate * 2.0**64) == 0:
        raise ConfigError(f"sample_rate {rate} is below 2**-64 and would never sample anything")
    return rate


# ----------------------------------------------------------------------------- samplers


class _StepSampler(Sampler[list[int]]):
    """What both samplers share: global steps, seed, the rank split, iteration and resume state.

    A subclass only says how the global batch of one step is drawn (``_draw``).
    """

    sampling: str

    def __init__(
        self, dataset_size: int, steps: int, seed: Seed | None, rank: int, world_size: int
    ) -> None:
        super().__init__()
        self.dataset_size = _int_arg("dataset_size", dataset_size, 1)
        self.steps = _int_arg("steps", steps, 1)
        self.world_size = _int_arg("world_size", world_size, 1)
        self.rank = _int_arg("rank", rank, 0, self.world_size - 1)
        if seed is None and self.world_size > 1:
            raise ConfigError(
                f"world_size={self.world_size} needs the same seed on every rank, or the ranks "
                "would draw different batches; pass seed=shared_seed() (a collective) on all ranks"
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
        self._key = _stream_key(self.sampling, seed)

    def _draw(self, step: int) -> np.ndarray:
        """Sorted int64 indices of the global logical batch of ``step``."""
        raise NotImplementedError

    @property
    def next_step(self) -> int:
        """The global index of the next logical batch this sampler will yield."""
        return self._next_step

    def global_batch(self, step: int) -> list[int]:
        """All examples of logical batch ``step`` over all ranks (a function of seed and step)."""
        return self._draw(_int_arg("step", step, 0)).tolist()

    def local_batch(self, step: int) -> list[int]:
        """This rank's part of logical batch ``step``: positions rank, rank + world_size, ..."""
        return self._draw(_int_arg("step", step, 0))[self.rank :: self.world_size].tolist()

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
        next_step = _int_arg("next_step", state["next_step"], 0)
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
    same seed on every rank: the launcher or user passes ``seed=shared_seed()`` on all ranks.
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
        self.sample_rate = _sample_rate_arg(sample_rate)
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
        stream = _keystream(self._key, step)
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
        dataset_size = _int_arg("dataset_size", dataset_size, 1)
        self.batch_size = _int_arg("batch_size", batch_size, 1, dataset_size)
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
            words = _uint64_words(_keystream(self._key, epoch), 2 * self.dataset_size)
            words = words.reshape(self.dataset_size, 2)
            self._permutation = np.lexsort((words[:, 1], words[:, 0])).astype(np.int64)
            self._permutation_epoch = epoch
        return self._permutation

    def _draw(self, step: int) -> np.ndarray:
        epoch, position = divmod(step, self.steps)
        start = position * self.batch_size
        return np.sort(self._permutation_of(epoch)[start : start + self.batch_size])


# ----------------------------------------------------------------------------- physical batches


def _is_array(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray))


def _leading_sizes(batch: Any, found: list[int]) -> None:
    if _is_array(batch):
        if batch.ndim == 0:
            raise ConfigError("a batch holds a 0-d tensor; every tensor needs a leading batch dim")
        found.append(int(batch.shape[0]))
    elif isinstance(batch, Mapping):
        for value in batch.values():
            _leading_sizes(value, found)
    elif isinstance(batch, (tuple, list)):
        for value in batch:
            _leading_sizes(value, found)
    elif batch is not None:
        raise ConfigError(
            f"cannot split a batch holding a {type(batch).__name__}; collate every per-example "
            "field to a tensor (dicts, tuples and lists of tensors are fine)"
        )


def _rebuild(batch: Any, values: list[Any]) -> Any:
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*values)  # a namedtuple
    return type(batch)(values)


def _slice(batch: Any, start: int, stop: int) -> Any:
    if _is_array(batch):
        return batch[start:stop]  # a view: splitting copies nothing
    if isinstance(batch, Mapping):
        sliced = {key: _slice(value, start, stop) for key, value in batch.items()}
        return type(batch)(sliced) if isinstance(batch, (dict, UserDict)) else sliced
    if isinstance(batch, (tuple, list)):
        return _rebuild(batch, [_slice(value, start, stop) for value in batch])
    return batch  # None


def split_physical(batch: Any, max_physical_batch_size: int) -> list[Any]:
    """Cut a collated logical batch into micro-batches of at most ``max_physical_batch_size``.

    ``batch`` is a tensor, a tuple or list of tensors, or a mapping of them (as Hugging Face
    collators return; dicts and BatchEncoding keep their type, other mappings become dicts), nested
    freely; dim 0 is the batch dim and must agree across tensors. Micro-batches are views, in order,
    all full but the last. An empty logical batch gives ``[]``: micro-batch size never changes what
    is computed, only how much memory one forward pass takes.
    """
    size = _int_arg("max_physical_batch_size", max_physical_batch_size, 1)
    found: list[int] = []
    _leading_sizes(batch, found)
    if not found:
        if isinstance(batch, (Mapping, tuple, list)) and len(batch) == 0:
            return []
        raise ConfigError("a batch to split holds no tensor; pass the collated batch")
    if len(set(found)) != 1:
        raise ConfigError(
            f"tensors of one batch disagree on the batch size (dim 0): {sorted(set(found))}; "
            "collate so that dim 0 is the example index everywhere"
        )
    total = found[0]
    return [_slice(batch, start, min(start + size, total)) for start in range(0, total, size)]


# ----------------------------------------------------------------------------- the loader


def _fetch(dataset: Any, indices: list[int]) -> list[Any]:
    """Examples in the way torch's own fetcher gets them (batched ``__getitems__`` when offered)."""
    getitems = getattr(dataset, "__getitems__", None)
    if getitems is not None:
        return list(getitems(indices))
    return [dataset[i] for i in indices]


class MicroBatches(Sequence):
    """The micro-batches of one logical batch, collated only when accessed.

    Holding a logical batch costs its index list, never its tensors, whatever the Poisson draw: each
    access fetches and collates one chunk anew. ``sizes`` gives the example count of each without
    collating anything.
    """

    def __init__(
        self,
        dataset: Any,
        collate_fn: Callable[[list[Any]], Any],
        chunks: list[list[int]],
        units: list[tuple[int, ...]] | None = None,
    ) -> None:
        self._dataset = dataset
        self._collate_fn = collate_fn
        self._chunks = chunks
        if units is not None and [len(u) for u in units] != [len(c) for c in chunks]:
            raise ConfigError("units must name the user of every example of every micro-batch")
        self.units = units

    def units_of(self, i: int) -> tuple[int, ...] | None:
        """The user of each example of micro-batch ``i`` (user level), to pass to
        ``engine.backward(losses, users=...)``; None at example level."""
        return None if self.units is None else self.units[i]

    @property
    def padding_units(self) -> tuple[int, ...]:
        """The users of ``padding_batch()``: one reserved id that never counts as a drawn user."""
        return (PADDING_USER,)

    @property
    def sizes(self) -> list[int]:
        return [len(chunk) for chunk in self._chunks]

    def padding_batch(self) -> Any:
        """A one-example micro-batch (the dataset's first example) for the passes a rank runs only
        so that collectives match (``backend.padding()`` drops their clipped sums)."""
        return self._collate_fn(_fetch(self._dataset, [0]))

    def __len__(self) -> int:
        return len(self._chunks)

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        if not isinstance(i, numbers.Integral):
            raise TypeError(f"micro-batches are indexed by int, got {type(i).__name__}")
        chunk = self._chunks[i]  # IndexError ends iteration as a Sequence expects
        return self._collate_fn(_fetch(self._dataset, chunk))

    def __iter__(self) -> Iterator[Any]:
        for chunk in self._chunks:
            yield self._collate_fn(_fetch(self._dataset, chunk))


def resolve_user_ids(dataset: Any, user_ids: Any) -> list[Any]:
    """The user of every example: a sequence of len(dataset) hashable ids, or the name of a
    dataset column holding them (a Hugging Face ``datasets.Dataset``)."""
    if isinstance(user_ids, str):
        columns = getattr(dataset, "column_names", None)
        if columns is None or user_ids not in columns:
            raise ConfigError(
                f"user_ids={user_ids!r} names a column, but the dataset ({type(dataset).__name__}) has "
                f"{'no named columns' if columns is None else f'columns {list(columns)}'}; pass the column "
                "that holds each example's user, or a list with one user id per example"
            )
        user_ids = dataset[user_ids]
    if isinstance(user_ids, (torch.Tensor, np.ndarray)):
        user_ids = user_ids.tolist()
    try:
        ids = list(user_ids)
    except TypeError:
        raise ConfigError(
            f"user_ids must be a sequence with one user id per example or a column name, got "
            f"{type(user_ids).__name__}"
        ) from None
    if len(ids) != len(dataset):
        raise ConfigError(
            f"user_ids has {len(ids)} entries for a dataset of {len(dataset)} examples; give exactly one "
            "user id per example, in dataset order"
        )
    return ids


class _UserIndex:
    """Each user's examples and the round-robin cursor of each user.

    Users are numbered 0 .. N-1 in order of first appearance in ``user_ids``; the Poisson draw is
    over these numbers. Each time a user is drawn they bring min(k, n_u) examples: the next ones
    after the cursor, cyclically, in dataset order; the cursor then moves past them.
    """

    def __init__(self, user_ids: list[Any], examples_per_user: int) -> None:
        number: dict[Any, int] = {}
        members: list[list[int]] = []
        for i, user in enumerate(user_ids):
            try:
                u = number.setdefault(user, len(number))
            except TypeError:
                raise ConfigError(f"user id {user!r} of example {i} is not hashable; use ints or strings") from None
            if u == len(members):
                members.append([])
            members[u].append(i)
        self.names = tuple(number)  # user number -> the id the caller gave
        self.examples = [np.asarray(m, dtype=np.int64) for m in members]
        self.counts = np.asarray([len(m) for m in members], dtype=np.int64)
        self.k = examples_per_user
        self.cursors = np.zeros(len(members), dtype=np.int64)

    @property
    def users(self) -> int:
        return len(self.examples)

    def take(self, users: np.ndarray, local: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """(the examples each of the ``local`` users brings, every drawn user's next cursor)."""
        counts = self.counts[users]
        after = (self.cursors[users] + np.minimum(self.k, counts)) % counts
        picks = []
        for u in local.tolist():
            n = int(self.counts[u])
            picks.append(self.examples[u][(self.cursors[u] + np.arange(min(self.k, n))) % n])
        return picks, after

    def advance(self, users: np.ndarray, after: np.ndarray | None = None) -> None:
        if after is None:
            counts = self.counts[users]
            after = (self.cursors[users] + np.minimum(self.k, counts)) % counts
        self.cursors[users] = after  # the users of one draw are distinct


@dataclass(frozen=True)
class LogicalBatch:
    """One logical step's examples on this rank, as micro-batches ready for forward passes.

    ``indices`` are this rank's dataset indices, ``size`` their number (possibly 0: then
    ``micro_batches`` is empty), ``global_size`` the size drawn over all ranks, and ``step`` the
    global step, the same on every rank. At user level ``users`` are this rank's drawn users and
    ``global_size`` counts users.
    """

    step: int
    indices: tuple[int, ...]
    global_size: int
    micro_batches: MicroBatches
    users: tuple[int, ...] | None = None

    @property
    def size(self) -> int:
        return len(self.indices)


class DPDataLoader:
    """Logical batches from a sampler the accountant understands, micro-batched for memory.

    Iterating yields one :class:`LogicalBatch` per step. ``dataset`` is any map-style dataset with
    ``len`` (a torch Dataset, a Hugging Face ``datasets.Dataset``); ``collate_fn`` (default torch's
    ``default_collate``, or e.g. ``DataCollatorWithPadding``) is called once per non-empty
    micro-batch and never with an empty list. ``sampling="shuffle"`` uses fixed batches of
    round(sample_rate * N) without replacement instead of Poisson; ``sample_rate`` then reports
    the realised batch_size / N.

    Batches are fetched in this process, lazily; no worker processes. The sampler's position is
    saved with ``state_dict()`` and moves as each LogicalBatch is handed out.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        sample_rate: float,
        max_physical_batch_size: int,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        steps: int | None = None,
        seed: Seed | None = None,
        rank: int = 0,
        world_size: int = 1,
        sampling: Literal["poisson", "shuffle"] = "poisson",
        on_draw: Callable[[LogicalBatch], None] | None = None,
        user_ids: Any = None,
        examples_per_user: int | None = None,
    ) -> None:
        self.on_draw = on_draw
        if isinstance(dataset, IterableDataset) or not (
            hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
        ):
            raise ConfigError(
                f"DPDataLoader needs a map-style dataset with len() and indexing, got "
                f"{type(dataset).__name__}; Poisson sampling draws from all N examples each step "
                "(convert an iterable dataset to a map-style one first)"
            )
        self.dataset = dataset
        self.collate_fn = default_collate if collate_fn is None else collate_fn
        self.max_physical_batch_size = _int_arg(
            "max_physical_batch_size", max_physical_batch_size, 1
        )
        size = len(dataset)
        self._users: _UserIndex | None = None
        if user_ids is not None:
            k = 1 if examples_per_user is None else _int_arg("examples_per_user", examples_per_user, 1)
            if k > self.max_physical_batch_size:
                raise ConfigError(
                    f"examples_per_user={k} exceeds max_physical_batch_size={self.max_physical_batch_size}: a "
                    "user's examples must fit in one micro-batch, since they are clipped as one unit. Lower "
                    "examples_per_user or raise the micro-batch size"
                )
            if sampling != "poisson":
                raise ConfigError(f"user-level sampling draws users by Poisson sampling, not {sampling!r}")
            self._users = _UserIndex(resolve_user_ids(dataset, user_ids), k)
            size = self._users.users  # the draw is over users
        elif examples_per_user is not None:
            raise ConfigError("examples_per_user needs user_ids (the user of every example)")
        if sampling == "poisson":
            self.batch_sampler: PoissonBatchSampler | ShuffleBatchSampler = PoissonBatchSampler(
                size, sample_rate, steps=steps, seed=seed, rank=rank, world_size=world_size
            )
        elif sampling == "shuffle":
            batch_size = round(_sample_rate_arg(sample_rate) * _int_arg("dataset_size", size, 1))
            if batch_size < 1:
                raise ConfigError(
                    f"sample_rate={sample_rate} over {size} examples rounds to an empty fixed "
                    "batch; raise sample_rate"
                )
            self.batch_sampler = ShuffleBatchSampler(
                size, batch_size, seed=seed, rank=rank, world_size=world_size
            )
            if steps is not None and steps != self.batch_sampler.steps:
                raise ConfigError(
                    f"sampling='shuffle' makes an epoch {self.batch_sampler.steps} steps "
                    f"(dataset_size // batch_size), not steps={steps}; leave steps unset"
                )
        else:
            raise ConfigError(f"sampling must be 'poisson' or 'shuffle', got {sampling!r}")
        logger.debug(
            "DPDataLoader: %s sampling, N=%d, q=%g, %d steps per epoch, rank %d of %d",
            self.sampling,
            self.dataset_size,
            self.sample_rate,
            self.steps,
            self.batch_sampler.rank,
            self.batch_sampler.world_size,
        )

    @property
    def sampling(self) -> str:
        return self.batch_sampler.sampling

    @property
    def privacy_unit(self) -> str:
        """"user" when the draw is over users (``user_ids``), else "example"."""
        return "example" if self._users is None else "user"

    @property
    def examples_per_user(self) -> int | None:
        return None if self._users is None else self._users.k

    @property
    def user_names(self) -> tuple[Any, ...] | None:
        """At user level, the id given for each user number: batches name users by number (0 .. N-1,
        in order of first appearance in ``user_ids``), so that no id collides with the padding id."""
        return None if self._users is None else self._users.names

    @property
    def sample_rate(self) -> float:
        return self.batch_sampler.sample_rate

    @property
    def dataset_size(self) -> int:
        return self.batch_sampler.dataset_size

    @property
    def steps(self) -> int:
        return self.batch_sampler.steps

    @property
    def expected_batch_size(self) -> float:
        return self.batch_sampler.expected_batch_size

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[LogicalBatch]:
        return self.batch_sampler._iter_global(make=self._logical_batch)

    def _logical_batch(self, step: int, global_batch: np.ndarray) -> LogicalBatch:
        """This rank's part of one draw, micro-batched; the bound engine (``on_draw``) sees it before
        the loader's position moves past it, and may refuse it (budget spent, the previous batch
        never stepped), leaving the loader where a checkpoint expects it."""
        sampler, size = self.batch_sampler, self.max_physical_batch_size
        if self._users is not None:
            return self._user_batch(step, global_batch)
        local = global_batch[sampler.rank :: sampler.world_size].tolist()
        chunks = [local[start : start + size] for start in range(0, len(local), size)]
        batch = LogicalBatch(
            step=step,
            indices=tuple(local),
            global_size=int(global_batch.size),
            micro_batches=MicroBatches(self.dataset, self.collate_fn, chunks),
        )
        if self.on_draw is not None:
            self.on_draw(batch)
        return batch

    def _user_batch(self, step: int, global_users: np.ndarray) -> LogicalBatch:
        """Users (not examples) are split over ranks; each user's examples are packed whole into
        micro-batches of at most ``max_physical_batch_size`` (k <= that size, so one always fits).
        The cursors move only once the draw is accepted."""
        sampler, size, index = self.batch_sampler, self.max_physical_batch_size, self._users
        local_users = global_users[sampler.rank :: sampler.world_size]
        picks, after = index.take(global_users, local_users)
        chunks: list[list[int]] = []
        units: list[tuple[int, ...]] = []
        chunk: list[int] = []
        owners: list[int] = []
        for user, examples in zip(local_users.tolist(), picks):
            if len(chunk) + len(examples) > size:
                chunks.append(chunk)
                units.append(tuple(owners))
                chunk, owners = [], []
            chunk.extend(examples.tolist())
            owners.extend([user] * len(examples))
        if chunk:
            chunks.append(chunk)
            units.append(tuple(owners))
        batch = LogicalBatch(
            step=step,
            indices=tuple(i for c in chunks for i in c),
            global_size=int(global_users.size),
            micro_batches=MicroBatches(self.dataset, self.collate_fn, chunks, units),
            users=tuple(local_users.tolist()),
        )
        if self.on_draw is not None:
            self.on_draw(batch)
        index.advance(global_users, after)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The sampler's state; it holds the secret seed (see PoissonBatchSampler.state_dict).
        At user level also the unit and k (the cursors are replayed from the draws on load)."""
        state = self.batch_sampler.state_dict()
        if self._users is not None:
            state = {**state, "privacy_unit": "user", "examples_per_user": self._users.k}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        unit = state.get("privacy_unit", "example")
        k = state.get("examples_per_user")
        if (unit, k) != (self.privacy_unit, self.examples_per_user):
            raise ConfigError(
                f"loader state was saved with privacy_unit={unit!r}, examples_per_user={k!r} but this loader has "
                f"{self.privacy_unit!r}, {self.examples_per_user!r}; build it with the settings the run began with"
            )
        self.batch_sampler.load_state_dict(state)
        if self._users is not None:
            # Which examples a drawn user brings depends on every earlier draw: replay them.
            self._users.cursors[:] = 0
            for step in range(self.batch_sampler.next_step):
                self._users.advance(self.batch_sampler._draw(step))
