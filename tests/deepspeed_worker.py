"""One rank of a DeepSpeed test, started by tests/test_deepspeed.py through torchrun:

    torchrun --nproc_per_node 2 tests/deepspeed_worker.py SPEC.json

SPEC keys: runs (list of partial specs run in turn, each with a "name" prefixing its files), stage
(0-3), clippings (list of "flat" / "per_layer"), out (directory), bf16 (bool), optimizer ("sgd", or
"cpu_adam": DeepSpeedCPUAdam, against torch Adam in the reference), ds_overrides (dict merged into
the DeepSpeed config), expect_error (substring: the run must raise a dpscale ConfigError containing
it before training).

``reference(clipping)`` is the single-process LocalBackend run on the same global batches, the
same key and the same optimizer; the test calls it in its own process. Rank 0 writes
``{out}/{clipping}.pt``: the full fp32 parameters after the steps (DeepSpeed's fp32 master
weights under bf16), and the engine's step count.

``reference(clipping, bf16=True)`` applies the rounding DeepSpeed's bf16 ZeRO applies, in one
process: a bf16 model (bf16 forward, backward and clipped sums, accumulated in bf16 ``p.grad``),
gradients widened to fp32, fp32 noise, and the optimizer stepping fp32 master weights (copied from
the bf16-cast model, as DeepSpeed does) that are rounded to bf16 for the next forward.
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dpscale import ConfigError, DPConfig, LocalBackend, PrivacyEngine  # noqa: E402
from dpscale.driver import run_logical_step  # noqa: E402
from dpscale.noise import NoiseKey  # noqa: E402
from dpscale.sampling import LogicalBatch, MicroBatches  # noqa: E402

KEY = NoiseKey(bytes(range(32)))
B, N = 8, 100
LR, MOMENTUM = 0.5, 0.9

# Global batches: per step, per rank, the micro-batches (example indices). Rank 1's draw in the
# second step is empty: it must still take part in the reduction and the step.
STEPS = [
    {0: [[0, 1, 2], [3, 4]], 1: [[5, 6, 7]]},
    {0: [[8, 9, 10, 11], [12, 13]], 1: []},
]


def config(clipping: str) -> DPConfig:
    # STEPS are the test's own batches (the same on one and two processes), declared as such.
    return DPConfig(max_grad_norm=0.3, expected_batch_size=B, noise_multiplier=0.8, dataset_size=N, clipping=clipping,
                    sampling_declared_by_user=True)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    # 56 + 16 + 27 = 99 elements: ZeRO partitions of 2 ranks cut through parameters.
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3))


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(14, 6, generator=g), torch.randn(14, 3, generator=g)


def losses(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (module(x) - y).pow(2).sum(1)


def torch_optimizer(name: str, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    if name == "cpu_adam":  # the reference for DeepSpeedCPUAdam (weight decay 0: Adam and AdamW agree)
        return torch.optim.Adam(params, lr=ADAM_LR)
    raise ValueError(name)


ADAM_LR = 0.05


def reference(clipping: str, bf16: bool = False, optimizer: str = "sgd") -> dict[str, torch.Tensor]:
    model = make_model()
    x, y = data()
    if not bf16:
        engine = PrivacyEngine(model, config(clipping), noise_key=KEY)
        opt = engine.attach_optimizer(torch_optimizer(optimizer, model.parameters()))
        for step in STEPS:
            for rank in sorted(step):
                for micro in step[rank]:
                    engine.backward(losses(model, x[micro], y[micro]))
            opt.step()
            opt.zero_grad(set_to_none=True)
        return {n: p.detach().clone() for n, p in model.named_parameters()}
    model = model.to(torch.bfloat16)  # DeepSpeed casts the module first, then copies fp32 masters from it
    masters = {n: nn.Parameter(p.detach().float()) for n, p in model.named_parameters()}
    engine = PrivacyEngine(model, config(clipping), noise_key=KEY, backend=_MasterWeights(masters))
    opt = torch_optimizer(optimizer, masters.values())
    for step in STEPS:
        for rank in sorted(step):
            for micro in step[rank]:
                engine.backward(losses(model, x[micro].bfloat16(), y[micro].bfloat16()))
        engine.backend.close()  # the step's checks and accounting; noise on the fp32 gradients of the masters
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(masters[n])
                p.grad = None
    return {n: p.detach().clone() for n, p in masters.items()}


class _MasterWeights(LocalBackend):
    """Single-process backend for the bf16 reference: clipped sums accumulate in bf16 (as under
    DeepSpeed), then are widened to fp32 on the master weights, where the noise goes. It owns the
    step as DeepSpeed does: the reference calls ``close()`` (the engine's ``close_step``, as
    DeepSpeed's base-optimizer pre-hook does) and then steps the masters' optimizer."""

    owns_step = True

    def __init__(self, masters: dict[str, nn.Parameter]) -> None:
        super().__init__()
        self.masters = masters
        self._close_step = None

    def bind(self, context) -> list:
        self._close_step = context.close_step
        return super().bind(context)

    def accumulate(self, name, clipped) -> None:
        if clipped is None:
            return
        p = self._parameters[name]
        clipped = clipped.tensor().reshape(p.shape).to(p.dtype)  # a ClippedSum: computed here
        held = self._sums.get(name)
        self._sums[name] = clipped if held is None else held + clipped

    def close(self) -> None:
        add_noise = self._close_step()
        sums, self._sums = self._sums, {}
        for name, p in self._parameters.items():
            held = sums.get(name)
            grad = torch.zeros(p.shape) if held is None else held.float()
            add_noise(name, grad.view(-1), 0)
            self.masters[name].grad = grad


def ds_config(stage: int, bf16: bool, overrides: dict) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "zero_optimization": {
            "stage": stage,
            "reduce_bucket_size": 40,  # several buckets for 99 elements
            "allgather_bucket_size": 40,
            "stage3_param_persistence_threshold": 0,  # partition even tiny parameters
            "sub_group_size": 40,  # several ZeRO-3 sub-groups: several base optimizer calls per step
        },
    }
    if bf16:
        cfg["bf16"] = {"enabled": True}
    for key, value in overrides.items():
        if value is None:
            cfg.pop(key, None)
        elif isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def run(spec: dict) -> None:
    import deepspeed
    import torch.distributed as dist

    from dpscale.backends.deepspeed import DeepSpeedBackend

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, f"expected 2 processes, got {world}"
    x, y = data()
    for clipping in spec["clippings"]:
        model = make_model()
        if spec.get("optimizer", "sgd") == "cpu_adam":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(model.parameters(), lr=ADAM_LR)
        else:
            optimizer = torch_optimizer(spec.get("optimizer", "sgd"), model.parameters())
        ds_engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer,
            config=ds_config(spec["stage"], spec.get("bf16", False), spec.get("ds_overrides", {})),
        )
        try:
            backend = DeepSpeedBackend(ds_engine)
            engine = PrivacyEngine(ds_engine.module, config(clipping), backend=backend, noise_key=KEY)
        except ConfigError as error:
            if spec.get("expect_error") and spec["expect_error"] in str(error):
                if rank == 0:
                    with open(os.path.join(spec["out"], f"{spec.get('name', '')}refused.txt"), "w") as f:
                        f.write(str(error))
                return
            raise
        assert not spec.get("expect_error"), "the DeepSpeed config was not refused"
        dtype = torch.bfloat16 if spec.get("bf16") else torch.float32
        for step in STEPS:
            # The step driver: ZeRO-3's padding passes (the first example, sums dropped), one
            # accumulation block, then ds_engine.step().
            rows = torch.utils.data.TensorDataset(x.to(dtype), y.to(dtype))
            batch = LogicalBatch(
                engine.steps_taken, (), 0, MicroBatches(rows, torch.utils.data.default_collate, step[rank])
            )
            run_logical_step(engine, batch, lambda micro, ds_engine=ds_engine: losses(ds_engine.module, *micro))
        assert ds_engine.global_steps == len(STEPS), ds_engine.global_steps
        assert engine.steps_taken == len(STEPS), engine.steps_taken
        params = dict(ds_engine.module.named_parameters())
        if spec.get("bf16"):
            from deepspeed.utils import safe_get_full_fp32_param  # the fp32 master weights

            full = {
                n: safe_get_full_fp32_param(p).detach().float().clone().reshape(_shape(p)) for n, p in params.items()
            }
        else:
            with deepspeed.zero.GatheredParameters(list(params.values())) if spec["stage"] == 3 else _null():
                full = {n: p.detach().float().clone() for n, p in params.items()}
        if rank == 0:
            torch.save({"params": full, "steps_taken": engine.steps_taken},
                       os.path.join(spec["out"], f"{spec.get('name', '')}{clipping}.pt"))
        engine.detach()
        ds_engine.destroy()
    dist.barrier()


def _shape(p):
    return getattr(p, "ds_shape", p.shape)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    # "runs": several configurations in one launch (one process group), each a partial spec
    # whose results are written as {out}/{name}{clipping}.pt.
    for sub in spec.pop("runs", [{}]):
        run({**spec, **sub})
    from worker_exit import finish

    finish()
