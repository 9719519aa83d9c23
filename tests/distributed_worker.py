"""One rank of a multi-process test, started by tests/test_distributed.py with the environment a
launcher sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT):

    python tests/distributed_worker.py spec.json

``run(spec, rank, world_size)`` is also called in the test process itself with world_size=1 for
the single-process reference; the model, data, loss and optimizer are the same code. Each rank
writes its final trainable parameters to ``{out}/rank{r}.pt``.

spec keys: case ("ddp", "accelerate", "model_parallel"), model ("gpt2", "mlp"), subset ("full",
"bias", "lora"), clipping, batches (explicit global index lists, or null for the engine's Poisson
loader), steps, die_at_step (a rank that exits before that step's optimizer.step), timeout_s,
own_keys (plain DDP with noise_key=None: each rank generates its own key), users (user-level DP:
the engine's loader draws the users of USERS, examples_per_user=2), nan_example (the mlp
dataset's example of that index has a NaN input).
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dpscale import DPConfig, PrivacyEngine  # noqa: E402
from dpscale.backends import DataParallelBackend  # noqa: E402
from dpscale.driver import run_logical_step  # noqa: E402
from dpscale.losses import causal_lm_losses  # noqa: E402
from dpscale.noise import NoiseKey  # noqa: E402
from dpscale.sampling import LogicalBatch, MicroBatches, PoissonBatchSampler  # noqa: E402

KEY = NoiseKey(bytes(range(32)))
N, T, VOCAB, MICRO = 24, 6, 32, 2
HIDDEN, OUT = 8, 4
# the user of each example: 10 users with 1 to 3 examples, not adjacent
USERS = [i % 7 for i in range(20)] + [7, 7, 8, 9]


def config(spec: dict) -> DPConfig:
    # Explicit batches (spec["batches"]) are the test's own draw, declared as such.
    by_user = {"privacy_unit": "user", "examples_per_user": 2} if spec.get("users") else {}
    return DPConfig(max_grad_norm=spec.get("max_grad_norm", 0.5), expected_batch_size=6,
                    noise_multiplier=spec.get("noise_multiplier", 1.0),
                    dataset_size=len(set(USERS)) if spec.get("users") else N,
                    clipping=spec.get("clipping", "flat"),
                    sampling_declared_by_user=spec.get("batches") is not None, **by_user)


# models ------------------------------------------------------------------------------------------


def gpt2(subset: str) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).float()
    if subset == "bias":
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith("bias"))
    elif subset == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"],
                                                 lora_dropout=0.0, init_lora_weights=False, fan_in_fan_out=True))
    model.train()
    return model


class _GatherColumns(torch.autograd.Function):
    """All-gather of column-parallel outputs along the last dim; backward keeps this rank's slice
    (everything after the gather is replicated, so each rank already holds the full gradient)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.rank, ctx.width = dist.get_rank(group), x.shape[-1]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad[..., ctx.rank * ctx.width : (ctx.rank + 1) * ctx.width], None


class _CopyToShards(torch.autograd.Function):
    """Identity forward into a column-parallel layer; backward sums the input gradient over the
    ranks (each rank's shard contributes only its outputs' part)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class CopyToShards(nn.Module):
    def __init__(self, group) -> None:
        super().__init__()
        self.group = group

    def forward(self, x):
        return _CopyToShards.apply(x, self.group)


class Gather(nn.Module):
    def __init__(self, group) -> None:
        super().__init__()
        self.group = group

    def forward(self, x):
        return _GatherColumns.apply(x, self.group)


def mlp(group=None) -> tuple[nn.Module, dict[str, int]]:
    """LayerNorm(6) -> Linear(6, 8) -> Tanh -> Linear(8, 4). With ``group``, each Linear is split
    by output rows over it (Megatron's column-parallel layer: the input gradient is summed over the
    group, the outputs all-gathered) while the LayerNorm stays replicated on every rank, so the
    engine must add its squared norms once, not once per rank. The names match the unsharded
    model's, so the keyed noise does too."""
    torch.manual_seed(0)
    full = nn.Sequential(nn.LayerNorm(6), nn.Identity(), nn.Linear(6, HIDDEN), nn.Identity(), nn.Tanh(),
                         nn.Identity(), nn.Linear(HIDDEN, OUT), nn.Identity())
    with torch.no_grad():
        full[0].weight.uniform_(0.5, 1.5)
        full[0].bias.uniform_(-0.5, 0.5)
    if group is None:
        return full, {}
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    offsets = {}
    for index in (2, 6):
        layer = full[index]
        rows = layer.out_features // world
        shard = nn.Linear(layer.in_features, rows)
        with torch.no_grad():
            shard.weight.copy_(layer.weight[rank * rows : (rank + 1) * rows])
            shard.bias.copy_(layer.bias[rank * rows : (rank + 1) * rows])
        full[index - 1] = CopyToShards(group)
        full[index] = shard
        full[index + 1] = Gather(group)
        offsets[f"{index}.weight"] = rank * rows * layer.in_features
        offsets[f"{index}.bias"] = rank * rows
    return full, offsets


