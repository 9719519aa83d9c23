"""The `dpscale` command line prints what the library computes, and turns our errors into one
line on stderr with exit status 2."""

import json
import math
import re
import subprocess
import sys

import pytest

from dpscale.accounting import calibrate_noise_multiplier, compute_epsilon, default_delta
from dpscale.cli import COMMANDS, main

EPSILON_ARGS = ["epsilon", "--sigma", "1.347", "--sample-rate", "0.04", "--steps", "2250"]


def _number(pattern, text):
    match = re.search(pattern + r" = ([0-9.eE+-]+)", text)
    assert match, text
    return float(match.group(1))


def test_epsilon_prints_the_library_value(capsys):
    assert main(EPSILON_ARGS + ["--delta", "1e-5"]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1
    expected = compute_epsilon(1.347, 0.04, 2250, 1e-5)
    assert _number("epsilon", out) == pytest.approx(expected, abs=5e-5)


def test_epsilon_json_matches_exactly(capsys):
    assert main(EPSILON_ARGS + ["--delta", "1e-5", "--accountant", "rdp", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["epsilon"] == compute_epsilon(1.347, 0.04, 2250, 1e-5, accountant="rdp")
    assert (data["noise_multiplier"], data["sample_rate"], data["steps"]) == (1.347, 0.04, 2250)
    assert data["accountant"] == "rdp" and data["sampling"] == "poisson"


def test_calibrate_prints_the_library_sigma(capsys):
    args = ["calibrate", "--epsilon", "8", "--delta", "1e-5", "--sample-rate", "0.04"]
    assert main(args + ["--steps", "2250", "--accountant", "rdp"]) == 0
    out = capsys.readouterr().out
    sigma = calibrate_noise_multiplier(8.0, 1e-5, 0.04, 2250, accountant="rdp")
    assert _number("sigma", out) == sigma
    assert _number("epsilon", out) <= 8.0


def test_calibrate_from_epochs_batch_and_dataset_size(capsys):
    # 3 epochs at B / N = 0.04 are 75 steps (3 / 0.04 is 75.00000000000001 in floats).
    args = ["calibrate", "--epsilon", "4", "--epochs", "3", "--batch-size", "2400"]
    assert main(args + ["--dataset-size", "60000", "--accountant", "rdp", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["steps"] == 75 and data["sample_rate"] == 0.04
    assert data["delta"] == default_delta(60000)
    epsilon = compute_epsilon(
        data["noise_multiplier"], 0.04, 75, data["delta"], accountant="rdp", dataset_size=60000
    )
    assert data["epsilon"] == epsilon
    assert 4.0 * (1 - 2e-3) <= epsilon <= data["target_epsilon"] == 4.0


def test_epochs_round_up_to_whole_steps(capsys):
    args = ["epsilon", "--sigma", "1", "--sample-rate", "0.3", "--epochs", "1", "--delta", "1e-5"]
    assert main(args + ["--accountant", "rdp", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == math.ceil(1 / 0.3) == 4


@pytest.mark.parametrize(
    "args,message",
    [
        (EPSILON_ARGS + ["--delta", "1e-3", "--dataset-size", "1000"], "1/dataset_size"),
        (EPSILON_ARGS + ["--delta", "1e-5", "--sampling", "shuffle", "-N", "100000"], "rdp"),
        (EPSILON_ARGS, "--delta"),
        (["calibrate", "--epsilon", "-1", "--delta", "1e-5", "-q", "0.01", "-T", "10"], "epsilon"),
        (["calibrate", "--epsilon", "1", "--delta", "1e-5", "--batch-size", "8", "-T", "10"], "N"),
    ],
)
def test_our_errors_are_one_line_and_exit_2(capsys, args, message):
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("dpscale ") and "error:" in captured.err
    assert message in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err


def test_argument_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["epsilon", "--sigma", "1", "--steps", "10", "--delta", "1e-5"])  # no sample rate
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2


def test_subcommands_come_from_the_table():
    assert [command.name for command in COMMANDS] == ["epsilon", "calibrate", "train", "audit"]


def test_module_entry_point_runs_in_a_fresh_process():
    args = EPSILON_ARGS + ["--delta", "1e-5", "--accountant", "rdp", "--json"]
    result = subprocess.run(
        [sys.executable, "-m", "dpscale.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["epsilon"] == compute_epsilon(1.347, 0.04, 2250, 1e-5, accountant="rdp")
