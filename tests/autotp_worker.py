"""One rank of the DeepSpeed AutoTP test (tests/test_deepspeed.py), through torchrun:

    torchrun --nproc_per_node 2 tests/autotp_worker.py SPEC.json

Ranks pair up in tensor-parallel groups of 2 (autotp_size 2; with 4 processes, 2 data-parallel
replicas of 2 ranks each): every Linear of
a tiny Llama with attention and MLP biases is split over them (q/k/v, gate/up by rows, o/down by
columns), so each example's gradient is spread over both ranks and the engine must all-reduce the
squared norms of the shards (only theirs: embeddings, norms, the head and the row-split layers'
biases are replicated). The two ranks of a group see the same examples. Rank 0 writes the full parameters,
shards reassembled, to {out}/{clipping}.pt; ``reference(clipping)`` is the unsharded single-process
run on the same batches and key.

SPEC keys: out, stage (0-3), clippings.
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dpscale import DPConfig, PrivacyEngine  # noqa: E402
from dpscale.losses import causal_lm_losses  # noqa: E402
from dpscale.noise import NoiseKey  # noqa: E402

KEY = NoiseKey(bytes(range(32)))
VOCAB, T = 64, 8
STEPS = [[[0, 1, 2], [3, 4]], [[5, 6, 7, 8]]]  # per step, the micro-batches (example indices)
LR = 0.5


def config(clipping: str) -> DPConfig:
    return DPConfig(max_grad_norm=0.5, expected_batch_size=5, noise_multiplier=0.7, clipping=clipping)


def make_model() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, attention_bias=True, mlp_bias=True,
                      max_position_embeddings=16, use_cache=False)
    return LlamaForCausalLM(cfg).float().train()


def data() -> torch.Tensor:
    return torch.randint(0, VOCAB, (9, T), generator=torch.Generator().manual_seed(1))


def train(model: nn.Module, engine: PrivacyEngine, step_fn, accumulate, dp_rank: int = 0, dp_world: int = 1) -> None:
    """Each data-parallel replica takes examples dp_rank::dp_world of every global batch, in one
    micro-batch (the same count on every rank, as ZeRO-3 needs; the reference, one replica, uses
    the global micro-batches)."""
    ids = data()
    for micros in STEPS:
        if dp_world > 1:
            local = [i for micro in micros for i in micro][dp_rank::dp_world]
            micros = [local]
        with accumulate():
            for micro in micros:
                engine.backward(causal_lm_losses(model(input_ids=ids[micro]).logits, ids[micro]))
        step_fn()


def reference(clipping: str) -> dict[str, torch.Tensor]:
    from contextlib import nullcontext

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    engine = PrivacyEngine(model, config(clipping), noise_key=KEY, optimizer=optimizer)

    def step():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    train(model, engine, step, nullcontext)
    engine.detach()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def full_parameters(module: nn.Module, layouts, group) -> dict[str, torch.Tensor]:
    """Every parameter at full size: shards all-gathered over the tensor-parallel group."""
    import torch.distributed as dist

    out = {}
    for name, p in module.named_parameters():
        value = p.detach().float().contiguous()
        layout = layouts.get(name)
        if layout is not None:
            pieces = [torch.empty_like(value) for _ in range(dist.get_world_size(group))]
            dist.all_gather(pieces, value, group=group)
            value = torch.cat(pieces, dim=layout.dim)
            assert tuple(value.shape) == layout.full_shape, (name, value.shape, layout.full_shape)
        out[name] = value
    return out


def run(spec: dict) -> None:
    import deepspeed
    import torch.distributed as dist

    from dpscale.backends.deepspeed import DeepSpeedBackend

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    for clipping in spec["clippings"]:
        model = make_model()
        ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
                     "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
                     "zero_optimization": {"stage": spec["stage"]}, "tensor_parallel": {"autotp_size": 2}}
        ds_engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                             config=ds_config)
        module = ds_engine.module
        kinds = {type(m).__name__ for m in module.modules()}
        assert {"LinearLayer", "LinearAllreduce"} <= kinds, kinds  # AutoTP really split the layers
        backend = DeepSpeedBackend(ds_engine)
        engine = PrivacyEngine(module, config(clipping), backend=backend, noise_key=KEY)
        assert engine.backend.model_parallel_group is not None and len(engine.backend.sharded_parameters) >= 12, (
            sorted(engine.backend.sharded_parameters)
        )
        assert dist.get_world_size() == 2 * backend.world_size  # tensor parallel 2 x data parallel
        train(module, engine, ds_engine.step, backend.accumulation, backend.rank, backend.world_size)
        assert engine.steps_taken == len(STEPS)
        if spec["stage"] == 3:
            with deepspeed.zero.GatheredParameters(list(module.parameters())):
                full = full_parameters(module, backend._layouts, engine.backend.model_parallel_group)
        else:
            full = full_parameters(module, backend._layouts, engine.backend.model_parallel_group)
        if rank == 0:
            torch.save(full, os.path.join(spec["out"], f"{clipping}.pt"))
        engine.detach()
        ds_engine.destroy()
    dist.barrier()


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        run(json.load(f))
    from worker_exit import finish

    finish()
