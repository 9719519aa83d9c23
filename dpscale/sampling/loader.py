"""The loader the engine hands out: logical batches from a sampler the accountant understands,
cut into micro-batches for memory, at example or at user level."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import numpy as np
from torch.utils.data import IterableDataset, default_collate

from dpscale.errors import ConfigError
from dpscale.sampling.checks import int_arg, sample_rate_arg
from dpscale.sampling.micro_batches import LogicalBatch, MicroBatches
from dpscale.sampling.samplers import PoissonBatchSampler, Seed, ShuffleBatchSampler
from dpscale.sampling.users import UserIndex, resolve_user_ids

__all__ = ["DPDataLoader"]

logger = logging.getLogger(__name__)


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
        self.max_physical_batch_size = int_arg(
            "max_physical_batch_size", max_physical_batch_size, 1
        )
        size = len(dataset)
        self._users: UserIndex | None = None
        if user_ids is not None:
            k = 1 if examples_per_user is None else int_arg("examples_per_user", examples_per_user, 1)
            if k > self.max_physical_batch_size:
                raise ConfigError(
                    f"examples_per_user={k} exceeds max_physical_batch_size={self.max_physical_batch_size}: a "
                    "user's examples must fit in one micro-batch, since they are clipped as one unit. Lower "
                    "examples_per_user or raise the micro-batch size"
                )
            if sampling != "poisson":
                raise ConfigError(f"user-level sampling draws users by Poisson sampling, not {sampling!r}")
            self._users = UserIndex(resolve_user_ids(dataset, user_ids), k)
            size = self._users.users  # the draw is over users
        elif examples_per_user is not None:
            raise ConfigError("examples_per_user needs user_ids (the user of every example)")
        if sampling == "poisson":
            self.batch_sampler: PoissonBatchSampler | ShuffleBatchSampler = PoissonBatchSampler(
                size, sample_rate, steps=steps, seed=seed, rank=rank, world_size=world_size
            )
        elif sampling == "shuffle":
            batch_size = round(sample_rate_arg(sample_rate) * int_arg("dataset_size", size, 1))
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
