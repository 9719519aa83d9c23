"""`dpscale train` end to end on tiny real architectures saved as local model folders (what a user
passes as --model): every output where the docs say, the saved model loads with transformers or
PEFT, epsilon within the target, YAML plus flag overrides, the non-private baseline, resume to the
same parameters, and the trackers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import transformers

from dpscale.cli import main as cli
from dpscale.noise import NoiseKey
from tests.tiny_models import save_tiny_causal_lm, save_tiny_classifier, write_e2e_csv

torch.set_num_threads(1)

CLASSIFICATION_ROWS = [{"sentence": text, "label": label} for text, label in [
    ("a good film", 1), ("a dull , bad movie", 0), ("the film is good", 1), ("bad", 0),
    ("good , good , good", 1), ("a bad plot", 0), ("the best film", 1), ("dull and slow", 0),
]] * 8


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_job")
    e2e = write_e2e_csv(root / "e2e.csv")
    sst = root / "sst.tsv"
    with open(sst, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["label", "sentence"], delimiter="\t")
        writer.writeheader()
        writer.writerows(CLASSIFICATION_ROWS)
    key = root / "noise.key"
    NoiseKey.write_new(key)
    return {"gpt2": save_tiny_causal_lm(root / "gpt2"), "bert": save_tiny_classifier(root / "bert"), "e2e": e2e,
            "sst": sst, "key": key}


def train(folders, out: Path, *flags: str) -> dict:
    assert cli(["train", "--noise-key", str(folders["key"]), "--output-dir", str(out), "--max-eval-examples", "16",
                "--generations", "2", "--max-new-tokens", "4", *flags]) == 0
    return json.loads((out / "metrics.json").read_text())


def causal(folders, *flags):
    return ("--model", str(folders["gpt2"]), "--data", str(folders["e2e"]), "--eval-data", str(folders["e2e"]),
            "--batch-size", "16", "--micro-batch", "8", "--max-steps", "3", *flags)


def test_causal_lm_job_leaves_every_output_and_a_loadable_model(folders, tmp_path):
    metrics = train(folders, tmp_path, *causal(folders, "--trainable", "all", "--epsilon", "8"))
    for name in ("model/config.json", "privacy_report.json", "epsilon.png", "metrics.json", "training.png",
                 "checkpoint/state.pt", "checkpoint/privacy.pt"):
        assert (tmp_path / name).is_file(), name
    report = json.loads((tmp_path / "privacy_report.json").read_text())
    assert report["steps"] == 3 and 0 < report["epsilon"] <= 8.0
    assert metrics["privacy"]["epsilon"] == report["epsilon"]
    assert metrics["before"]["loss"] > 0 and metrics["after"]["loss"] > 0 and "bleu" in metrics["after"]
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "model")
    assert model.generate(**tokenizer("name[Aromi]\n", return_tensors="pt"), max_new_tokens=2).shape[1] >= 1
    assert (tmp_path / "training.png").read_bytes()[:4] == b"\x89PNG"


def test_lora_job_saves_an_adapter_naming_its_base(folders, tmp_path):
    train(folders, tmp_path, *causal(folders, "--trainable", "lora", "--lora-r", "4"))
    adapter = json.loads((tmp_path / "model" / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]) == folders["gpt2"].resolve()
    from peft import AutoPeftModelForCausalLM

    assert AutoPeftModelForCausalLM.from_pretrained(tmp_path / "model") is not None


def test_classification_job_with_bitfit_from_yaml_and_flags(folders, tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(f"model: {folders['bert']}\ntask: classification\ndata: {folders['sst']}\n"
                      f"eval-data: {folders['sst']}\ntrainable: bias\nbatch_size: 16\nmicro_batch: 8\nmax_steps: 50\n"
                      "epsilon: 3\n")
    metrics = train(folders, tmp_path / "out", "--config", str(config), "--max-steps", "2")  # the flag wins
    assert metrics["steps"] == 2 and metrics["trainable"] == "bias"
    assert 0 <= metrics["after"]["accuracy"] <= 1 and metrics["privacy"]["epsilon"] <= 3.0
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "model")
    assert model.config.num_labels == 2


def test_the_non_private_baseline_has_no_privacy_claim(folders, tmp_path):
    metrics = train(folders, tmp_path, *causal(folders, "--trainable", "all", "--non-private"))
    assert metrics["non_private"] and metrics["privacy"]["epsilon"] is None
    assert not (tmp_path / "privacy_report.json").exists()


def test_a_rerun_resumes_to_the_parameters_of_an_uninterrupted_run(folders, tmp_path):
    flags = causal(folders, "--trainable", "all", "--checkpoint-every", "1", "--max-steps", "4")
    train(folders, tmp_path / "whole", *flags)
    train(folders, tmp_path / "parts", *flags, "--stop-after", "2")  # the same plan, cut short
    state = torch.load(tmp_path / "parts" / "checkpoint" / "privacy.pt", weights_only=True)
    assert state["steps_taken"] == 2
    metrics = train(folders, tmp_path / "parts", *flags)
    assert metrics["steps"] == 4 and metrics["privacy"]["steps"] == 4
    whole = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "model").state_dict()
    parts = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "parts" / "model").state_dict()
    for name, value in whole.items():
        assert torch.equal(parts[name], value), name


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_trackers_log_the_privacy_of_every_step(folders, tmp_path, monkeypatch, tracker):
    pytest.importorskip(tracker)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    train(folders, tmp_path / "out", *causal(folders, "--trainable", "all", "--report-to", tracker))
    logs = list(tmp_path.rglob("events.out.tfevents.*")) if tracker == "tensorboard" else \
        list(tmp_path.rglob("*.wandb"))
    assert logs, f"no {tracker} run written under {tmp_path}"
    if tracker == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(logs[0].parent))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        assert {"epsilon", "sigma", "sample_rate", "clip_fraction", "mean_norm"} <= tags, tags
        assert len(events.Scalars("epsilon")) == 3


def test_bad_options_are_refused_before_loading_anything(tmp_path, capsys):
    assert cli(["train", "--task", "translation", "--output-dir", str(tmp_path)]) == 2
    assert "task must be one of" in capsys.readouterr().err
    assert cli(["train", "--task", "classification", "--output-dir", str(tmp_path)]) == 2
    assert "needs --data" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("learning_rate: 3\n")
    assert cli(["train", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "Unknown option" in capsys.readouterr().err
