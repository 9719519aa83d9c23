"""Data parallel (plain DDP and Accelerate) and a model-parallel split, run for real: 2 processes
over gloo on CPU, each started with the environment a launcher sets. After 2 optimizer steps with
sigma > 0 and a fixed key, the parameters equal the single-process run on the same global batches.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dpscale.backends.data_parallel import owned_range
from tests import distributed_worker as worker
from tests.launcher import launch_workers
from tests.oracle import check_engine

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "distributed_worker.py"


def launch(spec: dict, tmp_path: Path, world_size: int = 2, timeout: float = 90.0) -> list[tuple[int, str]]:
    return launch_workers(WORKER, spec, tmp_path, world_size, timeout)


def assert_same_as_reference(spec: dict, tmp_path: Path, reference_spec: dict | None = None) -> None:
    batches = worker.global_batches(spec)
    assert any(batches), "the draw is empty; pick another dataset size"
    results = launch({**spec, "batches": spec.get("batches")}, tmp_path)
    for rank, (code, err) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{err[-3000:]}"
    expected = worker.run({**(reference_spec or spec), "batches": batches}, 0, 1)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    if spec.get("case") == "model_parallel":
        got = {}
        for n in ranks[0]:
            if n.startswith("0."):  # the replicated LayerNorm: one value on every rank
                assert torch.equal(ranks[0][n], ranks[1][n]), f"ranks disagree on replicated {n}"
                got[n] = ranks[0][n]
            else:
                got[n] = torch.cat([ranks[0][n], ranks[1][n]])
    else:
        for name in ranks[0]:
            assert torch.equal(ranks[0][name], ranks[1][name]), f"ranks disagree on {name}"
        got = ranks[0]
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert torch.allclose(got[name], value, rtol=1e-5, atol=1e-5), (
            f"{name}: max difference {float((got[name] - value).abs().max()):.3g}")


def test_owned_ranges_cover_each_element_once():
    for numel in (0, 1, 5, 16):
        for world in (1, 2, 3, 7):
            ranges = [owned_range(numel, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == numel
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_lora_layers_are_exact_on_one_process():
    model = worker.gpt2("lora").double()
    ids = torch.randint(0, worker.VOCAB, (4, worker.T), generator=torch.Generator().manual_seed(3))

    def loss_fn(m, inputs):
        return worker.causal_lm_losses(m(input_ids=inputs["input_ids"]).logits, inputs["input_ids"])

    # the oracle's own batch (declared sampling, as explicit batches are in the worker)
    engine = check_engine(
        model, [{"input_ids": ids}], loss_fn, worker.config({"clipping": "flat", "batches": [[0, 1, 2, 3]]})
    )
    assert engine.parameters and all("lora_" in name for name in engine.parameters)


@pytest.mark.slow
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_ddp_matches_one_process(tmp_path, clipping):
    assert_same_as_reference({"case": "ddp", "clipping": clipping, "batches": None}, tmp_path)


@pytest.mark.slow
def test_accelerate_matches_one_process(tmp_path):
    assert_same_as_reference({"case": "accelerate", "clipping": "flat", "batches": None}, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_model_parallel_split_matches_unsharded(tmp_path, clipping):
    spec = {"case": "model_parallel", "model": "mlp", "clipping": clipping, "batches": None}
    assert_same_as_reference(spec, tmp_path, reference_spec={**spec, "case": "ddp"})


@pytest.mark.slow
@pytest.mark.parametrize("subset", ["bias", "lora"])
def test_trainable_subsets_match_one_process(tmp_path, subset):
    assert_same_as_reference({"case": "ddp", "subset": subset, "clipping": "flat", "batches": None}, tmp_path)


@pytest.mark.slow
def test_a_rank_with_an_empty_draw_still_steps(tmp_path):
    # Step 0 draws one example: rank 1's part is empty, it runs no forward and still steps.
    spec = {"case": "ddp", "clipping": "flat", "batches": [[5], [1, 2, 3, 8, 13]]}
    assert_same_as_reference(spec, tmp_path)


@pytest.mark.parametrize(
    "case, message", [("own_keys", "different noise keys"), ("no_key", "Several processes need one noise key")]
)
def test_ranks_with_different_keys_are_refused(tmp_path, case, message):
    # Plain DDP with a key of its own on each rank (the backend refuses at bind), or with noise_key
    # unset (refused where the key is loaded).
    results = launch({"case": "ddp", "clipping": "flat", "batches": [[1, 2, 3, 4]], case: True}, tmp_path)
    for rank, (code, err) in enumerate(results):
        assert code != 0, f"rank {rank} trained with a key of its own"
        assert message in err and ("NoiseKey.from_file" in err or "write_new" in err), err[-2000:]


@pytest.mark.slow
def test_a_dying_rank_ends_the_run_with_an_error(tmp_path):
    spec = {"case": "ddp", "clipping": "flat", "batches": [[1, 2, 3, 4]], "die_at_step": 0, "timeout_s": 10}
    start = time.monotonic()
    results = launch(spec, tmp_path, timeout=60)
    assert results[1][0] == 3
    assert results[0][0] != 0, "the surviving rank finished as if nothing happened"
    assert time.monotonic() - start < 60


class _Stub:
    """The attributes of an Accelerator that check_accelerator reads (Accelerate's state is a
    process-wide singleton, so real Accelerators with other settings cannot share this process)."""

    def __init__(self, **changes):
        from types import SimpleNamespace

        self.distributed_type, self.mixed_precision, self.scaler = "MULTI_CPU", "no", None
        self.gradient_accumulation_steps = 1
        self.state = SimpleNamespace(dynamo_plugin=SimpleNamespace(backend="NO"))
        self.__dict__.update(changes)


def _fsdp_state(version: int):
    from types import SimpleNamespace

    return SimpleNamespace(
        dynamo_plugin=SimpleNamespace(backend="NO"), fsdp_plugin=SimpleNamespace(fsdp_version=version)
    )


@pytest.mark.parametrize("changes, named", [
    ({"mixed_precision": "fp16"}, "fp16"),
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps"),
    ({"distributed_type": "DEEPSPEED"}, "DEEPSPEED"),
    ({"distributed_type": "XLA"}, "XLA"),
    ({"distributed_type": "FSDP", "state": _fsdp_state(1)}, "fsdp_version: 2"),
])
def test_accelerate_settings_that_change_the_step_are_refused(changes, named):
    from dpscale import ConfigError
    from dpscale.integrations.accelerate import check_accelerator

    check_accelerator(_Stub())
    check_accelerator(_Stub(mixed_precision="bf16"))
    check_accelerator(_Stub(distributed_type="FSDP", state=_fsdp_state(2)))
    with pytest.raises(ConfigError, match=named):
        check_accelerator(_Stub(**changes))


def test_an_fsdp_config_accelerate_dropped_is_refused(monkeypatch):
    """`accelerate launch` with an FSDP config on a CPU-only machine sets ACCELERATE_USE_FSDP and
    then starts independent one-process runs (distributed_type NO): refused, not trained."""
    from dpscale import ConfigError
    from dpscale.integrations.accelerate import check_accelerator

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    check_accelerator(_Stub(distributed_type="FSDP", state=_fsdp_state(2)))
    for kind in ("NO", "MULTI_CPU"):
        with pytest.raises(ConfigError, match="falls back"):
            check_accelerator(_Stub(distributed_type=kind))


@pytest.mark.slow
def test_launch_script_under_accelerate_launch_runs_two_processes(tmp_path):
    """launch/train.py (the `dpscale train` job) on a tiny model folder under `accelerate launch`
    with 2 gloo processes."""
    from tests.tiny_models import save_tiny_causal_lm, write_e2e_csv

    model, data = save_tiny_causal_lm(tmp_path / "model"), write_e2e_csv(tmp_path / "e2e.csv")
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
               str(ROOT / "launch" / "accelerate_cpu_2proc.yaml"), str(ROOT / "launch" / "train.py"), "--cpu",
               "--model", str(model), "--data", str(data), "--trainable", "all", "--batch-size", "8",
               "--max-steps", "2", "--generations", "0", "--output-dir", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es) on cpu" in done.stdout and "epsilon" in done.stdout, done.stdout


def test_gradients_live_in_the_reduction_buckets(tmp_path):
    """In one gloo process: DataParallelBackend hands every ``p.grad`` over as a view of its flat
    bucket inside the step (several buckets, two dtypes) and None after it, zero-fills parameters
    of an empty draw, and trains exactly as LocalBackend does."""
    import torch.distributed as dist
    from torch import nn

    from dpscale import DPConfig, LocalBackend, PrivacyEngine
    from dpscale.backends import DataParallelBackend

    class ToDouble(nn.Module):
        def forward(self, x):
            return x.double()

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), ToDouble(), nn.Linear(4, 3).double())

    def losses(model, x):
        return model(x).pow(2).sum(1)

    cfg = DPConfig(max_grad_norm=0.7, expected_batch_size=4, noise_multiplier=0.8)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        results = {}
        for label in ("local", "buckets"):
            model = build()
            backend = LocalBackend() if label == "local" else DataParallelBackend(bucket_mb=160 / 2**20)
            engine = PrivacyEngine(model, cfg, backend=backend, noise_key=worker.KEY)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            engine.attach_optimizer(optimizer)
            seen = {}
            optimizer.register_step_pre_hook(
                lambda *_, engine=engine, seen=seen: seen.update({n: p.grad for n, p in engine.parameters.items()}))
            for step in range(3):
                if step != 2:  # step 2: an empty draw
                    engine.backward(losses(model, x))
                optimizer.step()
                assert all(p.grad is None for p in model.parameters())
                if label == "buckets":
                    buckets = backend._buckets
                    assert len(buckets) >= 3 and {b.flat.dtype for b in buckets} == {torch.float32, torch.float64}
                    views = {name: view for b in buckets for name, view in b.views.items()}
                    for name in engine.parameters:
                        assert seen[name].data_ptr() == views[name].data_ptr(), name
                optimizer.zero_grad(set_to_none=True)
            results[label] = {n: p.detach().clone() for n, p in model.named_parameters()}
            engine.detach()
    finally:
        dist.destroy_process_group()
    for name, value in results["local"].items():
        assert torch.equal(results["buckets"][name], value), name
