"""What one logical step hands to the forward passes: this rank's examples as micro-batches that
are collated only when accessed, so that a large Poisson draw never holds its tensors at once."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from dpscale.errors import ConfigError

__all__ = ["PADDING_USER", "LogicalBatch", "MicroBatches"]

PADDING_USER = -1  # the user id of a padding pass's example (``MicroBatches.padding_units``)


def _fetch(dataset: Any, indices: list[int]) -> list[Any]:
    """Examples in the way torch's own fetcher gets them (batched ``__getitems__`` when offered)."""
    getitems = getattr(dataset, "__getitems__", None)
    if getitems is not None:
        return list(getitems(indices))
    return [dataset[i] for i in indices]


class MicroBatches(Sequence):
    """The micro-batches of one logical batch, collated only when accessed.

    Holding a logical batch costs its index list, never its tensors, whatever the Poisson draw: each
    access fetches and collates one chunk anew.
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
