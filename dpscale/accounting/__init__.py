"""Epsilon and noise multiplier of DP-SGD, through Google's `dp_accounting` library.

The privacy loss of the subsampled Gaussian mechanism is never written here: every number comes
from `dp_accounting`'s own events and accountants, so a fix upstream reaches us by upgrading. This
module only decides which event describes a run, which accountant composes it, how finely, and
which inputs make no sense.

Two accountants:

- "pld" (default): privacy loss distributions, the tightest numbers dp_accounting gives. Every
  PLD here is built with pessimistic rounding, so whatever the discretization interval the
  epsilon is an upper bound on the true one; a finer interval only tightens it (see
  `dpscale.accounting.epsilon`).
- "rdp": Renyi DP, looser (an epsilon of 8 under PLD reads about 8.6 to 9.5 under RDP) but the
  only one of the two that knows fixed-size batches drawn without replacement.

Two ways a batch is drawn:

- "poisson": each example joins each step with probability q (the DESIGN contract);
  `PoissonSampledDpEvent`, add-or-remove-one neighbours.
- "shuffle": each step draws a batch of exactly round(q * N) examples without replacement,
  independently of the other steps; `SampledWithoutReplacementDpEvent`, which dp_accounting 0.6
  accounts only under RDP and only for replace-one neighbours, so that epsilon protects against
  swapping one example for another (a different, not directly comparable, guarantee from the
  Poisson one). A loader that shuffles once per epoch and walks through the permutation is a
  different mechanism again: this accounting does not cover it (Chua et al., "How Private are
  DP-SGD Implementations?", ICML 2024, show its real loss can be much larger).
"""

from dpscale.accounting.accountant import PrivacyAccountant
from dpscale.accounting.calibration import DEFAULT_TOLERANCE, calibrate_noise_multiplier
from dpscale.accounting.epsilon import compute_epsilon
from dpscale.accounting.inputs import (
    ACCOUNTANTS,
    SAMPLINGS,
    default_delta,
    steps_for_epochs,
)

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_TOLERANCE",
    "SAMPLINGS",
    "PrivacyAccountant",
    "calibrate_noise_multiplier",
    "compute_epsilon",
    "default_delta",
    "steps_for_epochs",
]
