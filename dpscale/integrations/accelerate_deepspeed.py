"""Accelerate's DeepSpeed plugin: the user's ``Accelerator`` loop, made private, unchanged.

    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])  # CPU; none on GPUs
    model, optimizer = accelerator.prepare(model, optimizer)      # a DeepSpeedEngine under the plugin
    engine = make_private(accelerator, model, optimizer, config, noise_key="noise.key")
    loader = make_data_loader(accelerator, engine, train_set, max_physical_batch_size=16)
    for logical_batch in loader:
        dpscale.run_logical_step(engine, logical_batch, lambda micro: losses_of(engine.model(**micro)))

``make_private`` of ``dpscale.integrations.accelerate`` comes here when Accelerate prepared a
``DeepSpeedEngine``. Under DeepSpeed, Accelerate's ``optimizer.step()`` is a no-op and the real step
runs at the accumulation boundary (``accelerator.backward`` calls ``engine.step()``). dpscale's
boundary is the end of a logical batch: the step driver (``dpscale.run_logical_step``) runs the
micro-batches inside ``DeepSpeedBackend.accumulation()`` (one DeepSpeed reduction of the clipped
sums), the ZeRO-3 padding passes a rank with fewer micro-batches needs (clipped sums dropped), and
then ``engine.step()``, which is the DeepSpeedEngine's ``step()`` (noise on each rank's fp32
partition, accounting, update). Iterating the loader steps nothing by itself.

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

from dpscale.backends.deepspeed import DeepSpeedBackend
from dpscale.config import DPConfig
from dpscale.engine import PrivacyEngine
from dpscale.integrations.accelerate_checks import (
    check_accelerator,
    check_prepared,
    is_deepspeed,
)
from dpscale.layers import RuleRegistry
from dpscale.noise import NoiseKey

# is_deepspeed is re-exported: callers imported it from here first.
__all__ = ["is_deepspeed", "make_private_deepspeed"]


def make_private_deepspeed(accelerator, model, optimizer, config: DPConfig, *,
                           noise_key: NoiseKey | str | os.PathLike | None = None,
                           rules: RuleRegistry | None = None) -> PrivacyEngine:
    """A PrivacyEngine on the DeepSpeedEngine that ``accelerator.prepare`` returned (as ``model``).
    The optimizer is DeepSpeed's: the backend hooks its base optimizer, so ``optimizer`` is only
    checked to be the one Accelerate wrapped."""
    check_accelerator(accelerator, deepspeed=True)  # fp16 scaler, accumulation, torch.compile
    check_prepared(accelerator, model, optimizer)  # the DeepSpeedEngine and its optimizer
    backend = DeepSpeedBackend(model)  # refuses engine clipping, fp16, DeepSpeed-side accumulation, ...
    return PrivacyEngine(model.module, config, noise_key=noise_key, rules=rules, backend=backend)
