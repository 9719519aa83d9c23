"""dpscale: differentially private training of transformers, exact per-example clipping in one
backward pass."""

from dpscale.clipping import ClippingPlan
from dpscale.config import DPConfig
from dpscale.engine import PrivacyEngine
from dpscale.layers import Rule, RuleRegistry, default_registry
from dpscale.errors import (
    ConfigError,
    DPScaleError,
    LossShapeError,
    NoTrainableParametersError,
    PrivacyBudgetError,
    TapeError,
    UnsupportedModuleError,
)

__all__ = [
    "ClippingPlan",
    "DPConfig",
    "PrivacyEngine",
    "Rule",
    "RuleRegistry",
    "default_registry",
    "ConfigError",
    "DPScaleError",
    "LossShapeError",
    "NoTrainableParametersError",
    "PrivacyBudgetError",
    "TapeError",
    "UnsupportedModuleError",
]