def dataset(kind: str, nan_example: int | None = None):
    g = torch.Generator().manual_seed(1)
    if kind == "mlp":
        x = torch.randn(N, 6, generator=g)
        if nan_example is not None:  # its loss and gradient are NaN: the non-finite rule drops it
            x[nan_example, 0] = torch.nan
        return torch.utils.data.TensorDataset(x, torch.randn(N, OUT, generator=g))
    return torch.utils.data.TensorDataset(torch.randint(0, VOCAB, (N, T), generator=g))


def losses(kind: str, model: nn.Module, micro) -> torch.Tensor:
    if kind == "mlp":
        x, y = micro
        return (model(x) - y).pow(2).sum(1)
    (ids,) = micro
    return causal_lm_losses(model(input_ids=ids).logits, ids)


# the run -----------------------------------------------------------------------------------------


def global_batches(spec: dict) -> list[list[int]]:
    """The reference's batches: the explicit ones, or the engine's Poisson draw on one process."""
    if spec.get("batches") is not None:
        return spec["batches"]
    cfg = config(spec)
    sampler = PoissonBatchSampler(N, cfg.sample_rate, seed=KEY.derive_seed("sampling"))  # the engine loader's draw
    return [sampler.global_batch(t) for t in range(spec.get("steps", 2))]


def run(spec: dict, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
    """Train ``steps`` logical steps; returns the final trainable parameters (this rank's)."""
    case, kind = spec.get("case", "ddp"), spec.get("model", "gpt2")
    data = dataset(kind, spec.get("nan_example"))
    accelerator = None
    if case == "model_parallel" and world_size > 1:
        # Both ranks see every example; each holds half of each Linear. Data-parallel groups are
        # one rank each (every rank must create every group, in the same order).
        singles = [dist.new_group([r]) for r in range(world_size)]
        model, offsets = mlp(dist.group.WORLD)
        backend = DataParallelBackend(singles[rank], shard_offsets=offsets, model_parallel_group=dist.group.WORLD)
        engine = PrivacyEngine(model, config(spec), noise_key=KEY, backend=backend)
        optimizer = engine.attach_optimizer(torch.optim.SGD(engine.parameters.values(), lr=0.5))
        share = (0, 1)  # (this rank's position, ranks sharing the batch): all examples
    else:
        model = mlp()[0] if kind == "mlp" else gpt2(spec.get("subset", "full"))
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        if case == "accelerate":
            from accelerate import Accelerator
            from accelerate.utils import InitProcessGroupKwargs

            from dpscale.integrations.accelerate import make_data_loader, make_private

            timeout = datetime.timedelta(seconds=spec.get("timeout_s", 30))
            accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)])
            assert accelerator.num_processes == world_size, (accelerator.num_processes, world_size)
            model, optimizer = accelerator.prepare(model, optimizer)
            engine = make_private(accelerator, model, optimizer, config(spec), noise_key=KEY)
        else:
            if world_size > 1:
                model = nn.parallel.DistributedDataParallel(model)
            # own_keys: every rank with a key of its own, which the backend must refuse; no_key: no key
            # at all, refused when the key is loaded (several processes need one shared key file)
            key = NoiseKey.generate() if spec.get("own_keys") else None if spec.get("no_key") else KEY
            engine = PrivacyEngine(model, config(spec), noise_key=key)
            engine.attach_optimizer(optimizer)
        share = (rank, world_size)
    if spec.get("batches") is None:
        if accelerator is not None:
            loader = make_data_loader(accelerator, engine, data, max_physical_batch_size=MICRO)
        else:
            # The engine's default split is the backend's data-parallel position: (rank, world) under
            # DDP, (0, 1) for the model-parallel ranks, which share every example.
            users = {"user_ids": USERS} if spec.get("users") else {}
            loader = engine.make_data_loader(data, max_physical_batch_size=MICRO, **users)
            split = (loader.batch_sampler.rank, loader.batch_sampler.world_size)
            assert split == share, (split, share)
        logical_batches = (batch for _, batch in zip(range(spec.get("steps", 2)), loader))
    else:
        logical_batches = (
            _own_batch(data, batch[share[0] :: share[1]], step) for step, batch in enumerate(spec["batches"])
        )
    for step, logical_batch in enumerate(logical_batches):
        run_logical_step(engine, logical_batch, lambda micro: losses(kind, model, micro), close_step=False)
        if spec.get("die_at_step") == step and rank == spec.get("dying_rank", 1):
            os._exit(3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    params = {n: p.detach().clone() for n, p in engine.parameters.items()}
    engine.detach()
    if isinstance(model, nn.parallel.DistributedDataParallel):
        assert model.require_backward_grad_sync, "detach() must give DDP its gradient sync back"
    return params


def _own_batch(data, indices: list[int], step: int) -> LogicalBatch:
    """A logical batch the test drew itself (declared sampling), micro-batched like the loader's."""
    chunks = [indices[start : start + MICRO] for start in range(0, len(indices), MICRO)]
    return LogicalBatch(
        step, tuple(indices), len(indices), MicroBatches(data, torch.utils.data.default_collate, chunks)
    )


def main() -> None:
    torch.set_num_threads(1)
    spec = json.loads(open(sys.argv[1]).read())
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if spec.get("case") != "accelerate":
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=spec.get("timeout_s", 30)))
    params = run(spec, rank, world_size)
    torch.save(params, os.path.join(spec["out"], f"rank{rank}.pt"))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
