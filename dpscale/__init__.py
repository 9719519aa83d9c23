"""dpscale: differentially private training of transformers, exact per-example clipping in one
backward pass, keyed cryptographic noise, Poisson sampling and a real accountant.

Names are imported on first use, so that ``dpscale epsilon`` answers without loading torch.
"""

from __future__ import annotations

import importlib

from dpscale.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DPScaleError,
    ForeignGradientError,
    LossShapeError,
    NoTrainableParametersError,
    PrivacyBudgetError,
    PrivacyBudgetExhausted,
    SamplingError,
    StepBoundaryError,
    TapeError,
    UnsupportedModuleError,
)

_LAZY = {
    "PrivacyEngine": "dpscale.engine",
    "DPConfig": "dpscale.config",
    "DPAdamBC": "dpscale.optim",
    "ClippingPlan": "dpscale.clipping",
    "ExecutionPlan": "dpscale.plan",
    "RunOutcome": "dpscale.driver",
    "StepOutcome": "dpscale.driver",
    "run_logical_step": "dpscale.driver",
    "run_steps": "dpscale.driver",
    "Rule": "dpscale.layers",
    "RuleRegistry": "dpscale.layers",
    "default_registry": "dpscale.layers",
    "NoiseKey": "dpscale.noise",
    "NoiseAheadOptions": "dpscale.noise",
    "PrivacyAccountant": "dpscale.accounting",
    "compute_epsilon": "dpscale.accounting",
    "calibrate_noise_multiplier": "dpscale.accounting",
    "DPDataLoader": "dpscale.sampling",
    "PoissonBatchSampler": "dpscale.sampling",
    "LocalBackend": "dpscale.backends",
    "DataParallelBackend": "dpscale.backends",
    "FSDP2Backend": "dpscale.backends",
    "bitfit": "dpscale.subsets",
    "lora": "dpscale.subsets",
    "train_only": "dpscale.subsets",
    "make_private": "dpscale.integrations.accelerate",
    "make_data_loader": "dpscale.integrations.accelerate",
    "DPTrainer": "dpscale.integrations.trainer",
    "causal_lm_losses": "dpscale.losses",
    "sequence_classification_losses": "dpscale.losses",
    "per_example_losses": "dpscale.losses",
    "resolve_model_name": "dpscale.train.models",
    "write_model_card": "dpscale.train.model_card",
    "zero_head": "dpscale.heads",
    "head_parameter_names": "dpscale.heads",
    "continue_run": "dpscale.phases",
    "set_trainable": "dpscale.phases",
    "label_word_losses": "dpscale.losses",
    "audit_one_run": "dpscale.audit",
    "AuditResult": "dpscale.audit",
    "CanaryAudit": "dpscale.audit_run",
    "CanaryAuditResult": "dpscale.audit_run",
}

__all__ = [
    *_LAZY,
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DPScaleError",
    "ForeignGradientError",
    "LossShapeError",
    "NoTrainableParametersError",
    "PrivacyBudgetError",
    "PrivacyBudgetExhausted",
    "SamplingError",
    "StepBoundaryError",
    "TapeError",
    "UnsupportedModuleError",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dpscale' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
