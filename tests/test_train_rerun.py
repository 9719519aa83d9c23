"""`dpscale train` rerun in a folder holding a previous run, from the command line: every refusal
comes before the model loads and before anything is written (no key, no folder), names the flags
that changed ("--epsilon 8 -> 3") and the ways to start anew; --no-resume never reuses the previous
run's key; --fresh-key moves the previous run aside, whole and resumable, and starts at step 0 with
a new key; the library's own refusals keep their Python names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dpscale.checkpoint import load_state, save_atomic
from dpscale.cli import main as cli
from dpscale.noise import NoiseKey
from tests.tiny_models import save_tiny_causal_lm, write_e2e_csv

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """One private run cut short after 1 of 2 planned steps, with its key outside the output folder."""
    root = tmp_path_factory.mktemp("rerun")
    key = root / "run.key"
    NoiseKey.write_new(key)
    files = {"gpt2": save_tiny_causal_lm(root / "gpt2"), "e2e": write_e2e_csv(root / "e2e.csv"), "key": key,
             "out": root / "out"}
    assert cli(["train", *flags(files), "--noise-key", str(key), "--stop-after", "1"]) == 0
    return files


def flags(files, *more: str) -> list[str]:
    return ["--model", str(files["gpt2"]), "--data", str(files["e2e"]), "--output-dir", str(files["out"]),
            "--trainable", "bias", "--batch-size", "16", "--micro-batch", "8", "--max-steps", "2", "--epsilon", "8",
            "--max-eval-examples", "4", "--generations", "0", *more]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


@pytest.fixture
def no_model(monkeypatch):
    """Loading the model fails the test: a refusal must come before it."""
    import dpscale.train.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(models, "load_model", refuse)


def refused(files, capsys, *more: str) -> str:
    before = snapshot(files["out"])
    assert cli(["train", *flags(files), *more]) == 2
    assert snapshot(files["out"]) == before, "the refused rerun wrote into the output folder"
    return capsys.readouterr().err


def test_resuming_without_the_key_creates_nothing_and_names_the_flags(first, capsys, no_model):
    error = refused(first, capsys)
    assert not (first["out"] / "noise.key").exists()
    assert "written with noise key" in error and "no key file at" in error
    assert "--noise-key PATH" in error and "--fresh-key" in error and "--output-dir" in error
    assert "noise_key=" not in error and "fresh_key=True" not in error


def test_resuming_with_another_key_is_refused_naming_both(first, capsys, no_model, tmp_path):
    other = tmp_path / "other.key"
    fingerprint = NoiseKey.write_new(other).fingerprint
    error = refused(first, capsys, "--noise-key", str(other))
    assert fingerprint in error and NoiseKey.from_file(first["key"]).fingerprint in error and "--fresh-key" in error


@pytest.mark.parametrize("change, says", [
    (("--epsilon", "3"), "--epsilon 8 -> 3"),
    (("--batch-size", "8"), "--batch-size 16 -> 8"),
    (("--max-steps", "3"), "--max-steps 2 -> 3"),
    (("--epsilon", "3", "--max-grad-norm", "0.5"), "--epsilon 8 -> 3; --max-grad-norm 0.1 -> 0.5"),
])
def test_a_changed_flag_is_refused_naming_it_before_the_model_loads(first, capsys, no_model, change, says):
    error = refused(first, capsys, "--noise-key", str(first["key"]), *change)
    assert says in error and "--fresh-key" in error and "--output-dir" in error
    assert "noise_multiplier=" not in error


@pytest.mark.slow  # two runs
def test_max_steps_only_caps_a_run_planned_in_epochs(first, tmp_path):
    """With --epochs the noise is calibrated for the epochs: --max-steps may change on resume."""
    files = {**first, "out": tmp_path / "epochs"}
    common = ["--noise-key", str(first["key"]), "--epochs", "1"]
    assert cli(["train", *flags(files), *common, "--stop-after", "1"]) == 0
    assert cli(["train", *flags(files), *common, "--max-steps", "3", "--stop-after", "1"]) == 0
    assert load_state(files["out"] / "checkpoint" / "state.pt", kind="train-state")["step"] == 2


def test_a_checkpoint_without_its_flags_is_refused_by_the_mechanism_in_flag_words(first, capsys, tmp_path):
    """Checkpoints written before they recorded their flags: the engine's mechanism check, worded with flags."""
    import shutil

    files = {**first, "out": tmp_path / "old"}
    shutil.copytree(first["out"], files["out"])
    state_path = files["out"] / "checkpoint" / "state.pt"
    state = load_state(state_path, kind="train-state")
    del state["job"]
    save_atomic(state, state_path, kind="train-state")
    assert cli(["train", *flags(files), "--noise-key", str(first["key"]), "--epsilon", "3"]) == 2
    error = capsys.readouterr().err
    assert "noise_multiplier" in error and "--epsilon" in error and "--fresh-key" in error
    assert "noise_key=" not in error and "fresh_key=True" not in error


