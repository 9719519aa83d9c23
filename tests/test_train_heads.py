"""`dpscale train` with the head options, end to end on tiny real architectures saved as folders:
a zero head by default under DP (the eval loss before training is exactly log 2), LP-FT as one run
whose epsilon is that of all its steps and that resumes across the phase change to the parameters
of an uninterrupted run, prompt-based classification through a tiny Llama's label words, and the
options refused where they would be ignored."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import transformers

from dpscale.accounting import compute_epsilon
from dpscale.checkpoint import load_state
from dpscale.cli import main as cli
from dpscale.noise import NoiseKey
from tests.tiny_models import save_tiny_causal_lm, save_tiny_classifier

torch.set_num_threads(1)

ROWS = [{"sentence": text, "label": label} for text, label in [
    ("a good film", 1), ("a dull , bad movie", 0), ("the film is good", 1), ("bad", 0),
    ("good , good , good", 1), ("a bad plot", 0), ("the best film", 1), ("dull and slow", 0),
]] * 8


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_heads")
    sst = root / "sst.tsv"
    with open(sst, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["label", "sentence"], delimiter="\t")
        writer.writeheader()
        writer.writerows(ROWS)
    key = root / "noise.key"
    NoiseKey.write_new(key)
    return {"bert": save_tiny_classifier(root / "bert"), "llama": save_tiny_causal_lm(root / "llama", kind="llama"),
            "sst": sst, "key": key}


def train(folders, out, *flags) -> dict:
    assert cli(["train", "--noise-key", str(folders["key"]), "--output-dir", str(out), "--task", "classification",
                "--data", str(folders["sst"]), "--eval-data", str(folders["sst"]), "--max-eval-examples", "16",
                "--batch-size", "16", "--micro-batch", "8", "--clip-fn", "abadi", "--max-grad-norm", "1.0",
                *flags]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_the_head_starts_at_zero_under_dp_and_as_built_otherwise(folders, tmp_path):
    private = train(folders, tmp_path / "dp", "--model", str(folders["bert"]), "--trainable", "bias",
                    "--max-steps", "1")
    assert private["command_config"]["head_init"] == "zero"
    assert private["before"]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # uniform: the head is zero
    for flags in (("--non-private",), ("--head-init", "default")):
        other = train(folders, tmp_path / flags[-1], "--model", str(folders["bert"]), "--trainable", "bias",
                      "--max-steps", "1", *flags)
        assert other["command_config"]["head_init"] == "default"
        assert abs(other["before"]["loss"] - math.log(2)) > 1e-4


@pytest.mark.slow  # four tiny runs: about 90 s here under load
def test_lp_ft_is_one_run_and_resumes_across_the_phase_change(folders, tmp_path, capsys):
    flags = ("--model", str(folders["bert"]), "--trainable", "lora", "--lora-r", "2", "--lp-steps", "2",
             "--max-steps", "4", "--checkpoint-every", "1", "--epsilon", "3")
    whole = train(folders, tmp_path / "whole", *flags)
    assert "after 2 steps of the head" in capsys.readouterr().out
    privacy = whole["privacy"]
    assert whole["steps"] == privacy["steps"] == privacy["planned_steps"] == 4
    assert privacy["epsilon"] == pytest.approx(compute_epsilon(privacy["noise_multiplier"], privacy["sample_rate"], 4,
                                                               privacy["delta"]), rel=1e-9)
    assert privacy["epsilon"] <= 3.0
    # in three invocations: phase 1 checkpoints the head alone, the second hands over after step 2 and
    # checkpoints the adapters and the head, the third resumes in phase 2
    train(folders, tmp_path / "parts", *flags, "--stop-after", "1")
    head_only = load_state(tmp_path / "parts" / "checkpoint" / "state.pt", kind="train-state")
    assert head_only["step"] == 1 and head_only["params"] and all(
        "modules_to_save" in name for name in head_only["params"])
    train(folders, tmp_path / "parts", *flags, "--stop-after", "1")
    both = load_state(tmp_path / "parts" / "checkpoint" / "state.pt", kind="train-state")
    assert both["step"] == 2 and any("lora_" in name for name in both["params"])
    assert any("modules_to_save" in name for name in both["params"])
    resumed = train(folders, tmp_path / "parts", *flags)
    assert resumed["privacy"]["epsilon"] == privacy["epsilon"] and resumed["steps"] == 4
    both = load_state(tmp_path / "parts" / "checkpoint" / "state.pt", kind="train-state")["params"]
    reference = load_state(tmp_path / "whole" / "checkpoint" / "state.pt", kind="train-state")["params"]
    assert both.keys() == reference.keys()
    for name, value in reference.items():
        assert torch.equal(both[name], value), name


def test_lp_ft_probes_at_its_own_learning_rate(folders, tmp_path):
    flags = ("--model", str(folders["bert"]), "--trainable", "all", "--lp-steps", "2", "--lp-lr", "0.05",
             "--lr", "1e-3", "--max-steps", "3", "--checkpoint-every", "1")
    train(folders, tmp_path, *flags, "--stop-after", "1")
    probing = load_state(tmp_path / "checkpoint" / "state.pt", kind="train-state")["optimizer"]
    assert [group["lr"] for group in probing["param_groups"]] == [0.05]
    train(folders, tmp_path, *flags, "--stop-after", "2")  # steps 2 and 3: the hand-over, then fine-tuning
    tuning = load_state(tmp_path / "checkpoint" / "state.pt", kind="train-state")
    assert tuning["step"] == 3 and [group["lr"] for group in tuning["optimizer"]["param_groups"]] == [1e-3]


def test_prompt_classification_through_the_label_words(folders, tmp_path):
    flags = ("--model", str(folders["llama"]), "--label-words", "bad,good", "--trainable", "all", "--max-steps", "2",
             "--max-length", "24")
    private = train(folders, tmp_path / "dp", *flags)
    assert private["command_config"]["prompt_template"] == "{text} It was"
    assert private["command_config"]["head_init"] == "default"
    assert 0 <= private["after"]["accuracy"] <= 1 and private["privacy"]["epsilon"] <= 8.0
    record = json.loads((tmp_path / "dp" / "model" / "dpscale_prompt.json").read_text())
    assert record["label_words"] == ["bad", "good"] and record["labels"] == ["0", "1"]
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dp" / "model")
    assert model.config.architectures == ["LlamaForCausalLM"]  # no classification head was made
    baseline = train(folders, tmp_path / "np", *flags, "--non-private")
    assert baseline["privacy"]["epsilon"] is None and "accuracy" in baseline["after"]


@pytest.mark.parametrize("flags, says", [
    (("--head-init", "zero", "--task", "causal-lm"), "has none"),
    (("--head-init", "sideways"), "zero or default"),
    (("--lp-steps", "2", "--non-private"), "for private runs"),
    (("--lp-steps", "5", "--max-steps", "5"), "leaves no fine-tuning step"),
    (("--lp-steps", "2", "--label-words", "bad,good"), "has none"),
    (("--lp-steps", "2", "--clip-quantile", "0.5", "--clip-fn", "abadi"), "restart adaptive clipping"),
    (("--lp-lr", "0.01"), "add --lp-steps K"),
    (("--lp-steps", "2", "--lp-lr", "0"), "lp_lr must be a positive number"),
    (("--prompt-template", "{text} It was"), "only with label_words"),
    (("--label-words", "bad,good", "--prompt-template", "It was"), "exactly once"),
])
def test_head_options_are_refused_where_they_mean_nothing(tmp_path, capsys, flags, says):
    assert cli(["train", "--task", "classification", "--data", str(tmp_path / "none.tsv"), "--output-dir",
                str(tmp_path), *flags]) == 2
    assert says in capsys.readouterr().err
