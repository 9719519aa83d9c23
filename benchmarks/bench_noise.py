"""Speed of dpscale's keyed Gaussian noise: the host generator (OpenSSL ChaCha20 and numpy, one
CPU thread) and the torch generator (dpscale.noise.torch_generator, the same values by tensor
operations) on --device, against torch.randn there and against the raw ChaCha20 keystream; then the
time to noise a whole tiny Llama (about 21 M parameters: 4 layers, hidden 512, intermediate 1376,
vocab 8192, untied head) for one step, with its gradients on --device.

Each row is the median over --reps repetitions, as wall time and as this process's CPU time (the
second is the one to trust on a machine shared with other jobs, for CPU rows; device rows wait for
the device, so their CPU time is not the work). On CUDA the host rows that add noise to a device
tensor include the copies to the host and back, which is what the torch generator saves.

    python benchmarks/bench_noise.py                       # --device cuda where there is one
    python benchmarks/bench_noise.py --device cpu --numel 1000000 --reps 5
    python benchmarks/bench_noise.py --numel 4000000 --reps 9 --layers 12 --hidden 768
    python benchmarks/bench_noise.py --device cpu --noise-threads 1,2 --reps 5   # the host over threads

With --noise-threads, the host rows are repeated with the request spread over k threads
(dpscale.noise.NoiseWorkers); "rate (CPU)" is then per core (the process's CPU time sums its
threads). The last table gives what a step waits for when its noise was drawn ahead
(dpscale.noise.NoiseAhead): only the addition, against drawing it at the step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from dpscale.noise import NoiseAhead, NoiseAheadOptions, NoiseKey, NoiseWorkers, add_gaussian_noise_, gaussian


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


def measure(fn: Callable[[], object], reps: int, device: torch.device) -> tuple[float, float]:
    """Median wall and CPU seconds of fn() over reps runs, after one warm-up run; device work is
    waited for inside each timed run."""

    def run() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run()
    walls, cpus = [], []
    for _ in range(reps):
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        cpus.append(time.process_time() - cpu)
        walls.append(time.perf_counter() - wall)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--numel", type=int, default=4_000_000, help="elements per throughput run")
    parser.add_argument("--reps", type=int, default=7, help="repetitions; medians are reported")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the torch generator, torch.randn and the Llama's gradients run")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on the CPU")
    parser.add_argument("--noise-threads", default="1", help="comma-separated thread counts for the host rows")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--vocab", type=int, default=8192)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    key = NoiseKey.generate()
    n = args.numel
    zeros = bytes(8 * n)  # our generator consumes 8 keystream bytes per Gaussian
    on_host, on_device = torch.zeros(n), torch.zeros(n, device=device)

    def keystream() -> bytes:
        cipher = Cipher(algorithms.ChaCha20(bytes(range(32)), bytes(16)), mode=None)
        return cipher.encryptor().update(zeros)

    where = f"on {device}"
    cases = [  # (label, work units, unit, function)
        ("host gaussian float32", n, "Gaussians", lambda: gaussian(key, 1, "w", n, generator="host")),
        ("host gaussian float64", n, "Gaussians",
         lambda: gaussian(key, 1, "w", n, dtype=torch.float64, generator="host")),
        ("host add noise float32", n, "Gaussians",
         lambda: add_gaussian_noise_(on_host, key, 1, "w", 1.0, generator="host")),
        (f"torch gen. gaussian f32 {where}", n, "Gaussians",
         lambda: gaussian(key, 1, "w", n, device=device, generator="torch")),
        (f"torch gen. gaussian f64 {where}", n, "Gaussians",
         lambda: gaussian(key, 1, "w", n, dtype=torch.float64, device=device, generator="torch")),
        (f"torch gen. add noise f32 {where}", n, "Gaussians",
         lambda: add_gaussian_noise_(on_device, key, 1, "w", 1.0, generator="torch")),
        (f"torch.randn float32 {where}", n, "Gaussians", lambda: torch.randn(n, device=device)),
        (f"torch.randn float64 {where}", n, "Gaussians",
         lambda: torch.randn(n, dtype=torch.float64, device=device)),
        ("ChaCha20 keystream (OpenSSL)", 8 * n, "bytes", keystream),
    ]
    for k in [int(t) for t in args.noise_threads.split(",") if t.strip() and int(t) > 1]:
        pool = NoiseWorkers(k)
        cases[3:3] = [
            (f"host gaussian float64, {k} threads", n, "Gaussians",
             lambda pool=pool: gaussian(key, 1, "w", n, dtype=torch.float64, generator="host", workers=pool)),
            (f"host add noise float32, {k} threads", n, "Gaussians",
             lambda pool=pool: add_gaussian_noise_(on_host, key, 1, "w", 1.0, generator="host", workers=pool)),
        ]
    if device.type != "cpu":
        cases.insert(6, (f"host add noise f32, tensor {where}", n, "Gaussians",
                         lambda: add_gaussian_noise_(on_device, key, 1, "w", 1.0, generator="host")))
    rows = [(label, units, unit, *measure(fn, args.reps, device)) for label, units, unit, fn in cases]

    shapes = llama_shapes(args.layers, args.hidden, args.intermediate, args.vocab)
    grads = {name: torch.zeros(shape, device=device) for name, shape in shapes.items()}
    total = sum(g.numel() for g in grads.values())

    def noise_model(generator: str) -> Callable[[], None]:
        def run() -> None:
            for name, grad in grads.items():
                add_gaussian_noise_(grad, key, 1, name, std=1.0, generator=generator)
        return run

    def randn_model() -> None:
        for grad in grads.values():
            grad.add_(torch.randn(grad.shape, device=device))

    model_rows = [
        ("add_gaussian_noise_, auto" + (" (host)" if device.type == "cpu" else " (torch)"), noise_model("auto")),
        ("add_gaussian_noise_, " + ("torch" if device.type == "cpu" else "host"),
         noise_model("torch" if device.type == "cpu" else "host")),
        ("grad.add_(torch.randn(...))", randn_model),
    ]
    model_times = [(label, *measure(fn, args.reps, device)) for label, fn in model_rows]

    print(f"torch {torch.__version__}, device {device}, {args.threads} CPU thread(s), medians of {args.reps} "
          f"runs, {n:,} elements per run")
    print(f"{'what':40s} {'rate (wall)':>18s} {'rate (CPU)':>18s}")
    for label, units, unit, wall, cpu in rows:
        scale, suffix = (1e9, "GB/s") if unit == "bytes" else (1e6, "M/s")
        wall_rate, cpu_rate = units / wall / scale, units / cpu / scale
        print(f"{label:40s} {wall_rate:13.1f} {suffix:4s} {cpu_rate:13.1f} {suffix:4s}")
    print()
    print(f"one step of noise for a Llama of {total:,} parameters ({len(shapes)} tensors) on {device}:")
    print(f"{'what':40s} {'wall s':>10s} {'CPU s':>10s}")
    for label, wall, cpu in model_times:
        print(f"{label:40s} {wall:10.3f} {cpu:10.3f}")
    if device.type == "cpu":
        print()
        print("what the step waits for, host gradients of that Llama (median of --reps steps):")
        for label, wall, cpu in step_waits(grads, key, args.reps):
            print(f"{label:40s} {wall:10.3f} {cpu:10.3f}")


def step_waits(grads: dict[str, torch.Tensor], key: NoiseKey, reps: int) -> list[tuple[str, float, float]]:
    """The noise's time at the step: drawn there, against drawn ahead (all of it ready: the thread
    is waited for before the clock starts) and only added there."""
    ahead = NoiseAhead(key, NoiseAheadOptions(max_mb=1024))
    walls, cpus = {"at": [], "ahead": []}, {"at": [], "ahead": []}
    for step in range(reps + 1):
        for where in ("at", "ahead"):
            if where == "ahead":
                ahead.prepare(step, 1.0)
                plan = ahead._shared.plan
                with ahead._shared.cond:
                    while plan is not None and len(plan.drawn) < len(plan.pieces):
                        ahead._shared.cond.wait(0.1)
            add_noise = ahead.noise_fn(step, 1.0) if where == "ahead" else None
            wall, cpu = time.perf_counter(), time.process_time()
            for name, grad in grads.items():
                if where == "ahead":
                    add_noise(name, grad.view(-1), 0)
                else:
                    add_gaussian_noise_(grad, key, step, name, std=1.0)
            if step:  # step 0 records the requests (drawn at the step)
                walls[where].append(time.perf_counter() - wall)
                cpus[where].append(time.process_time() - cpu)
    peak = ahead.last_peak_bytes
    ahead.close()
    return [(f"(noise held ahead at the peak: {peak / 2**20:.1f} MiB)", 0.0, 0.0),
            ("noise drawn at the step", statistics.median(walls["at"]), statistics.median(cpus["at"])),
            ("noise drawn ahead, added at the step", statistics.median(walls["ahead"]),
             statistics.median(cpus["ahead"]))]


if __name__ == "__main__":
    main()
