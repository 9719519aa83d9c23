"""dpscale: differentially private training of transformers, exact per-example clipping in one
backward pass, keyed cryptographic noise, Poisson sampling and a real accountant.

Names are imported on first use, so that ``dpscale epsilon`` answers without loading torch.
"""

from __future__ import annotations

import importlib

from dpscale.errors import (
    CheckpointError,
    ConfigError,
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
    "ClippingPlan": "dpscale.clipping",
    "ExecutionPlan": "dpscale.plan",
    "StepOutcome": "dpscale.driver",
    "run_logical_step": "dpscale.driver",
    "run_steps": "dpscale.driver",
    "Rule": "dpscale.layers",
    "RuleRegistry": "dpscale.layers",
    "default_registry": "dpscale.layers",
    "NoiseKey": "dpscale.noise",
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
    "audit_one_run": "dpscale.audit",
    "AuditResult": "dpscale.audit",
    "CanaryAudit": "dpscale.audit_run",
    "CanaryAuditResult": "dpscale.audit_run",
}

__all__ = [
    *_LAZY,
    "CheckpointError",
    "ConfigError",
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
