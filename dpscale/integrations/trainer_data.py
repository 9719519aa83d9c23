"""The Trainer's view of the privacy engine's loader: each item its loop takes is one logical
(Poisson) batch, so the Trainer steps once per logical batch, and the loader ends before drawing a
batch the privacy budget would refuse."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from dpscale.accounting import steps_for_epochs
from dpscale.driver import budget_reached
from dpscale.plan import planned_steps
from dpscale.sampling import LogicalBatch

__all__ = ["LogicalBatches", "LogicalStep", "to_device"]


class LogicalStep:
    """What the Trainer's loop takes as one batch: one logical (Poisson) batch of this rank, cut
    into micro-batches. It holds no tensor until ``training_step`` collates each micro-batch, and
    answers ``"labels" in step`` with False so the Trainer counts no tokens."""

    __slots__ = ("batch", "flops")

    def __init__(self, batch: LogicalBatch) -> None:
        self.batch = batch
        self.flops = 0.0

    def __contains__(self, key) -> bool:
        return False


class LogicalBatches:
    """The Trainer's view of the engine's loader. ``len`` is the loader's pass (the planned steps,
    or one epoch-equivalent); iterating builds the privacy engine on the prepared model the first
    time (the loader is the engine's, split by the backend's data-parallel position), continues
    from the loader's position (a resumed run continues where its privacy state says), and ends
    before drawing a batch the budget would refuse."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.dataset = trainer.train_dataset

    def __len__(self) -> int:
        config = self.trainer.dp_config
        return planned_steps(config) or steps_for_epochs(1.0, config.sample_rate)

    def __iter__(self):
        engine = self.trainer._engine_for(self.trainer.model_wrapped)
        batches = iter(engine.data_loader)
        # Within a run the callback stops the Trainer at the budget before this asks again; this
        # check ends a run that starts (or resumes) with the budget already spent.
        while not budget_reached(engine):
            batch = next(batches, None)
            if batch is None:
                return
            yield LogicalStep(batch)


def to_device(data, device: torch.device | str, dtype: torch.dtype):
    """Micro-batches onto the device; floating inputs in the parameters' dtype (a bf16
    DeepSpeed module takes bf16 inputs)."""
    if isinstance(data, Mapping):
        return type(data)({k: to_device(v, device, dtype) for k, v in data.items()})
    if isinstance(data, (tuple, list)):
        return type(data)(to_device(v, device, dtype) for v in data)
    if isinstance(data, Tensor):
        if data.is_floating_point():
            return data.to(device, dtype=dtype)
        return data.to(device)
    return data
