"""`dpscale train` checks every data file before anything is created or loaded: a NaN, empty or
unexpected label, a byte that is not UTF-8, a missing column, an empty row or text, an eval label
the model has no class for, each refused with a DataError naming the file, the line and the fix;
the label set is printed and recorded in metrics.json, and counted as a plain csv reading counts it."""

from __future__ import annotations

import csv
import json
import logging
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from dpscale import DataError
from dpscale.cli import main as cli
from dpscale.noise import NoiseKey
from dpscale.train.checks import check_data
from dpscale.train.config import TrainConfig
from tests.tiny_models import save_tiny_classifier

torch.set_num_threads(1)

TEXTS = ["a good film", "a dull , bad movie", "the film is good", "bad", "good , good", "a bad plot"]


def table(path: Path, labels, header=("sentence", "label"), texts=None) -> Path:
    texts = texts or [TEXTS[i % len(TEXTS)] for i in range(len(labels))]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(zip(texts, labels))
    return path


def config(data: Path, **changes) -> TrainConfig:
    return TrainConfig(task="classification", data=str(data), **changes)


@pytest.mark.parametrize("bad, why", [("nan", "a missing-value marker"), ("NaN", "a missing-value marker"),
                                      ("", "empty"), ("inf", "not a finite number")])
def test_a_label_that_is_no_label_is_refused_naming_file_and_line(tmp_path, bad, why):
    data = table(tmp_path / "t.csv", ["0", "1", "0", bad, "1"])
    with pytest.raises(DataError, match=rf"t\.csv, line 5: the label .* is {why}.*Fill in the row's label"):
        check_data(config(data))


def test_a_nan_in_json_lines_is_refused(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"sentence": "a", "label": 1}\n\n{"sentence": "b", "label": NaN}\n')
    with pytest.raises(DataError, match=r"t\.jsonl, line 3: the label nan .* not a finite number"):
        check_data(config(path))


def test_stated_labels_refuse_a_stray_label_and_accept_a_real_na(tmp_path):
    data = table(tmp_path / "t.csv", ["0", "1", "0", "2", "1"])
    with pytest.raises(DataError, match=r"t\.csv, line 5: the label 2 .* not among --labels 0,1"):
        check_data(config(data, labels="0,1"))
    checked = check_data(config(data, labels="0,1,2"))
    assert checked.labels == [0, 1, 2] and checked.label_counts == {"0": 2, "1": 2, "2": 1}
    na = table(tmp_path / "na.csv", ["yes", "no", "NA", "yes"])
    with pytest.raises(DataError, match="missing-value marker"):
        check_data(config(na))
    assert check_data(config(na, labels=["yes", "no", "NA"])).labels == ["yes", "no", "NA"]  # the stated id order


def test_a_stray_label_without_stated_labels_is_counted_and_named(tmp_path, caplog):
    labels = ["0", "1"] * 10 + ["2"]
    data = table(tmp_path / "t.csv", labels)
    with caplog.at_level(logging.WARNING, logger="dpscale.train.checks"):
        checked = check_data(config(data))
    with open(data, newline="") as f:  # the independent count: Python's csv module
        expected = Counter(row["label"] for row in csv.DictReader(f))
    assert checked.label_counts == {text: expected[text] for text in ("0", "1", "2")}
    assert "t.csv, line 22" in caplog.text and "single training row" in caplog.text


