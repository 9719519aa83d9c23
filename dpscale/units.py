"""Whether a dataset fits the privacy unit a config protects, as a function of the config and the
dataset alone, so that it can be checked before any engine exists: DPTrainer refuses a misfit when
the trainer is built rather than when training starts. ``PrivacyEngine.make_data_loader`` makes the
same checks (today with its own copy of them; it is meant to call this).

The accountant's q = B / N counts units: examples at example level, users at user level, so N must
be the number of the dataset's examples or of its distinct users. At user level every example must
name its user (a user without one would be several unprotected people), and a user's examples are
clipped as one unit, so the k examples a drawn user brings must fit in one micro-batch.
"""

from __future__ import annotations

from typing import Any

from dpscale.errors import ConfigError
from dpscale.sampling import resolve_user_ids

__all__ = ["check_privacy_units"]


def check_privacy_units(unit, dataset: Any, user_ids: Any, *, micro_batch: int,
                        micro_name: str = "max_physical_batch_size") -> list | None:
    """The user of every example at user level (``user_ids`` resolved: a sequence, or a column of
    ``dataset`` read now), None at example level, after refusing what does not fit.

    unit: anything with ``privacy_unit``, ``examples_per_user`` and ``dataset_size`` (a DPConfig,
        the execution plan's sampling record).
    micro_batch, micro_name: the micro-batch size and the argument that set it, named in the
        refusal (the loader's ``max_physical_batch_size``, the Trainer's
        ``per_device_train_batch_size``).
    """
    if unit.privacy_unit != "user":
        if user_ids is not None:
            raise ConfigError(
                "user_ids= was given but DPConfig(privacy_unit='example') protects single examples; set "
                "DPConfig(privacy_unit='user', dataset_size=<number of users>, expected_batch_size=<users per "
                "step>) for user-level privacy."
            )
        if len(dataset) != unit.dataset_size:
            raise ConfigError(
                f"The dataset has {len(dataset)} examples but DPConfig(dataset_size={unit.dataset_size}); the "
                "accountant's q = B / N would be wrong."
            )
        return None
    if user_ids is None:
        raise ConfigError(
            "DPConfig(privacy_unit='user') protects users, so the loader must know whose each example is: pass "
            "user_ids=[the user of each example] or the name of a dataset column."
        )
    k = unit.examples_per_user
    if k > micro_batch:
        raise ConfigError(
            f"DPConfig(examples_per_user={k}) exceeds {micro_name}={micro_batch}: a user's examples are clipped "
            f"as one unit and must fit in one micro-batch. Raise {micro_name} to at least {k} or lower "
            "examples_per_user."
        )
    ids = resolve_user_ids(dataset, user_ids)
    users = len(set(ids))
    if users != unit.dataset_size:
        raise ConfigError(
            f"The dataset's {len(ids)} examples belong to {users} users but DPConfig(dataset_size="
            f"{unit.dataset_size}); at user level dataset_size is the number of users."
        )
    return ids
