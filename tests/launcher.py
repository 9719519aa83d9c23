"""Start the ranks of a multi-process test for real: one subprocess per rank with the environment
a launcher (torchrun) sets, gloo on CPU. A rank still running at the deadline is killed and the
test fails: a hang never passes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_workers(worker: Path, spec: dict, tmp_path: Path, world_size: int = 2, timeout: float = 90.0,
                   env: dict | None = None) -> list[tuple[int, str]]:
    """Run ``worker spec.json`` on ``world_size`` ranks; (returncode, stderr) per rank."""
    spec = {**spec, "out": str(tmp_path)}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    port = free_port()
    procs = []
    for rank in range(world_size):
        rank_env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                    "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                    "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
        procs.append(subprocess.Popen([sys.executable, str(worker), str(tmp_path / "spec.json")], env=rank_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + timeout
    results = []
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((proc.returncode, err))
    except subprocess.TimeoutExpired:
        pytest.fail(f"a rank was still running after {timeout} s: a hang")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results
