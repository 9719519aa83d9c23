"""examples/accelerate_loop.py, the README's Accelerate loop, runs as written (as ``__main__``, its
command line parsed): a tiny BERT folder, a small SST-2-shaped TSV, two steps. Both steps must be
real DP steps (``check_private_steps``: the keyed noise at sigma R / B, the clipping bound, sigma
and epsilon as the accountant gives them for the plan) and AdamW must have moved every
parameter."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch
import transformers

from tests.test_examples_smoke import PrivateSteps, check_private_steps
from tests.tiny_models import save_tiny_classifier

ROOT = Path(__file__).resolve().parents[1]


def save_wide_classifier(folder: Path) -> Path:
    """tests.tiny_models' tiny BERT classifier, initialised wide (std 0.5, not 0.02): its per-example
    gradient norms are then well above the example's R = 1. At 0.02 they are all about 1, and a run
    that skipped the clipping could not be told from one that clipped."""
    save_tiny_classifier(folder)
    config = transformers.AutoConfig.from_pretrained(folder)
    config.initializer_range = 0.5
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def test_accelerate_loop_example_runs(tmp_path, monkeypatch, capsys):
    model = save_wide_classifier(tmp_path / "model")
    data = tmp_path / "train.tsv"
    rows = ["the film is good\t1", "a dull , bad movie\t0"] * 32
    data.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    example = ROOT / "examples" / "accelerate_loop.py"
    monkeypatch.setattr(sys, "argv", [str(example), "--model", str(model), "--data", str(data),
                                      "--noise-key", str(tmp_path / "noise.key"), "--max-steps", "2"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    recorder = PrivateSteps(snapshot=True)
    recorder.install(monkeypatch)
    runpy.run_path(str(example), run_name="__main__")
    line = capsys.readouterr().out.strip().splitlines()[-1]
    steps, epsilon = int(line.split()[0]), float(line.split("epsilon ")[1].split()[0])
    assert steps == 2 and epsilon > 0, line
    check_private_steps(recorder, steps=2)
    engine = recorder.engines[0]
    assert epsilon == pytest.approx(engine.epsilon(), abs=0.005), line  # printed with 2 decimals
    assert engine.config.dataset_size == 64 and engine.config.expected_batch_size == 16  # min(256, N // 4)
    unmoved = [name for name, p in engine.parameters.items() if p.detach().equal(recorder.initial[name])]
    assert not unmoved, f"AdamW left {unmoved} where they were"
