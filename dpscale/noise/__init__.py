"""Keyed cryptographic Gaussian noise: coordinate j of parameter `name` at step t is a pure
function of (secret key, t, name, j).

Why keyed and seekable
----------------------
DP-SGD adds one draw of N(0, std^2) per coordinate per logical step. Under data parallelism and
ZeRO each rank owns a slice [a, b) of a flattened parameter, and the slices change with the
topology. If the noise depended on generation order (a torch.Generator, a global seed), two
topologies would add different noise, a resumed run would diverge, and a careless backend could
add the same draw twice or W times. Here the value of every coordinate is fixed by the key and its
coordinates, so any rank can produce exactly the part it owns, in any order, and the result is
bit-for-bit the same as generating the whole parameter at once (on any machine, and on the host
or a device: see "Same bits everywhere" in `scheme`). The key is secret and 256 bits: unlike a
Mersenne Twister seed, an observer of some noised values cannot reconstruct the others.

One idea per module
-------------------
- `key`: the secret (NoiseKey, its file, `load_noise_key`) and the one keyed function every
  stream is derived from.
- `scheme`: scheme "dpscale.noise.gaussian.v2", i.e. the stream layout, the constants and the
  polynomials, shared by both generators and by the Poisson sampler's stream.
- `host_generator` (OpenSSL and numpy on the CPU) and `torch_generator` (tensor operations on the
  tensor's device): the same values bit for bit.
- `api`: `gaussian` and `add_gaussian_noise_`, which check a request once and pick a generator.
- `workers`: `NoiseWorkers`, threads that one host request is spread over (the same values).
- `ahead`: `NoiseAhead`, the next step's noise drawn by a background thread while the step's
  forward and backward run, served bit for bit at the step (`NoiseAheadOptions`).
"""

from dpscale.noise.ahead import DEFAULT_NOISE_AHEAD, NoiseAhead, NoiseAheadOptions
from dpscale.noise.api import add_gaussian_noise_, gaussian, select_generator
from dpscale.noise.key import NoiseKey, load_noise_key
from dpscale.noise.scheme import SCHEME
from dpscale.noise.workers import NoiseWorkers

__all__ = [
    "DEFAULT_NOISE_AHEAD",
    "SCHEME",
    "NoiseAhead",
    "NoiseAheadOptions",
    "NoiseKey",
    "NoiseWorkers",
    "add_gaussian_noise_",
    "gaussian",
    "load_noise_key",
    "select_generator",
]
