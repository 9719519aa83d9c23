"""Which examples form each logical batch, how ranks share it, and how it is cut into micro-batches.

The accountant composes the *Poisson*-subsampled Gaussian: every logical batch must include each of
the N examples independently with probability q, and nobody who later sees the model may know which
examples were drawn. A shuffled, fixed-size loader is a different mechanism with a different
accountant, so each sampler states what it did (``sampling``, ``sample_rate``, ``dataset_size``,
``steps``) and the engine can refuse a mismatch instead of reporting a wrong epsilon.

Randomness (part of the privacy mechanism, so stated plainly):

- The inclusion bits and the shuffles come from ChaCha20, a cryptographically secure stream cipher
  (through the ``cryptography`` package), keyed by SHA-256 of the seed and of the sampler kind, with
  the step (Poisson) or the epoch (shuffle) as the nonce (dpscale.noise.scheme's
  ``sampling_stream_key`` and ``sampling_stream``, in the noise's counter layout). A batch is
  therefore a function of (seed, step) alone: resuming is exact, any rank can compute any step, and
  without the seed the batches are as unpredictable as the cipher is strong.
- The engine's loader is seeded with ``NoiseKey.derive_seed("sampling")``: the same on every rank
  that reads the run's key file, and as secret as the key.
- ``seed=None`` draws 128 bits from ``os.urandom``: unpredictable, never reproducible. A given seed
  makes the run reproducible and makes the batches exactly as secret as that seed. A seed written
  in a published config (or a small integer) makes the batches public, the amplification by
  subsampling void, and the reported epsilon optimistic. ``state_dict()`` holds the seed: keep
  checkpoints as private as the training data. The seed is never logged.
- An example joins a batch when a 64-bit word of the stream is below floor(q * 2**64), so the real
  rate is within 2**-64 of q and never above it: the accountant's q is an upper bound.
- User level (``user_ids``): the Poisson draw is over users, not examples; each sampled user
  brings at most ``examples_per_user`` (k) of their examples, the next k in round-robin order over
  the user's examples (k = 1 is dp-transformers' PoissonAuthorSampler scheme). Which examples those
  are is a function of the draws so far, hence of the secret seed: resuming replays the draws.
  A user's examples always travel together, in one micro-batch on one rank.
- Not hidden here: the size of each logical batch varies and is visible to anyone who can watch
  step times or micro-batch counts. That is inherent to Poisson sampling.
"""

from dpscale.sampling.loader import DPDataLoader
from dpscale.sampling.micro_batches import PADDING_USER, LogicalBatch, MicroBatches
from dpscale.sampling.samplers import PoissonBatchSampler, ShuffleBatchSampler
from dpscale.sampling.users import resolve_user_ids

__all__ = [
    "PADDING_USER",
    "DPDataLoader",
    "LogicalBatch",
    "MicroBatches",
    "PoissonBatchSampler",
    "ShuffleBatchSampler",
    "resolve_user_ids",
]
