"""DeepSpeed ZeRO 0-3 on 2 CPU processes (gloo), real DeepSpeed: the parameters after 2 noised
DP steps equal the single-process run on the same global batches and key. One rank's draw in the
second step is empty, and the ranks' micro-batch counts differ, so the collectives must still match.
The worker is tests/deepspeed_worker.py, launched with torchrun in a subprocess under a timeout.
Covered: fp32 stages 0-3, CPU optimizer offload (stages 1-3; DeepSpeedCPUAdam on ZeRO-3), bf16
(stages 1-3 and ZeRO-3 offload, against a single-process run with the same bf16 rounding), the
refusals, and launch/train.py under Accelerate's DeepSpeed plugin, the deepspeed launcher and
torchrun --deepspeed against the same script on one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("deepspeed")

from tests.deepspeed_worker import reference  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "deepspeed_worker.py"
TIMEOUT_S = 240  # the first launch on a fresh machine compiles a small DeepSpeed op (about 30 s)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compare(
    tmp_path: Path, label: str, clippings, tolerance: float = 1e-5, prefix: str = "", **reference_kwargs
) -> None:
    for clipping in clippings:
        got = torch.load(tmp_path / f"{prefix}{clipping}.pt", weights_only=True)
        assert got["steps_taken"] == 2
        expected = reference(clipping, **reference_kwargs)
        assert set(got["params"]) == set(expected)
        for name, value in expected.items():
            err = float((got["params"][name] - value).abs().max())
            assert err <= tolerance, f"{label} {clipping}: {name} differs from one process by {err:.3g}"


def launch(tmp_path: Path, worker: Path = WORKER, processes: int = 2, **spec) -> None:
    spec = {"out": str(tmp_path), **spec}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(worker), str(path)]
    try:
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"the 2-process DeepSpeed run did not finish in {TIMEOUT_S} s:\n{(error.stderr or '')[-4000:]}")
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-2000:]}\n{result.stderr[-6000:]}"


@pytest.mark.slow
def test_zero_stages_match_single_process(tmp_path):
    # Stages 0-3 in one launch (one process group, the DeepSpeed engines in turn): the processes'
    # start-up is most of a launch's cost on 2 cores.
    clippings = ["flat", "per_layer"]
    stages = [0, 1, 2, 3]
    launch(tmp_path, clippings=clippings, runs=[{"stage": stage, "name": f"zero{stage}_"} for stage in stages])
    for stage in stages:
        compare(tmp_path, f"ZeRO-{stage}", clippings, prefix=f"zero{stage}_")


CPU_OFFLOAD = {"zero_optimization": {"offload_optimizer": {"device": "cpu", "pin_memory": False}},
               # a client torch optimizer under offload (DeepSpeed otherwise insists on DeepSpeedCPUAdam)
               "zero_force_ds_cpu_optimizer": False}


@pytest.mark.slow
def test_zero_cpu_offload_matches_single_process(tmp_path):
    # ZeRO-Offload steps the fp32 partitions on the CPU; the backend hooks the same base optimizer.
    # ZeRO 1, 2 and 3 in one launch (one process group, the DeepSpeed engines in turn).
    clippings = ["flat", "per_layer"]
    stages = [1, 2, 3]
    launch(tmp_path, clippings=clippings, ds_overrides=CPU_OFFLOAD,
           runs=[{"stage": stage, "name": f"zero{stage}_"} for stage in stages])
    for stage in stages:
        compare(tmp_path, f"ZeRO-{stage} offload", clippings, prefix=f"zero{stage}_")


def _cpu_adam_built() -> bool:
    """The op is compiled for *this* installation: a build made by another environment (another
    checkout's virtualenv) has other include paths, and loading it would recompile for minutes."""
    import deepspeed
    from torch.utils.cpp_extension import _get_build_directory

    build = Path(_get_build_directory("cpu_adam", verbose=False))
    if not (build / "cpu_adam.so").exists() or (build / "lock").exists() or not (build / "build.ninja").exists():
        return False
    return str(Path(deepspeed.__file__).parent / "ops" / "csrc") in (build / "build.ninja").read_text()


@pytest.mark.slow
def test_zero3_offload_with_deepspeed_cpu_adam(tmp_path):
    if not _cpu_adam_built():  # compiling it took 9 minutes on 2 busy cores: longer than a test may run
        pytest.skip("DeepSpeedCPUAdam's op is not compiled yet; build it once with: python -c "
                    "'from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()'")
    # What ds_configs/zero3_offload.json is for: DeepSpeedCPUAdam (a compiled op) steps the
    # offloaded partitions; the reference is torch's Adam in one process.
    launch(tmp_path, stage=3, clippings=["flat"], optimizer="cpu_adam",
           ds_overrides={"zero_optimization": CPU_OFFLOAD["zero_optimization"]})
    compare(tmp_path, "ZeRO-3 offload, DeepSpeedCPUAdam", ["flat"], optimizer="cpu_adam")


@pytest.mark.slow
@pytest.mark.parametrize("processes, stage", [(2, 0), (2, 1), (2, 2), (2, 3), (4, 1), (4, 3)])
def test_autotp_split_matches_unsharded(tmp_path, processes, stage):
    """DeepSpeed AutoTP, tensor-parallel groups of 2 (and, with 4 processes, 2 data-parallel
    replicas): each example's gradient is spread over a group, the engine all-reduces the shards'
    squared norms over it (and counts the replicated parameters once), each shard's noise is the
    full parameter's, and ZeRO reduces over the replicas only. After 2 noised steps the
    reassembled parameters equal the unsharded single-process run."""
    from tests import autotp_worker

    launch(tmp_path, worker=ROOT / "tests" / "autotp_worker.py", processes=processes, stage=stage,
           clippings=["flat", "per_layer"])
    for clipping in ("flat", "per_layer"):
        got = torch.load(tmp_path / f"{clipping}.pt", weights_only=True)
        expected = autotp_worker.reference(clipping)
        assert set(got) == set(expected)
        for name, value in expected.items():
            err = float((got[name] - value).abs().max())
            assert err <= 1e-5, (
                f"AutoTP x{processes} ZeRO-{stage} {clipping}: {name} differs from one process by {err:.3g}"
            )


def test_other_autotp_layers_are_refused():
    """An AutoTP layer dpscale has no rule for (fused layouts, custom ones) must not fall to the
    generic fallback, which would not see its collectives."""
    from deepspeed.module_inject.layers import TensorParallel_Layer

    from dpscale import DPConfig, PrivacyEngine, UnsupportedModuleError

    class FusedSomething(TensorParallel_Layer):
        def __init__(self):
            super().__init__(None)
            self.weight = nn.Parameter(torch.ones(3, 2))

        def forward(self, x):
            return x @ self.weight.t()

        def gather_params(self, params_list):
            pass

        def _tp_partition(self, params_list):
            pass

    model = nn.Sequential(nn.Linear(2, 2), FusedSomething())
    with pytest.raises(UnsupportedModuleError, match="FusedSomething"):
        PrivacyEngine(model, DPConfig(max_grad_norm=1.0, expected_batch_size=2, noise_multiplier=1.0))


# bf16: the reference applies DeepSpeed's rounding in one process (the module cast to bf16 first and
# fp32 master weights copied from it; bf16 forward, backward, clipped sums and their accumulation in
# p.grad; fp32 noise and optimizer step; masters rounded to bf16 for the next forward). With that the
# 2-process runs on ZeRO 1, 2 and 3 agree with it exactly (measured: 0.0), so the fp32 tolerance holds.
# Rounding differently anywhere shows: the plain fp32 reference differs by about 1e-3, and a misplaced
# noise slice (std sigma R / B = 0.03 per coordinate, times lr 0.5) by more than 1e-2.
BF16_TOLERANCE = 1e-5


@pytest.mark.slow
def test_bf16_zero_stages_match_bf16_single_process(tmp_path):
    stages = [1, 2, 3]
    runs = [{"stage": stage, "name": f"zero{stage}_"} for stage in stages]
    runs.append({"stage": 3, "name": "zero3_offload_", "ds_overrides": CPU_OFFLOAD})
    launch(tmp_path, clippings=["flat"], bf16=True, runs=runs)
    for run in runs:
        compare(tmp_path, f"bf16 {run['name']}", ["flat"], tolerance=BF16_TOLERANCE, prefix=run["name"], bf16=True)


@pytest.mark.slow
def test_deepspeed_settings_that_change_the_dp_step_are_refused(tmp_path):
    # Each run in the launch must raise a dpscale ConfigError naming the key, or the worker fails.
    launch(tmp_path, clippings=["flat"], runs=[
        # No "gradient_clipping" key: DeepSpeed 0.19.8 clips the reduced gradient at 1.0.
        {"name": "clipping_", "stage": 2, "ds_overrides": {"gradient_clipping": None},
         "expect_error": '"gradient_clipping"'},
        {"name": "accumulation_", "stage": 1,
         "ds_overrides": {"gradient_accumulation_steps": 2, "train_micro_batch_size_per_gpu": 2},
         "expect_error": '"gradient_accumulation_steps"'},
        # bf16 through DeepSpeed's FP16_Optimizer (stage 0) or BF16_Optimizer (stage 1 with fp32
        # gradient accumulation): their own backward epilogue reduces. Parameter offload: untested.
        {"name": "bf16_zero0_", "stage": 0, "bf16": True, "expect_error": '"bf16"'},
        {"name": "bf16_zero1_fp32_accumulation_", "stage": 1, "bf16": True,
         "ds_overrides": {"data_types": {"grad_accum_dtype": "fp32"}}, "expect_error": '"bf16"'},
        {"name": "offload_param_", "stage": 3,
         "ds_overrides": {"zero_optimization": {"offload_param": {"device": "cpu"}}},
         "expect_error": '"zero_optimization.offload_param"'},
    ])
    message = (tmp_path / "clipping_refused.txt").read_text()
    assert '"gradient_clipping": 0.0' in message


def test_shipped_configs_are_ready_for_dp():
    for path in sorted((ROOT / "ds_configs").glob("*.json")):
        cfg = json.loads(path.read_text())
        assert cfg["gradient_clipping"] == 0.0, path.name
        assert not cfg.get("fp16", {}).get("enabled", False), path.name
        assert cfg.get("gradient_accumulation_steps", 1) == 1, path.name
        if cfg["zero_optimization"]["stage"] == 3:  # see the next test
            assert cfg["zero_optimization"]["memory_efficient_linear"] is False, path.name


def test_zero3_linear_replacement_is_reported(monkeypatch, caplog):
    """DeepSpeed's ZeRO-3 linear computes weight gradients dpscale throws away: warned, by key."""
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    from dpscale.backends.deepspeed import _warn_if_weight_gradients_are_computed

    with caplog.at_level("WARNING", logger="dpscale.backends.deepspeed"):
        _warn_if_weight_gradients_are_computed()
        assert not caplog.records
        monkeypatch.setattr(torch.nn.functional, "linear", zero3_linear_wrap)
        _warn_if_weight_gradients_are_computed()
    assert '"memory_efficient_linear": false' in caplog.text


# launch/train.py under DeepSpeed: Accelerate's DeepSpeed plugin, the deepspeed launcher and torchrun
# with --deepspeed, each on 2 gloo processes, against the same script on one process (LocalBackend).

TRAIN = ROOT / "launch" / "train.py"
TINY = ["--cpu", "--trainable", "all", "--batch-size", "8", "--micro-batch", "3", "--max-steps", "2", "--epsilon", "8",
        "--max-eval-examples", "4", "--generations", "0", "--max-length", "24"]


@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory):
    """A tiny GPT-2 (dropout 0) saved as a local model folder, E2E-style data and a key file."""
    from tests.tiny_models import save_tiny_causal_lm, write_e2e_csv

    root = tmp_path_factory.mktemp("tiny_job")
    model = save_tiny_causal_lm(root / "model")
    config = json.loads((model / "config.json").read_text())
    config.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    (model / "config.json").write_text(json.dumps(config))
    from dpscale.noise import NoiseKey

    NoiseKey.write_new(root / "noise.key")
    return {"model": model, "data": write_e2e_csv(root / "e2e.csv", copies=12), "key": root / "noise.key"}


