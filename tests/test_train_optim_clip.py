"""`dpscale train --optimizer adambc` and `--clip-quantile` end to end on a tiny GPT-2 saved as a
local folder: the options reach the engine, R is in the per-step log and the privacy report, epsilon
is the fixed-clipping run's, a rerun resumes to the parameters and R of an uninterrupted run, and
options that do not go together are refused before anything loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from dpscale.accounting import calibrate_noise_multiplier, compute_epsilon
from dpscale.checkpoint import load_state
from dpscale.cli import main as cli
from dpscale.noise import NoiseKey
from tests.tiny_models import save_tiny_causal_lm, write_e2e_csv

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_optim_clip")
    key = root / "noise.key"
    NoiseKey.write_new(key)
    return {"gpt2": save_tiny_causal_lm(root / "gpt2"), "e2e": write_e2e_csv(root / "e2e.csv"), "key": key}


def train(folders, out: Path, *flags: str) -> dict:
    assert cli(["train", "--noise-key", str(folders["key"]), "--output-dir", str(out), "--max-eval-examples", "8",
                "--generations", "0", "--model", str(folders["gpt2"]), "--data", str(folders["e2e"]),
                "--eval-data", str(folders["e2e"]), "--batch-size", "16", "--micro-batch", "8", "--max-steps", "4",
                "--trainable", "all", "--clip-fn", "abadi", "--max-grad-norm", "0.5", *flags]) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow  # three tiny jobs: one to two minutes on one loaded core
def test_adambc_and_adaptive_clipping_run_log_r_and_resume_exactly(folders, tmp_path):
    flags = ("--optimizer", "adambc", "--lr", "1e-4", "--clip-quantile", "0.5", "--clip-quantile-lr", "0.3",
             "--checkpoint-every", "1")
    train(folders, tmp_path / "whole", *flags)
    report = json.loads((tmp_path / "whole" / "privacy_report.json").read_text())
    # the accounting does not change: sigma is the one calibrated for the target, epsilon its own
    q, delta = report["sample_rate"], report["delta"]
    assert report["noise_multiplier"] == calibrate_noise_multiplier(8.0, delta, q, 4)
    assert report["epsilon"] == compute_epsilon(report["noise_multiplier"], q, 4, delta)
    norms = [r for _, r in report["adaptive_clipping"]["clip_norm_by_step"]]
    assert len(norms) == 4 and norms[0] == 0.5 and len(set(norms)) == 4
    assert report["gradient_noise_multiplier"] > report["noise_multiplier"]
    history = load_state(tmp_path / "whole" / "checkpoint" / "state.pt", kind="train-state")["history"]
    assert [record["clip_norm"] for record in history] == norms  # the per-step log shows R
    assert all(0 <= record["unclipped_fraction"] <= 1 for record in history)
    train(folders, tmp_path / "parts", *flags, "--stop-after", "2")
    parts = train(folders, tmp_path / "parts", *flags)
    by_step = report["adaptive_clipping"]["clip_norm_by_step"]
    assert parts["privacy"]["adaptive_clipping"]["clip_norm_by_step"] == by_step
    a = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "model").state_dict()
    b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "parts" / "model").state_dict()
    for name, value in a.items():
        assert torch.equal(b[name], value), name


@pytest.mark.parametrize(("flags", "says"), [
    (["--clip-quantile", "0.5", "--clip-fn", "automatic"], "--clip-fn abadi"),
    (["--clip-count-std", "3"], "--clip-quantile"),
    (["--adambc-floor", "1e-6"], "--optimizer adambc"),
    (["--optimizer", "adam"], "optimizer must be one of"),
    (["--optimizer", "adambc", "--non-private"], "--optimizer adamw"),
])
def test_options_that_do_not_go_together_are_refused(tmp_path, capsys, flags, says):
    assert cli(["train", "--output-dir", str(tmp_path), *flags]) == 2
    assert says in capsys.readouterr().err