def test_a_byte_that_is_not_utf8_is_refused_with_its_line_and_the_fix(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes(b"sentence,label\na good film,1\n" + b"caf\xe9 au lait,0\n")
    with pytest.raises(DataError, match=r"latin\.csv, line 3, column 4: byte 0xe9 is not UTF-8.*iconv"):
        check_data(config(path))
    (tmp_path / "latin.jsonl").write_bytes(b'{"sentence": "ok", "label": 1}\n{"sentence": "\xff", "label": 0}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl, line 2, column 15: byte 0xff"):
        check_data(config(tmp_path / "latin.jsonl"))


@pytest.mark.parametrize("changes, says", [
    ({"text_column": "text"}, r"t\.csv, line 2: the training data has no column 'text' \(--text-column\)"),
    ({"label_column": "y"}, r"no column 'y' \(--label-column\).*'sentence', 'label'"),
])
def test_a_missing_column_is_refused_naming_the_flag(tmp_path, changes, says):
    with pytest.raises(DataError, match=says):
        check_data(config(table(tmp_path / "t.csv", ["0", "1"]), **changes))


def test_empty_rows_and_texts_are_refused(tmp_path):
    with pytest.raises(DataError, match=r"t\.csv, line 3 is an empty row"):
        check_data(config(table(tmp_path / "t.csv", ["0", "", "1"], texts=["a", "", "b"])))
    with pytest.raises(DataError, match=r"u\.csv, line 3: column 'sentence' \(--text-column\) is empty"):
        check_data(config(table(tmp_path / "u.csv", ["0", "1", "1"], texts=["a", " ", "b"])))


def test_eval_labels_must_be_training_labels_and_are_matched_by_text(tmp_path):
    train = table(tmp_path / "train.csv", ["0", "1", "0"])
    evaluation = table(tmp_path / "eval.csv", ["1", "0", "3"])
    with pytest.raises(DataError, match=r"eval\.csv, line 4: label 3 is not among the training labels \['0', '1'\]"):
        check_data(config(train, eval_data=str(evaluation)))
    (tmp_path / "eval.jsonl").write_text('{"sentence": "a", "label": "1"}\n{"sentence": "b", "label": "0"}\n')
    checked = check_data(config(train, eval_data=str(tmp_path / "eval.jsonl")))
    assert [row["label"] for row in checked.eval.rows] == [1, 0]  # the training file's values


def test_labels_option_needs_classification_and_two_distinct_labels():
    with pytest.raises(Exception, match="--task classification only"):
        TrainConfig(labels="0,1")
    with pytest.raises(Exception, match="two distinct"):
        TrainConfig(task="classification", data="x.csv", labels="0,0")


@pytest.mark.parametrize("write, says", [
    (lambda p: table(p, ["0", "1", "nan"]), "line 4: the label 'nan'"),
    (lambda p: p.write_bytes(b"sentence,label\n\xe9,1\n"), "line 2, column 1: byte 0xe9"),
    (lambda p: table(p, ["0", "1"], header=("text", "label")), "no column 'sentence' (--text-column)"),
])
def test_the_command_refuses_bad_data_before_loading_the_model_or_writing(tmp_path, capsys, write, says):
    data = tmp_path / "t.csv"
    write(data)
    started = time.perf_counter()
    assert cli(["train", "--task", "classification", "--model", str(tmp_path / "no-such-model"), "--data", str(data),
                "--output-dir", str(tmp_path / "out")]) == 2  # the missing model would fail later, another way
    assert time.perf_counter() - started < 10
    assert says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_label_set_is_printed_and_recorded(tmp_path, capsys):
    data = table(tmp_path / "t.csv", ["neg", "pos"] * 16)
    key = tmp_path / "k.key"
    NoiseKey.write_new(key)
    (tmp_path / "job.yaml").write_text("labels: [pos, neg]\n")
    assert cli(["train", "--config", str(tmp_path / "job.yaml"), "--task", "classification",
                "--model", str(save_tiny_classifier(tmp_path / "bert")), "--data", str(data), "--eval-data", str(data),
                "--trainable", "bias", "--batch-size", "8", "--micro-batch", "8", "--max-steps", "1",
                "--max-eval-examples", "4", "--noise-key", str(key), "--output-dir", str(tmp_path / "out")]) == 0
    assert "2 classes, in id order: 'pos' (16 rows), 'neg' (16 rows)" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["labels"] == ["pos", "neg"] and metrics["label_counts"] == {"pos": 16, "neg": 16}
    saved = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    assert saved["id2label"] == {"0": "pos", "1": "neg"}
