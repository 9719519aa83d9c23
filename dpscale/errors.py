"""Every error dpscale raises on purpose derives from DPScaleError, so a user can catch ours apart
from torch's; each message says what to change."""


class DPScaleError(Exception):
    """Base class of dpscale's own errors."""


class ConfigError(DPScaleError, ValueError):
    """A DPConfig (or a config of a training engine) would weaken or break the guarantee."""


class DataError(ConfigError):
    """A data file ``dpscale train`` cannot train on as it is (its encoding, a column, a label, an
    empty row): the message names the file, the line and the fix. Raised before the model loads."""


class UnsupportedModuleError(DPScaleError, TypeError):
    """A trainable parameter whose per-example gradient dpscale cannot compute exactly."""


class NoTrainableParametersError(DPScaleError, ValueError):
    """The model has nothing to train privately."""


class LossShapeError(DPScaleError, ValueError):
    """engine.backward was given something other than one loss per example."""


class TapeError(DPScaleError, RuntimeError):
    """The forward pass and the backward call do not match (a stale or missing forward)."""


class PrivacyBudgetError(DPScaleError, ValueError):
    """A target epsilon or delta that cannot be reached or is not meaningful."""


class PrivacyBudgetExhausted(PrivacyBudgetError):
    """The next step would take epsilon past DPConfig.target_epsilon. Stop here (the drivers do,
    and save), or opt into overrun with DPConfig(allow_budget_overrun=True)."""


class StepBoundaryError(DPScaleError, RuntimeError):
    """The DP step's boundary was skipped: parameters would move without their noise, or clipped
    sums were consumed by a step the engine did not see."""


class SamplingError(DPScaleError, RuntimeError):
    """A step's batch did not come from a sampler the accountant's assumption covers."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from as it is: missing, torn, altered, not dpscale's, or
    written by another model or mechanism. Nothing of it was loaded."""


class ForeignGradientError(StepBoundaryError):
    """A gradient reached a trainable parameter through a backward other than ``engine.backward``,
    or an optimizer the engine does not know was stepped over its parameters. Nothing moved and
    nothing was accounted."""
