"""Peak resident memory of FSDP2 training, DP against non-private, on bench_scaleout.py's tiny Llama:
one mode per run (a process's peak RSS covers its whole life), the largest over the ranks.

    MALLOC_MMAP_THRESHOLD_=65536 torchrun --nproc_per_node 2 benchmarks/fsdp2_memory.py --mode nonprivate
    MALLOC_MMAP_THRESHOLD_=65536 torchrun --nproc_per_node 2 benchmarks/fsdp2_memory.py --mode dp [--bucket-elements N]

(MALLOC_MMAP_THRESHOLD_ makes glibc return freed blocks, so that repeated runs agree to about a MiB;
see BENCHMARKS.md.)
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_scaleout import fsdp2_mode, local_batches  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("dp", "nonprivate"), required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--bucket-elements", type=int, default=None, help="FSDP2Backend's bucket size")
    parser.add_argument("--noise-ahead", type=int, default=1, metavar="THREADS",
                        help="threads drawing the next step's noise while it runs (the default); 0: at the step")
    cli = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    args = argparse.Namespace(small=False, seed=0, batch=cli.batch, seq=cli.seq, world=dist.get_world_size(),
                              optimizer="sgd", lr=1e-4, max_grad_norm=1.0, noise_multiplier=1.0, rmsnorm_rule="builtin",
                              noise_ahead=cli.noise_ahead)
    if cli.bucket_elements:
        from dpscale.backends.fsdp2 import FSDP2Backend

        FSDP2Backend.__init__.__kwdefaults__["bucket_elements"] = cli.bucket_elements  # this process only
    mode = fsdp2_mode(args, cli.mode == "dp")
    for ids in local_batches(args, cli.steps, dist.get_rank()):
        mode.step(ids)
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        sys.stdout.write(f"{cli.mode}: peak RSS {float(peak):.1f} MiB (largest rank)\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
