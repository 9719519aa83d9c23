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

from dpscale.checkpoint import load_state
from dpscale.cli import main as cli
from dpscale.noise import NoiseKey
from tests.tiny_models import (
    E2E_ROWS,
    save_tiny_causal_lm,
    save_tiny_classifier,
    write_e2e_csv,
)

torch.set_num_threads(1)

USERS = 20
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
    authored = root / "authored.csv"  # 64 rows by 20 users of 3 or 4 rows each, not adjacent
    with open(authored, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["mr", "ref", "author"])
        writer.writeheader()
        writer.writerows({**row, "author": f"u{i % USERS}"} for i, row in enumerate(E2E_ROWS * 16))
    key = root / "noise.key"
    NoiseKey.write_new(key)
    return {"gpt2": save_tiny_causal_lm(root / "gpt2"), "bert": save_tiny_classifier(root / "bert"), "e2e": e2e,
            "sst": sst, "authored": authored, "key": key}


def train(folders, out: Path, *flags: str) -> dict:
    assert cli(["train", "--noise-key", str(folders["key"]), "--output-dir", str(out), "--max-eval-examples", "16",
                "--generations", "2", "--max-new-tokens", "4", *flags]) == 0
    return json.loads((out / "metrics.json").read_text())


def causal(folders, *flags):
    return ("--model", str(folders["gpt2"]), "--data", str(folders["e2e"]), "--eval-data", str(folders["e2e"]),
            "--batch-size", "16", "--micro-batch", "8", "--max-steps", "3", *flags)


def by_user(folders, *flags):
    """The causal job on the authored table at user level: 20 users, B = 4 users per step."""
    return ("--model", str(folders["gpt2"]), "--data", str(folders["authored"]), "--eval-data", str(folders["e2e"]),
            "--batch-size", "4", "--micro-batch", "8", "--max-steps", "3", "--privacy-unit", "user",
            "--user-column", "author", *flags)


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


@pytest.mark.parametrize("unit", ["example", "user"])
def test_a_rerun_resumes_to_the_parameters_of_an_uninterrupted_run(folders, tmp_path, unit):
    # at user level with k = 2 of 3 or 4 rows per user: the loader's round-robin cursors must resume too
    shape = causal if unit == "example" else lambda f, *more: by_user(f, "--examples-per-user", "2", *more)
    flags = shape(folders, "--trainable", "all", "--checkpoint-every", "1", "--max-steps", "4")
    train(folders, tmp_path / "whole", *flags)
    train(folders, tmp_path / "parts", *flags, "--stop-after", "2")  # the same plan, cut short
    state = load_state(tmp_path / "parts" / "checkpoint" / "privacy.pt")
    assert state["steps_taken"] == 2
    metrics = train(folders, tmp_path / "parts", *flags)
    assert metrics["steps"] == 4 and metrics["privacy"]["steps"] == 4
    assert metrics["privacy"]["privacy_unit"] == unit
    whole_metrics = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert metrics["privacy"]["epsilon"] == whole_metrics["privacy"]["epsilon"]
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


# user level -------------------------------------------------------------------------------------


def test_user_level_job_counts_users_and_says_so(folders, tmp_path, capsys):
    # epochs at user level: one epoch is N users drawn in expectation, ceil(1 / q) = 5 steps at q = 4 / 20
    metrics = train(folders, tmp_path, *by_user(folders, "--examples-per-user", "2", "--epochs", "1",
                                                "--max-steps", "2", "--trainable", "all"))
    report = json.loads((tmp_path / "privacy_report.json").read_text())
    for privacy in (report, metrics["privacy"]):
        assert privacy["privacy_unit"] == "user" and privacy["examples_per_user"] == 2
        assert privacy["dataset_size"] == USERS and privacy["expected_batch_size"] == 4
        assert privacy["sample_rate"] == pytest.approx(4 / USERS) and privacy["planned_steps"] == 5
        assert privacy["protects"].startswith("each user")
    assert metrics["privacy_unit"] == "user" and metrics["train_users"] == USERS and metrics["train_examples"] == 64
    assert metrics["steps"] == 2 and 0 < metrics["privacy"]["epsilon"] <= 8.0
    from dpscale.accounting import compute_epsilon

    assert metrics["privacy"]["epsilon"] == pytest.approx(compute_epsilon(
        report["noise_multiplier"], 4 / USERS, 2, report["delta"], dataset_size=USERS), rel=1e-9)
    assert report["delta"] == pytest.approx(USERS ** -1.1)  # the default delta is over users
    out = capsys.readouterr().out
    assert f"{USERS} users ('author') over 64 training examples, expected batch 4 users" in out


def test_an_example_level_job_says_its_unit(folders, tmp_path):
    metrics = train(folders, tmp_path, *causal(folders, "--trainable", "bias", "--max-steps", "1"))
    assert metrics["privacy_unit"] == "example" and metrics["privacy"]["privacy_unit"] == "example"
    assert "train_users" not in metrics


def test_the_non_private_baseline_of_a_user_level_config_sees_as_many_rows_per_step(folders, tmp_path):
    # 4 users per step, each bringing min(3, their 3 or 4 rows) = 3: batches of 12 rows, no privacy unit
    metrics = train(folders, tmp_path, *by_user(folders, "--examples-per-user", "3", "--trainable", "bias",
                                                "--non-private", "--max-steps", "2"))
    assert metrics["non_private"] and metrics["privacy"]["epsilon"] is None and metrics["privacy_unit"] is None
    assert metrics["steps"] == 2 and not (tmp_path / "privacy_report.json").exists()
    state = load_state(tmp_path / "checkpoint" / "state.pt", kind="train-state")
    assert [record["batch"] for record in state["history"]] == [12, 12]


@pytest.mark.parametrize("flags, says", [
    (("--privacy-unit", "user"), "--user-column"),
    (("--privacy-unit", "person"), "privacy_unit must be one of"),
    (("--user-column", "author"), "--privacy-unit user"),
    (("--examples-per-user", "2"), "--privacy-unit user"),
    (("--privacy-unit", "user", "--user-column", "author", "--examples-per-user", "0"), "positive integer"),
    (("--privacy-unit", "user", "--user-column", "author", "--examples-per-user", "9", "--micro-batch", "8"),
     "micro-batch"),
])
def test_user_level_options_that_do_not_go_together_are_refused(tmp_path, capsys, flags, says):
    assert cli(["train", "--output-dir", str(tmp_path), *flags]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "checkpoint").exists()


@pytest.mark.parametrize("flags, says", [
    (("--user-column", "writer"), "has no column 'writer'"),
    (("--user-column", "author", "--batch-size", "21"), "training data has 20 users"),
])
def test_user_level_data_problems_are_refused_before_the_model_loads(folders, tmp_path, capsys, flags, says):
    arguments = ["train", "--model", str(tmp_path / "no-such-model"), "--data", str(folders["authored"]),
                 "--privacy-unit", "user", "--output-dir", str(tmp_path), *flags]
    assert cli(arguments) == 2  # the missing model would fail later, with another message
    assert says in capsys.readouterr().err


def test_rows_without_a_user_are_refused():
    from dpscale.errors import ConfigError
    from dpscale.train.data import user_ids

    assert user_ids([{"u": "a"}, {"u": 3}], "u") == ["a", 3]
    with pytest.raises(ConfigError, match="row 1 has no user"):
        user_ids([{"u": "a"}, {"u": ""}], "u")
    with pytest.raises(ConfigError, match="strings or numbers"):
        user_ids([{"u": ["a"]}], "u")