def test_no_resume_with_the_previous_runs_key_is_refused(first, capsys, no_model):
    error = refused(first, capsys, "--noise-key", str(first["key"]), "--no-resume")
    assert "same batches and noise" in error and "--fresh-key" in error


def test_fresh_key_with_a_key_file_is_refused(first, capsys, no_model):
    error = refused(first, capsys, "--noise-key", str(first["key"]), "--fresh-key")
    assert "drop --noise-key" in error


@pytest.mark.slow  # three runs
def test_fresh_key_sets_the_previous_run_aside_and_starts_at_step_zero_with_a_new_key(first, tmp_path):
    import shutil

    files = {**first, "out": tmp_path / "out"}
    assert cli(["train", *flags(files), "--stop-after", "1"]) == 0  # key created in the folder
    old_key = NoiseKey.from_file(files["out"] / "noise.key").fingerprint
    old_state = load_state(files["out"] / "checkpoint" / "state.pt", kind="train-state")
    assert cli(["train", *flags(files), "--epsilon", "3", "--fresh-key", "--stop-after", "1"]) == 0
    aside = files["out"] / f"previous-{old_key}"
    assert (aside / "noise.key").is_file() and (aside / "checkpoint" / "state.pt").is_file()
    assert NoiseKey.from_file(aside / "noise.key").fingerprint == old_key
    assert NoiseKey.from_file(files["out"] / "noise.key").fingerprint != old_key
    new = load_state(files["out"] / "checkpoint" / "state.pt", kind="train-state")
    assert new["step"] == 1 and new["privacy"]["accountant"]["segments"][0][2] == 1  # its own accounting, from 0
    assert new["privacy"]["key_fingerprint"] != old_key
    metrics = json.loads((files["out"] / "metrics.json").read_text())
    assert metrics["privacy"]["target_epsilon"] == 3 and metrics["privacy"]["steps"] == 1
    # the previous run, moved whole, resumes where it stopped, with its own key and flags
    moved = tmp_path / "moved"
    shutil.move(aside, moved)
    assert cli(["train", *flags({**files, "out": moved})]) == 0
    resumed = load_state(moved / "checkpoint" / "state.pt", kind="train-state")
    assert old_state["step"] == 1 and resumed["step"] == 2 and resumed["privacy"]["key_fingerprint"] == old_key


def test_the_library_refusal_keeps_its_python_names(tmp_path):
    from torch import nn

    from dpscale import CheckpointError, DPConfig, PrivacyEngine

    def engine(key):
        model = nn.Linear(3, 2)
        config = DPConfig(max_grad_norm=1.0, expected_batch_size=4, dataset_size=40, noise_multiplier=1.0, steps=5)
        return PrivacyEngine(model, config, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), noise_key=key)

    state = engine(NoiseKey.generate()).state_dict()
    with pytest.raises(CheckpointError, match=r"noise_key=path.*fresh_key=True"):
        engine(NoiseKey.generate()).load_state_dict(state)
