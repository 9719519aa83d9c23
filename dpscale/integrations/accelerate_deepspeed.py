"""Accelerate's DeepSpeed plugin: the user's ``Accelerator`` loop, made private, unchanged.

    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])  # CPU; none on GPUs
    model, optimizer = accelerator.prepare(model, optimizer)      # a DeepSpeedEngine under the plugin
    engine = make_private(accelerator, model, optimizer, config, noise_key="noise.key")
    loader = make_data_loader(accelerator, engine, train_set, max_physical_batch_size=16)
    for logical_batch in loader:
        for micro in logical_batch.micro_batches:
            engine.backward(losses_of(engine.model(**micro)))     # the inner module (see below)
        optimizer.step()                                          # Accelerate's no-op under DeepSpeed
        optimizer.zero_grad()

``make_private`` and ``make_data_loader`` of ``dpscale.integrations.accelerate`` come here when
Accelerate prepared a ``DeepSpeedEngine``. Under DeepSpeed, Accelerate's ``optimizer.step()`` is a
no-op and the real step runs at the accumulation boundary (``accelerator.backward`` calls
``engine.step()``). dpscale's boundary is the end of a logical batch's micro-batches: iterating
``logical_batch.micro_batches`` opens the ``DeepSpeedBackend.accumulation()`` block, and the end of
that iteration closes it (one DeepSpeed reduction of the clipped sums) and calls the DeepSpeedEngine's
``step()`` (noise on each rank's fp32 partition, accounting, update). Accelerate sets its own
``sync_gradients`` at the end of a data loader in the same way. A logical batch whose micro-batches
are not iterated to the end raises at the next one: no step is ever skipped silently.

Under ZeRO-3 every forward and backward gathers parameters, so all ranks must run as many passes as
the busiest rank: the extra ones are padding micro-batches (the dataset's first example) whose
clipped sums the backend drops (``DeepSpeedBackend.padding()``); the loop needs no change.

The forward must run on ``engine.model`` (the DeepSpeedEngine's ``.module``), not on the
DeepSpeedEngine itself: its forward prepares DeepSpeed's own backward (loss scaling by the
accumulation steps, the reduction epilogue), which dpscale replaces.

DeepSpeed settings that change the DP step are refused by ``check_deepspeed_config`` with the config
key named. In particular DeepSpeed 0.19 clips at 1.0 unless the DeepSpeed config file says
``"gradient_clipping": 0.0``, and Accelerate drops a plugin ``gradient_clipping=0.0`` (it treats 0 as
unset), so the value must be in the file; a run whose effective clipping is not 0 is refused.
"""

from __future__ import annotations

import os
from typing import Iterator

from dpscale.backends.deepspeed import DeepSpeedBackend
from dpscale.config import DPConfig
from dpscale.engine import PrivacyEngine
from dpscale.errors import ConfigError
from dpscale.layers import RuleRegistry
from dpscale.noise import NoiseKey
from dpscale.sampling import DPDataLoader, LogicalBatch

__all__ = ["DeepSpeedStepLoader", "is_deepspeed", "make_private_deepspeed", "stepping_loader"]


def is_deepspeed(accelerator) -> bool:
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    return kind == "DEEPSPEED"


