"""Where a DeepSpeed ZeRO-2 DP step's time goes, against non-private ZeRO-2 on the same tiny Llama
as bench_scaleout.py: the forward and engine backward, the hand-over of the clipped sums to
DeepSpeed, DeepSpeed's reduction (its IPG buckets), the keyed noise in the base optimizer's
pre-hook, and the optimizer step.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 benchmarks/zero2_phases.py      # batch 8, 3 rounds of 3 steps
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 benchmarks/zero2_phases.py --stage 3

Timers wrap dpscale's and DeepSpeed's methods from outside (this script only); rank 0 prints the
median step time of each mode and, per mode, the seconds per step spent in each wrapped call
(a call nested in another wrapped call is counted in both; a name missing from the installed
version is skipped and listed).
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

from bench_scaleout import local_batches, zero_mode  # noqa: E402
from phase_timing import add_noise_ahead_flag, time_rounds, wrap_methods  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="global batch (default %(default)d)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stage", type=int, default=2, choices=(1, 2, 3))
    add_noise_ahead_flag(parser)
    cli = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed("gloo")
    world = dist.get_world_size()
    args = argparse.Namespace(small=False, seed=0, batch=cli.batch, seq=cli.seq, world=world, optimizer="sgd",
                              lr=1e-4, max_grad_norm=1.0, noise_multiplier=1.0, rmsnorm_rule="builtin",
                              noise_ahead=cli.noise_ahead)
    import deepspeed.runtime.engine as ds_engine_module

    import dpscale.backends.deepspeed as ds_backend
    import dpscale.engine as engine
    if cli.stage == 3:
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as ZeroOptimizer
        reductions = ("reduce_ipg_grads", "independent_gradient_partition_epilogue")
    else:
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer as ZeroOptimizer
        reductions = ("reduce_ipg_grads", "reduce_independent_p_g_buckets_and_remove_grads",
                      "overlapping_partition_gradients_reduce_epilogue")

    spent: dict[str, list[float]] = {}
    current = ["warm-up"]
    targets = [(engine.PrivacyEngine, "backward"),
               (ds_backend.DeepSpeedBackend, "accumulate"), (ds_backend.DeepSpeedBackend, "_hand_over"),
               (ds_backend.DeepSpeedBackend, "_pre_step"), (ds_backend.DeepSpeedBackend, "_noise"),
               (ds_engine_module.DeepSpeedEngine, "backward"), (ds_engine_module.DeepSpeedEngine, "step"),
               (ds_engine_module.DeepSpeedEngine, "forward"), (ZeroOptimizer, "step")]
    targets += [(ZeroOptimizer, name) for name in reductions]
    missing = wrap_methods(targets, spent, current)
    modes = {"dp": zero_mode(args, cli.stage, True), "nonprivate": zero_mode(args, cli.stage, False)}
    batches = local_batches(args, 3, dist.get_rank())
    steps = time_rounds(modes, batches, cli.rounds, spent, current)
    if dist.get_rank() == 0:
        medians = {name: round(statistics.median(times), 4) for name, times in steps.items()}
        sys.stdout.write(f"ZeRO-{cli.stage}, global batch {cli.batch}, seq {cli.seq}, {world} ranks\n")
        sys.stdout.write(f"median step s: {medians}; DP / non-private {medians['dp'] / medians['nonprivate']:.3f}\n")
        for name, times in sorted(spent.items()):
            mode = name.split(":")[0]
            sys.stdout.write(f"{name}: {sum(times) / len(steps[mode]):.4f} s per step ({len(times)} calls)\n")
        if missing:
            sys.stdout.write(f"not in this version (skipped): {', '.join(missing)}\n")
    for mode in modes.values():
        mode.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
