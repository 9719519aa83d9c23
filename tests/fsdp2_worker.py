"""One rank of an FSDP2 test, started by tests/test_fsdp2.py (tests/launcher.py sets RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT):

    python tests/fsdp2_worker.py spec.json

``run(spec, rank, world_size)`` is also called in the test process with world_size=1 for the
reference: the same model, data, key and optimizer, unsharded, on the plain engine (LocalBackend).
With world_size > 1, ``fully_shard`` is applied to the layers and then to the root, and each rank
takes its part (``batch[rank::world]``) of the same global batches. Rank 0 writes ``{out}/params.pt``
(the full parameters after the steps, gathered from the shards) and ``{out}/steps.pt``.

spec keys: model ("mlp": Linear layers whose dim 0 (7, 3) is not divisible by 2; "llama": a tiny
Llama whose lm_head is tied to its embedding, 33 rows; "attention": nn.MultiheadAttention, a
whole-call rule that reads its weights after the backward, so its unit must stay gathered), clipping
("flat", "per_layer", "groups"), poisson (the engine's Poisson loader draws the batches; otherwise
BATCHES, declared sampling), mixed_precision (fully_shard with
MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32); with accelerate,
Accelerator(mixed_precision="bf16")), fsdp_one_rank (fully_shard on a world of one process too),
bucket_elements (FSDP2Backend's reduce-scatter bucket size: small, so that most parameters are
reduced in a bucket of their own, larger ones alone), accelerate (Accelerate's FSDP plugin,
fsdp_version 2, prepares the Llama instead of the calls above, and
dpscale.integrations.accelerate.make_private builds the engine), activation_checkpointing (with
accelerate: the plugin's own, torch's checkpoint_wrapper around each decoder layer).
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
from dpscale.driver import run_logical_step  # noqa: E402
from dpscale.losses import causal_lm_losses  # noqa: E402
from dpscale.noise import NoiseKey  # noqa: E402
from dpscale.sampling import LogicalBatch, MicroBatches, PoissonBatchSampler  # noqa: E402

KEY = NoiseKey(bytes(range(32)))
N, T, VOCAB, MICRO, B = 16, 5, 33, 2, 4
# rank 0 runs 3 micro-batches, then 1, then 1; rank 1 runs 2 (and a padding pass), 1, and none (its
# draw is empty: one padding pass, then the step)
BATCHES = [[0, 1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11], [12]]


def config(spec: dict, names: list[str]) -> DPConfig:
    clipping = spec.get("clipping", "flat")
    if clipping == "groups":  # two groups: the first half of the parameters, and the rest
        half = len(names) // 2
        clipping = [names[:half], names[half:]]
    return DPConfig(max_grad_norm=0.3, expected_batch_size=B, noise_multiplier=spec.get("sigma", 1.0), dataset_size=N,
                    clipping=clipping, sampling_declared_by_user=not spec.get("poisson"))


def poisson_batches() -> list[list[int]]:
    """The global batches the engine's Poisson loader draws from KEY (steps 1 and 2 hold one example:
    rank 1's part is empty)."""
    sampler = PoissonBatchSampler(N, B / N, seed=KEY.derive_seed("sampling"))
    return [sampler.global_batch(t) for t in range(len(BATCHES))]


