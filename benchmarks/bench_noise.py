"""Speed of dpscale's keyed Gaussian noise on one CPU thread, against torch.randn and against the
raw ChaCha20 keystream it is built from, and the time to noise a whole tiny Llama (about 21 M
parameters: 4 layers, hidden 512, intermediate 1376, vocab 8192, untied head) for one step.

Each row is the median over --reps repetitions, as wall time and as this process's CPU time (the
second is the one to trust on a machine shared with other jobs).

    python benchmarks/bench_noise.py
    python benchmarks/bench_noise.py --numel 4000000 --reps 9 --layers 12 --hidden 768
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from dpscale.noise import NoiseKey, add_gaussian_noise_, gaussian


def llama_shapes(layers: int, hidden: int, intermediate: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of a Llama with untied input and output embeddings."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        prefix = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[prefix + f"self_attn.{proj}.weight"] = (hidden, hidden)
        shapes[prefix + "mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[prefix + "mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[prefix + "mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[prefix + "input_layernorm.weight"] = (hidden,)
        shapes[prefix + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def measure(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    """Median wall and CPU seconds of fn() over reps runs, after one warm-up run."""
    fn()
    walls, cpus = [], []
    for _ in range(reps):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        cpus.append(time.process_time() - cpu)
        walls.append(time.perf_counter() - wall)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--numel", type=int, default=4_000_000, help="elements per throughput run")
    parser.add_argument("--reps", type=int, default=7, help="repetitions; medians are reported")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--vocab", type=int, default=8192)
    args = parser.parse_args()

    torch.set_num_threads(1)
    key = NoiseKey.generate()
    n = args.numel
    zeros = bytes(8 * n)  # our generator consumes 8 keystream bytes per Gaussian
    target = torch.zeros(n)

    def keystream() -> bytes:
        cipher = Cipher(algorithms.ChaCha20(bytes(range(32)), bytes(16)), mode=None)
        return cipher.encryptor().update(zeros)

    cases = [  # (label, work units, unit, function)
        ("dpscale gaussian float32", n, "Gaussians", lambda: gaussian(key, 1, "w", n)),
        ("dpscale gaussian float64", n, "Gaussians", lambda: gaussian(key, 1, "w", n, dtype=torch.float64)),
        ("dpscale add noise float32", n, "Gaussians", lambda: add_gaussian_noise_(target, key, 1, "w", 1.0)),
        ("torch.randn float32", n, "Gaussians", lambda: torch.randn(n)),
        ("torch.randn float64", n, "Gaussians", lambda: torch.randn(n, dtype=torch.float64)),
        ("ChaCha20 keystream (OpenSSL)", 8 * n, "bytes", keystream),
    ]
    rows = [(label, units, unit, *measure(fn, args.reps)) for label, units, unit, fn in cases]

    shapes = llama_shapes(args.layers, args.hidden, args.intermediate, args.vocab)
    grads = {name: torch.zeros(shape) for name, shape in shapes.items()}
    total = sum(g.numel() for g in grads.values())

    def noise_model() -> None:
        for name, grad in grads.items():
            add_gaussian_noise_(grad, key, 1, name, std=1.0)

    def randn_model() -> None:
        for grad in grads.values():
            grad.add_(torch.randn(grad.shape))

    model_wall, model_cpu = measure(noise_model, args.reps)
    randn_wall, randn_cpu = measure(randn_model, args.reps)

    print(f"torch {torch.__version__}, 1 thread, medians of {args.reps} runs, {n:,} elements per run")
    print(f"{'what':32s} {'rate (wall)':>18s} {'rate (CPU)':>18s}")
    for label, units, unit, wall, cpu in rows:
        scale, suffix = (1e9, "GB/s") if unit == "bytes" else (1e6, "M/s")
        wall_rate, cpu_rate = units / wall / scale, units / cpu / scale
        print(f"{label:32s} {wall_rate:13.1f} {suffix:4s} {cpu_rate:13.1f} {suffix:4s}")
    print()
    print(f"one step of noise for a Llama of {total:,} parameters ({len(shapes)} tensors):")
    print(f"{'what':32s} {'wall s':>10s} {'CPU s':>10s}")
    print(f"{'dpscale add_gaussian_noise_':32s} {model_wall:10.3f} {model_cpu:10.3f}")
    print(f"{'grad.add_(torch.randn(...))':32s} {randn_wall:10.3f} {randn_cpu:10.3f}")


if __name__ == "__main__":
    main()
