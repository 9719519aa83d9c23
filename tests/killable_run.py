"""A training run through the step driver that a test kills with SIGKILL and reruns:

    python tests/killable_run.py OUT KEY_FILE STEPS [COLLECTIVE_TIMEOUT_S]

With WORLD_SIZE > 1 in the environment (a launcher's), each process is one DDP rank over gloo with
that collective timeout; rank 0 writes the checkpoint and prints the steps.

A small MLP with dropout (so the global RNG matters), AdamW (so optimizer state matters), the
engine's Poisson loader (so its position matters). After every step it writes one sealed
checkpoint (parameters, optimizer, RNG and the engine's privacy state in one atomic file, so no
kill can leave the parts at different steps) and prints ``step k``. A rerun resumes from it. At
the end it writes ``final.pt``: the parameters and epsilon.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dpscale import DPConfig, PrivacyEngine  # noqa: E402
from dpscale.checkpoint import load_state, save_atomic  # noqa: E402
from dpscale.driver import run_steps  # noqa: E402

N, B = 64, 8


def main() -> None:
    torch.set_num_threads(1)
    out, key, steps = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Dropout(0.2), nn.Linear(32, 4))
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(N, 8, generator=g), torch.randn(N, 4, generator=g))
    config = DPConfig(max_grad_norm=1.0, expected_batch_size=B, noise_multiplier=1.0, dataset_size=N, steps=steps)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    wrapped = model
    if world > 1:
        timeout = datetime.timedelta(seconds=float(sys.argv[4]))
        torch.distributed.init_process_group("gloo", timeout=timeout)
        wrapped = nn.parallel.DistributedDataParallel(model)
    engine = PrivacyEngine(wrapped, config, noise_key=key)
    engine.attach_optimizer(optimizer)
    loader = engine.make_data_loader(data, max_physical_batch_size=4)
    checkpoint = out / "checkpoint.pt"
    if checkpoint.exists():
        state = load_state(checkpoint, kind="train-state")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        engine.load_state_dict(state["privacy"])
        print(f"resumed {engine.steps_taken}", flush=True)

    def losses(micro):
        x, y = micro
        return (wrapped(x) - y).pow(2).sum(1)

    def on_step(_outcome) -> None:
        if rank:
            return
        save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                     "privacy": engine.state_dict()}, checkpoint, kind="train-state")
        print(f"step {engine.steps_taken}", flush=True)

    run_steps(engine, loader, losses, max_steps=steps - engine.steps_taken, on_step=on_step)
    if rank == 0:
        torch.save({"params": {n: p.detach().clone() for n, p in model.named_parameters()},
                    "epsilon": engine.epsilon(), "steps": engine.steps_taken}, out / "final.pt")
        print("done", flush=True)
    if world > 1:
        from tests.worker_exit import finish

        finish()


if __name__ == "__main__":
    main()
