"""What DPTrainer leaves and says, as ``dpscale train`` does: privacy_report.json and a model card
(its metadata carrying the report's figures) in output_dir when training ends and beside every
save_model; epochs logged as passes over the data (steps x q), not the Trainer's passes of its own
loader; the stop at the privacy budget said in the log (a warning) and in the log history."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

pytest.importorskip("transformers")

from dpscale import DPConfig  # noqa: E402
from dpscale.integrations.trainer import DPTrainer  # noqa: E402
from tests import trainer_worker as worker  # noqa: E402

torch.set_num_threads(1)


def card_figures(folder) -> dict:
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "differentially private" in card
    return yaml.safe_load(card.split("---\n")[1])["differential_privacy"]


def test_training_leaves_the_privacy_report_and_a_model_card_and_logs_epochs_over_the_data(tmp_path):
    # calibrated for the 3 steps it takes: the Trainer's own count would call them one epoch (its loader's pass)
    config = DPConfig(max_grad_norm=0.5, expected_batch_size=6, dataset_size=24, target_epsilon=8.0, steps=3,
                      target_delta=1e-3)
    t = DPTrainer(model=worker.gpt2(), args=worker.training_arguments({"steps": 3}, str(tmp_path)),
                  train_dataset=worker.TokenDataset(), data_collator=worker.collate, dp_config=config,
                  noise_key=worker.KEY)
    t.train()
    engine = t.privacy_engine
    report = json.loads((tmp_path / "privacy_report.json").read_text())
    assert report["steps"] == 3 and report["epsilon"] == pytest.approx(engine.epsilon(), rel=1e-12)
    figures = card_figures(tmp_path)
    for name in ("epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "accountant", "clipping",
                 "max_grad_norm", "privacy_unit"):
        assert figures[name] == report[name], name
    # 3 steps at q = 6 / 24 are 0.75 of a pass over the data, logged as such at every step
    q = 6 / 24
    epochs = [entry["epoch"] for entry in t.state.log_history if "epsilon" in entry and "train_runtime" not in entry]
    assert epochs == pytest.approx([q, 2 * q, 3 * q])
    assert t.state.epoch == pytest.approx(3 * q)
    t.save_model(str(tmp_path / "saved"))  # a card beside the weights, with the report
    assert (tmp_path / "saved" / "model.safetensors").is_file()
    assert card_figures(tmp_path / "saved")["epsilon"] == report["epsilon"]
    assert (tmp_path / "saved" / "privacy_report.json").is_file()


def test_each_checkpoint_carries_the_card_of_its_own_step(tmp_path):
    t = worker.trainer({"dtype": "float64", "steps": 2}, str(tmp_path), save_strategy="steps", save_steps=1)
    t.train()
    first, second = card_figures(tmp_path / "checkpoint-1"), card_figures(tmp_path / "checkpoint-2")
    assert first["steps"] == 1 and second["steps"] == 2 and first["epsilon"] < second["epsilon"]
