"""FSDP2 (torch.distributed.fsdp.fully_shard), run for real: 2 processes over gloo on CPU. With
sigma > 0 and a fixed key, the parameters after the steps equal the one-process run (plain model,
LocalBackend) on the same global batches, for parameters whose dim 0 does not split evenly, a Llama
whose lm_head is tied to its embedding, padding passes, and a rank whose draw is empty. Under a bf16
MixedPrecisionPolicy, 2 ranks equal 1 rank of the same policy. The same through Accelerate's FSDP
plugin (fsdp_version 2), with and without its activation checkpointing. FSDP1's wrapper is refused."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dpscale import ConfigError, DPConfig, PrivacyEngine
from tests import fsdp2_worker as worker
from tests.launcher import free_port, launch_workers

WORKER = Path(__file__).resolve().parent / "fsdp2_worker.py"


@contextlib.contextmanager
def one_process_group():
    """A gloo group of this process alone, torn down after the block (no state left to other tests)."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fsdp1_is_refused_with_a_pointer_to_fsdp2():
    from torch.distributed.fsdp import FullyShardedDataParallel

    with one_process_group():
        model = FullyShardedDataParallel(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)),
                                         device_id=torch.device("cpu"))
        config = DPConfig(max_grad_norm=1.0, expected_batch_size=4, noise_multiplier=1.0)
        with pytest.raises(ConfigError, match="fully_shard"):
            PrivacyEngine(model, config)


def test_fsdp2_root_must_be_sharded():
    from torch.distributed.fsdp import fully_shard

    with one_process_group():
        model, layers = worker.model("mlp")
        fully_shard(layers[0])  # the LayerNorm and the last Linear stay plain, replicated tensors
        with pytest.raises(ConfigError, match="root module too"):
            PrivacyEngine(model, worker.config({}, []))


@pytest.mark.slow
@pytest.mark.parametrize(("model", "clipping", "poisson", "buckets"),
                         [("mlp", "flat", False, None), ("mlp", "per_layer", True, None),
                          ("llama", "flat", False, None), ("llama", "groups", True, 64),
                          ("attention", "flat", True, None)])
def test_fsdp2_matches_one_process(tmp_path, model, clipping, poisson, buckets):
    """buckets: the reduce-scatter bucket size; 64 elements puts most parameters in buckets of their
    own and reduces each as soon as it is written, with padding passes and an empty draw."""
    spec = {"model": model, "clipping": clipping, "sigma": 1.0, "poisson": poisson, "bucket_elements": buckets}
    batches = worker.poisson_batches() if poisson else worker.BATCHES
    assert min(len(b) for b in batches) == 1, "rank 1 must have an empty draw in some step"
    assert max(len(b) for b in batches) >= 5, "rank 0 must run more micro-batches than rank 1 in some step"
    results = launch_workers(WORKER, spec, tmp_path, world_size=2, timeout=150.0)
    for rank, (code, err) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{err[-3000:]}"
    got = torch.load(tmp_path / "result.pt", weights_only=True)
    expected, steps = worker.run(spec, 0, 1)
    assert got["steps"] == steps == len(worker.BATCHES)
    initial = {name: p.detach() for name, p in worker.model(model)[0].named_parameters()}
    assert set(got["params"]) == set(expected)
    if model == "llama":  # tied: one parameter, one name (the embedding's), one noise draw
        assert "lm_head.weight" not in expected and "model.embed_tokens.weight" in expected
    for name, value in expected.items():
        assert float((value - initial[name]).abs().max()) > 1e-3, f"{name} did not move"
        assert torch.allclose(got["params"][name], value, rtol=1e-5, atol=1e-5), (
            f"{name}: max difference {float((got['params'][name] - value).abs().max()):.3g}")


@pytest.mark.slow
@pytest.mark.parametrize(("clipping", "poisson", "checkpointing"), [("flat", False, False), ("per_layer", True, True)])
def test_accelerate_fsdp2_plugin_matches_one_process(tmp_path, clipping, poisson, checkpointing):
    """Accelerate's own FSDP2 preparation (its grouping puts the tied embedding, the final RMS norm and
    the head in one fully_shard group), through dpscale.integrations.accelerate.make_private; with its
    activation checkpointing, whose wrapper renames every layer's parameters
    (``_checkpoint_wrapped_module``): the names, and so the noise, stay the one-process model's."""
    spec = {"model": "llama", "clipping": clipping, "sigma": 1.0, "poisson": poisson, "accelerate": True,
            "activation_checkpointing": checkpointing}
    results = launch_workers(WORKER, spec, tmp_path, world_size=2, timeout=150.0)
    for rank, (code, err) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{err[-3000:]}"
    got = torch.load(tmp_path / "result.pt", weights_only=True)
    expected, steps = worker.run({**spec, "accelerate": False}, 0, 1)
    assert got["steps"] == steps == len(worker.BATCHES) and set(got["params"]) == set(expected)
    for name, value in expected.items():
        assert torch.allclose(got["params"][name], value, rtol=1e-5, atol=1e-5), (
            f"{name}: max difference {float((got['params'][name] - value).abs().max()):.3g}")


@pytest.mark.slow
@pytest.mark.parametrize("accelerate", [False, True])
def test_fsdp2_bf16_mixed_precision_does_not_depend_on_the_rank_count(tmp_path, accelerate):
    """fully_shard with MixedPrecisionPolicy(bf16 parameters, fp32 reduction), or Accelerate's
    mixed_precision="bf16" (its policy: bf16 parameters and reduction; dpscale reduces in the fp32
    shards' dtype either way)."""
    spec = {"model": "llama", "clipping": "flat", "sigma": 1.0, "mixed_precision": True, "accelerate": accelerate}
    got = {}
    for world_size in (2, 1):
        out = tmp_path / str(world_size)
        out.mkdir()
        results = launch_workers(WORKER, {**spec, "fsdp_one_rank": True}, out, world_size=world_size, timeout=150.0)
        for rank, (code, err) in enumerate(results):
            assert code == 0, f"{world_size} ranks, rank {rank} failed:\n{err[-3000:]}"
        got[world_size] = torch.load(out / "result.pt", weights_only=True)["params"]
    fp32, _ = worker.run({**spec, "mixed_precision": False, "accelerate": False}, 0, 1)
    bf16_effect = 0.0
    for name, value in fp32.items():
        assert got[2][name].dtype == torch.float32  # the fp32 shards are what the optimizer steps
        assert torch.allclose(got[2][name], got[1][name], rtol=1e-5, atol=1e-5), (
            f"{name}: max difference {float((got[2][name] - got[1][name]).abs().max()):.3g}")
        difference = float((got[2][name] - value).abs().max())
        assert difference < 2e-2, f"{name}: bf16 compute moved it {difference:.3g} away from the fp32 run"
        bf16_effect = max(bf16_effect, difference)
    assert bf16_effect > 1e-5, "the policy's bf16 compute left no trace: was it applied?"