class AttentionNet(nn.Module):
    """nn.MultiheadAttention, whose rule reads the whole call after the backward (its weights
    too), then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(6, 2, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h, _ = self.attention(x, x, x, need_weights=False)
        return self.head(h.mean(1))


def model(kind: str) -> tuple[nn.Module, list[nn.Module]]:
    """(the model, the submodules to fully_shard before the root)."""
    torch.manual_seed(0)
    if kind == "mlp":
        net = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.LayerNorm(7), nn.Linear(7, 3))
        return net, [net[0], net[3]]
    if kind == "attention":
        net = AttentionNet()
        return net, [net.attention, net.head]
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                      tie_word_embeddings=True, initializer_range=0.5)
    net = LlamaForCausalLM(cfg).float()
    assert net.lm_head.weight is net.model.embed_tokens.weight
    return net, list(net.model.layers)


def dataset(kind: str):
    g = torch.Generator().manual_seed(1)
    if kind == "mlp":
        return torch.utils.data.TensorDataset(torch.randn(N, 6, generator=g), torch.randn(N, 3, generator=g))
    if kind == "attention":
        return torch.utils.data.TensorDataset(torch.randn(N, T, 6, generator=g), torch.randn(N, 3, generator=g))
    return torch.utils.data.TensorDataset(torch.randint(0, VOCAB, (N, T), generator=g))


def losses(kind: str, net: nn.Module, micro) -> torch.Tensor:
    if kind in ("mlp", "attention"):
        x, y = micro
        return (net(x) - y).pow(2).sum(1)
    (ids,) = micro
    return causal_lm_losses(net(input_ids=ids).logits, ids)


def own_batch(data, indices: list[int], step: int) -> LogicalBatch:
    chunks = [indices[start : start + MICRO] for start in range(0, len(indices), MICRO)]
    return LogicalBatch(
        step, tuple(indices), len(indices), MicroBatches(data, torch.utils.data.default_collate, chunks)
    )


def run(spec: dict, rank: int = 0, world_size: int = 1) -> tuple[dict[str, torch.Tensor], int]:
    """Train on the global batches; returns the full parameters after the steps and the step count."""
    kind = spec.get("model", "mlp")
    net, layers = model(kind)
    net.train()
    sharded = world_size > 1 or spec.get("fsdp_one_rank", False)
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    if sharded and spec.get("accelerate"):
        engine = accelerate_engine(net, spec, config(spec, names))
    else:
        if sharded:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            extra = {}
            if spec.get("mixed_precision"):
                extra["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            for layer in layers:
                fully_shard(layer, **extra)
            fully_shard(net, **extra)
        backend = None
        if sharded and spec.get("bucket_elements"):
            from dpscale.backends import FSDP2Backend

            backend = FSDP2Backend(net, bucket_elements=spec["bucket_elements"])
        engine = PrivacyEngine(net, config(spec, names), noise_key=KEY, backend=backend)
        engine.attach_optimizer(torch.optim.SGD(engine.parameters.values(), lr=0.5, momentum=0.9))
        if backend is not None:
            assert len(backend._buckets) > len(names) // 2, "small buckets: most parameters reduced alone"
    if sharded:
        assert type(engine.backend).__name__ == "FSDP2Backend", type(engine.backend)
    assert list(engine.parameters) == names
    data = dataset(kind)
    if spec.get("poisson"):  # the engine's own loader: this rank's part of each global draw
        loader = engine.make_data_loader(data, max_physical_batch_size=MICRO)
        logical_batches = (batch for _, batch in zip(range(len(BATCHES)), loader))
    else:
        logical_batches = (own_batch(data, batch[rank::world_size], step) for step, batch in enumerate(BATCHES))
    for logical_batch in logical_batches:
        run_logical_step(engine, logical_batch, lambda micro: losses(kind, net, micro))
    full = {}
    for name, p in engine.parameters.items():
        value = p.detach()
        full[name] = (value.full_tensor() if hasattr(value, "full_tensor") else value).clone()
    steps = engine.steps_taken
    engine.detach()
    return full, steps


def accelerate_engine(net: nn.Module, spec: dict, dp_config: DPConfig) -> PrivacyEngine:
    """The engine on Accelerate's own FSDP2 preparation: FullyShardedDataParallelPlugin(fsdp_version=2)
    wrapping each decoder layer, then (Accelerate's choice) the tied embedding, final norm and head
    as one group, then the root; ``accelerator.prepare(model, optimizer)`` moves the optimizer onto
    the sharded parameters. Accelerate enables its FSDP plugin only for accelerator types, so on this
    CPU its gloo state is labelled MULTI_GPU before the Accelerator is built: the one step here that is
    not Accelerate's (it then turns on FSDP and sets the plugin's mixed precision itself)."""
    from accelerate import Accelerator, FullyShardedDataParallelPlugin, PartialState
    from accelerate.utils import DistributedType

    from dpscale.integrations.accelerate import make_private

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
                                            activation_checkpointing=spec.get("activation_checkpointing", False))
    PartialState(backend="gloo").distributed_type = DistributedType.MULTI_GPU
    accelerator = Accelerator(fsdp_plugin=plugin, mixed_precision="bf16" if spec.get("mixed_precision") else "no")
    assert accelerator.is_fsdp2 and accelerator.device.type == "cpu"
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    net, optimizer = accelerator.prepare(net, optimizer)
    return make_private(accelerator, net, optimizer, dp_config, noise_key=KEY)


def main() -> None:
    torch.set_num_threads(1)
    with open(sys.argv[1]) as handle:
        spec = json.load(handle)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=spec.get("timeout_s", 60)))
    params, steps = run(spec, rank, world_size)
    if rank == 0:
        torch.save({"params": params, "steps": steps}, os.path.join(spec["out"], "result.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
