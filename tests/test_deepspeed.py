"""DeepSpeed ZeRO 0-3 on 2 CPU processes (gloo), real DeepSpeed: the parameters after 2 noised
DP steps equal the single-process run on the same global batches and key. One rank's draw in the
second step is empty, and the ranks' micro-batch counts differ, so the collectives must still match.
The worker is tests/deepspeed_worker.py, launched with torchrun in a subprocess under a timeout."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from tests.deepspeed_worker import reference  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "deepspeed_worker.py"
TIMEOUT_S = 240  # the first launch on a fresh machine compiles a small DeepSpeed op (about 30 s)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path: Path, **spec) -> None:
    spec = {"out": str(tmp_path), **spec}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(WORKER), str(path)]
    try:
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"the 2-process DeepSpeed run did not finish in {TIMEOUT_S} s:\n{(error.stderr or '')[-4000:]}")
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-2000:]}\n{result.stderr[-6000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_matches_single_process(tmp_path, stage):
    clippings = ["flat", "per_layer"]
    launch(tmp_path, stage=stage, clippings=clippings)
    for clipping in clippings:
        got = torch.load(tmp_path / f"{clipping}.pt", weights_only=True)
        assert got["steps_taken"] == 2
        expected = reference(clipping)
        assert set(got["params"]) == set(expected)
        for name, value in expected.items():
            err = float((got["params"][name] - value).abs().max())
            assert err <= 1e-5, f"ZeRO-{stage} {clipping}: {name} differs from one process by {err:.3g}"


@pytest.mark.slow
def test_deepspeed_default_gradient_clipping_is_refused(tmp_path):
    # No "gradient_clipping" key: DeepSpeed 0.19.8 clips the reduced gradient at 1.0.
    launch(tmp_path, stage=2, clippings=["flat"], ds_overrides={"gradient_clipping": None},
           expect_error='"gradient_clipping"')
    message = (tmp_path / "refused.txt").read_text()
    assert "gradient_clipping" in message and "0.0" in message


@pytest.mark.slow
def test_gradient_accumulation_in_deepspeed_is_refused(tmp_path):
    launch(tmp_path, stage=1, clippings=["flat"],
           ds_overrides={"gradient_accumulation_steps": 2, "train_micro_batch_size_per_gpu": 2},
           expect_error='"gradient_accumulation_steps"')


def test_shipped_configs_are_ready_for_dp():
    for path in sorted((ROOT / "ds_configs").glob("*.json")):
        cfg = json.loads(path.read_text())
        assert cfg["gradient_clipping"] == 0.0, path.name
        assert not cfg.get("fp16", {}).get("enabled", False), path.name
        assert cfg.get("gradient_accumulation_steps", 1) == 1, path.name