def run_train(job: dict, tmp_path: Path, launcher: list[str], name: str, *extra: str, expect_failure: bool = False):
    """launch/train.py (the `dpscale train` job) under ``launcher``; the trained parameters and the
    run's metrics."""
    out = tmp_path / name
    command = [*launcher, str(TRAIN), *TINY, "--model", str(job["model"]), "--data", str(job["data"]),
               "--eval-data", str(job["data"]), "--noise-key", str(job["key"]), "--output-dir", str(out), *extra]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "HF_HUB_OFFLINE": "1"}
    try:
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{name} did not finish in {TIMEOUT_S} s:\n{(error.stderr or '')[-4000:]}")
    if expect_failure:
        assert result.returncode != 0, f"{name} was expected to fail"
        return result.stdout + result.stderr
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-6000:]}"
    from safetensors.torch import load_file

    metrics = json.loads((out / "metrics.json").read_text())
    return {"params": load_file(out / "model" / "model.safetensors"), "world_size": metrics["processes"],
            "steps_taken": metrics["privacy"]["steps"]}


@pytest.fixture(scope="module")
def single_process(tiny_job, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("train_single")
    return tmp_path, run_train(tiny_job, tmp_path, [sys.executable], "single")


def assert_same_training(got: dict, expected: dict, label: str) -> None:
    assert got["world_size"] == 2, f"{label}: ran on {got['world_size']} process(es), not 2"
    assert got["steps_taken"] == expected["steps_taken"] == 2
    assert set(got["params"]) == set(expected["params"])
    for name, value in expected["params"].items():
        err = float((got["params"][name] - value).abs().max())
        assert err <= 1e-5, f"{label}: {name} differs from one process by {err:.3g}"


def _launcher(kind: str, config: str) -> tuple[list[str], list[str]]:
    port = str(_free_port())
    if kind == "accelerate":
        return ([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                 str(ROOT / "launch" / "accelerate_deepspeed.yaml"), "--deepspeed_config_file", config,
                 "--main_process_port", port], [])
    if kind == "deepspeed":
        return ([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", port],
                ["--deepspeed", config])
    return ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
             "--master_port", port], ["--deepspeed", config])


