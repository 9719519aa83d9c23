"""Where an FSDP2 DP step's time goes: the backward, the step boundary (noise, layout,
reduce-scatter), and the whole step against non-private FSDP2, on bench_scaleout.py's tiny Llama.

    torchrun --nproc_per_node 2 benchmarks/fsdp2_phases.py            # batch 8, 3 rounds of 3 steps

Timers wrap the FSDP2 backend's and the engine's methods from outside (this script only); rank 0
prints the median step times and the seconds per step spent in each wrapped call (calls nested in
another wrapped call are counted in both).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_scaleout import fsdp2_mode, local_batches  # noqa: E402
from phase_timing import add_noise_ahead_flag, time_rounds, wrap_methods  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    add_noise_ahead_flag(parser)
    cli = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    args = argparse.Namespace(small=False, seed=0, batch=cli.batch, seq=cli.seq, world=world, optimizer="sgd", lr=1e-4,
                              max_grad_norm=1.0, noise_multiplier=1.0, rmsnorm_rule="builtin",
                              noise_ahead=cli.noise_ahead)
    import dpscale.backends.fsdp2 as fsdp2
    import dpscale.engine as engine

    spent: dict[str, list[float]] = {}
    wrap_methods(((fsdp2.FSDP2Backend, "write_gradients"), (fsdp2.FSDP2Backend, "_reduce"),
                  (fsdp2.FSDP2Backend, "_absorb"), (fsdp2.FSDP2Backend, "accumulate"),
                  (fsdp2.FSDP2Backend, "_reshard"), (engine.PrivacyEngine, "backward")), spent)
    modes = {"dp": fsdp2_mode(args, True), "nonprivate": fsdp2_mode(args, False)}
    batches = local_batches(args, 3, dist.get_rank())
    steps = time_rounds(modes, batches, cli.rounds, spent)
    if dist.get_rank() == 0:
        medians = {name: round(statistics.median(times), 4) for name, times in steps.items()}
        sys.stdout.write(f"median step s: {medians}\n")
        for name, times in spent.items():
            sys.stdout.write(f"{name}: {sum(times) / len(steps['dp']):.4f} s per DP step ({len(times)} calls)\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
