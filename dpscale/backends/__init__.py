"""Backends: where the clipped sums go and which coordinates of the noise each process adds.

A backend knows no layer rule. The engine hands it, per parameter, the clipped sum of the local
examples (already divided by the expected batch size) and, once per logical step, a function that
adds the keyed noise of a parameter's elements [offset, offset + numel) to a tensor. The backend
decides which elements this process owns, so that after the training engine's own reduction each
coordinate carries exactly one draw.
"""

from dpscale.backends.base import GradientBackend, NoiseFn
from dpscale.backends.data_parallel import DataParallelBackend
from dpscale.backends.local import LocalBackend

__all__ = ["DataParallelBackend", "GradientBackend", "LocalBackend", "NoiseFn"]