@pytest.mark.slow
@pytest.mark.parametrize("kind, config", [("accelerate", "ds_configs/zero2.json"),
                                          ("deepspeed", "ds_configs/zero3.json"),
                                          ("torchrun", "ds_configs/zero3_offload.json")])
def test_train_script_under_deepspeed_matches_single_process(tiny_job, single_process, kind, config):
    tmp_path, expected = single_process
    launcher, extra = _launcher(kind, str(ROOT / config))
    got = run_train(tiny_job, tmp_path, launcher, f"{kind}_{Path(config).stem}", *extra)
    assert_same_training(got, expected, f"{kind} {config}")


@pytest.mark.slow
def test_accelerate_deepspeed_default_clipping_is_refused(tiny_job, tmp_path):
    # A DeepSpeed config file without "gradient_clipping": DeepSpeed clips at 1.0 (and an Accelerate
    # plugin value of 0.0 would be dropped): the run must stop, naming the key.
    config = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    del config["gradient_clipping"]
    path = tmp_path / "no_clipping_key.json"
    path.write_text(json.dumps(config))
    launcher, extra = _launcher("accelerate", str(path))
    output = run_train(tiny_job, tmp_path, launcher, "refused", *extra, expect_failure=True)
    assert '"gradient_clipping": 0.0' in output and "dpscale train: error:" in output


