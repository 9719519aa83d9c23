"""User-level units: whose examples are whose, and which of a drawn user's examples come next, so
that the Poisson draw can be over users while each user's examples travel together."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dpscale.errors import ConfigError

__all__ = ["UserIndex", "resolve_user_ids"]


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


class UserIndex:
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