def make_private_deepspeed(accelerator, model, optimizer, config: DPConfig, *,
                           noise_key: NoiseKey | str | os.PathLike | None = None,
                           rules: RuleRegistry | None = None) -> PrivacyEngine:
    """A PrivacyEngine on the DeepSpeedEngine that ``accelerator.prepare`` returned (as ``model``).
    The optimizer is DeepSpeed's: the backend hooks its base optimizer, so ``optimizer`` is only
    checked to be the one Accelerate wrapped."""
    import deepspeed

    from dpscale.integrations.accelerate import check_accelerator

    check_accelerator(accelerator, deepspeed=True)  # fp16 scaler, accumulation, torch.compile
    if not isinstance(model, deepspeed.DeepSpeedEngine):
        raise ConfigError(
            f"Accelerate runs DeepSpeed but the model is a {type(model).__name__}: pass the model returned by "
            "accelerator.prepare(model, optimizer) (a DeepSpeedEngine)."
        )
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's DeepSpeedOptimizerWrapper
    if inner is not model.optimizer:
        raise ConfigError("Pass the optimizer returned by accelerator.prepare together with its model.")
    if noise_key is None and accelerator.num_processes > 1:
        raise ConfigError(
            "Several processes need one noise key shared by all ranks: create it once with "
            "dpscale.noise.NoiseKey.write_new(path) and pass noise_key=path on every rank."
        )
    key = noise_key if noise_key is None or isinstance(noise_key, NoiseKey) else NoiseKey.from_file(noise_key)
    backend = DeepSpeedBackend(model)  # refuses engine clipping, fp16, DeepSpeed-side accumulation, ...
    return PrivacyEngine(model.module, config, noise_key=key, rules=rules, backend=backend)


class DeepSpeedStepLoader:
    """A DPDataLoader whose logical batches end with one DeepSpeed step (see the module docstring).
    State (``state_dict``) is the wrapped loader's; ``engine.data_loader`` is the wrapped loader."""

    def __init__(self, loader: DPDataLoader, backend: DeepSpeedBackend) -> None:
        self.loader = loader
        self.backend = backend
        self._open: _SteppingMicroBatches | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):  # sample_rate, steps, dataset_size, ... of the wrapped loader
        if name in ("loader", "backend", "_open"):
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[LogicalBatch]:
        for batch in self.loader:
            self._check_previous_step_done()
            micro = _SteppingMicroBatches(batch.micro_batches, self.backend, self._padding_batch)
            self._open = micro
            yield LogicalBatch(step=batch.step, indices=batch.indices, global_size=batch.global_size,
                               micro_batches=micro)
        self._check_previous_step_done()

    def _check_previous_step_done(self) -> None:
        if self._open is not None and not self._open.stepped:
            raise ConfigError(
                "A logical batch's micro-batches were not iterated to the end, so its DeepSpeed step did not "
                "run. Iterate `for micro in logical_batch.micro_batches:` completely, once per logical batch."
            )
        self._open = None

    def _padding_batch(self):
        return self.loader.collate_fn([self.loader.dataset[0]])

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state) -> None:
        self.loader.load_state_dict(state)


class _SteppingMicroBatches:
    """One logical batch's micro-batches on this rank; iterating them to the end reduces the clipped
    sums once and runs the DeepSpeedEngine's step."""

    def __init__(self, micro_batches, backend: DeepSpeedBackend, padding_batch) -> None:
        self._micro_batches = micro_batches
        self._backend = backend
        self._padding_batch = padding_batch
        self.stepped = False
        self._started = False

    @property
    def sizes(self) -> list[int]:
        return self._micro_batches.sizes

    def __len__(self) -> int:
        return len(self._micro_batches)

    def __iter__(self):
        if self._started:
            raise ConfigError("Iterate a logical batch's micro-batches once: each iteration is one DeepSpeed step.")
        self._started = True
        local = len(self._micro_batches)
        count = self._backend.micro_batch_count(local)
        with self._backend.accumulation():
            for j in range(count):
                if j < local:
                    yield self._micro_batches[j]
                else:
                    with self._backend.padding():
                        yield self._padding_batch()
        self._backend.ds_engine.step()
        self.stepped = True


def stepping_loader(engine: PrivacyEngine, loader: DPDataLoader) -> DeepSpeedStepLoader:
    if not isinstance(engine.backend, DeepSpeedBackend):
        raise ConfigError("The privacy engine was not built for DeepSpeed (make_private under Accelerate's DeepSpeed plugin).")
    return DeepSpeedStepLoader(loader, engine.backend)