class _StubDeepSpeed:
    """What the step driver asks of a DeepSpeedBackend, recording the calls (no processes)."""

    owns_step = True

    def __init__(self, busiest: int) -> None:
        from contextlib import contextmanager

        self.busiest, self.events, self.padding_now = busiest, [], False

        @contextmanager
        def accumulation():
            self.events.append("open")
            yield
            self.events.append("reduce")

        @contextmanager
        def padding():
            self.padding_now = True
            yield
            self.padding_now = False

        self.accumulation, self.padding = accumulation, padding

    def micro_batch_count(self, local: int) -> int:
        return max(local, self.busiest)


class _StubEngine:
    """The engine seen by the step driver: its backend, backward and step, recorded."""

    def __init__(self, backend: _StubDeepSpeed) -> None:
        self.backend, self.seen = backend, []

    def backward(self, losses) -> None:
        self.seen.append((float(losses[0]), self.backend.padding_now))

    def step(self) -> None:
        self.backend.events.append("step")


def test_the_step_driver_pads_zero3_ranks_and_steps_once_per_logical_batch():
    from dpscale.driver import run_logical_step
    from dpscale.sampling import DPDataLoader

    data = [torch.tensor([float(i)]) for i in range(40)]
    loader = DPDataLoader(data, sample_rate=0.1, max_physical_batch_size=1, steps=3, seed=b"\0" * 32)
    stub = _StubDeepSpeed(busiest=8)  # as if another rank had 8 micro-batches
    engine = _StubEngine(stub)
    for logical in loader:
        engine.seen.clear()
        outcome = run_logical_step(engine, logical, lambda micro: micro.reshape(-1))
        real = [value for value, padding in engine.seen if not padding]
        assert real == [float(i) for i in logical.indices]  # the rank's own examples, in order
        assert len(engine.seen) == max(len(real), 8) and all(padding for _, padding in engine.seen[len(real):])
        assert stub.events[-3:] == ["open", "reduce", "step"]
        assert outcome.examples == len(real) and outcome.loss_sum == sum(real)
    assert stub.events.count("step") == len(loader) == 3
