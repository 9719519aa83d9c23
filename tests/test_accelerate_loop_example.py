"""examples/accelerate_loop.py, the README's Accelerate loop, runs as written: a tiny BERT folder,
a small SST-2-shaped TSV, two steps; it must spend privacy (epsilon > 0) and take both steps."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.tiny_models import save_tiny_classifier

ROOT = Path(__file__).resolve().parents[1]


def test_accelerate_loop_example_runs(tmp_path):
    model = save_tiny_classifier(tmp_path / "model")
    data = tmp_path / "train.tsv"
    rows = ["the film is good\t1", "a dull , bad movie\t0"] * 32
    data.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    command = [sys.executable, str(ROOT / "examples" / "accelerate_loop.py"), "--model", str(model), "--data", str(data),
               "--noise-key", str(tmp_path / "noise.key"), "--max-steps", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    line = result.stdout.strip().splitlines()[-1]
    steps, epsilon = int(line.split()[0]), float(line.split("epsilon ")[1].split()[0])
    assert steps == 2 and epsilon > 0, line
