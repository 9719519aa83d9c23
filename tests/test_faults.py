"""Faults: training runs killed with SIGKILL at random points, several times, resume from their last
checkpoint to the parameters (bit for bit) and epsilon of an uninterrupted run with the same key
file; in a 2-process run, a rank killed mid-step ends the job with an error within a bounded time
and leaves no checkpoint that the sealed loader refuses. Each test prints its random seed."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dpscale.checkpoint import load_state
from dpscale.noise import NoiseKey
from tests.launcher import ROOT, free_port

KILLABLE = Path(__file__).resolve().parent / "killable_run.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{err[-3000:]}"
    return out


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended by itself (exit {proc.returncode}) before the kill"


@pytest.mark.slow
def test_a_step_driver_run_killed_again_and_again_resumes_bit_identical(tmp_path):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    steps = 30
    key = tmp_path / "noise.key"
    NoiseKey.write_new(key)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    whole.mkdir(), parts.mkdir()
    reference = _start([str(KILLABLE), str(whole), str(key), str(steps)])
    kills, resumed_from = [], []
    done = 0  # the last step the killed run reported checkpointed
    for round_ in range(5):
        proc = _start([str(KILLABLE), str(parts), str(key), str(steps)])
        if round_ % 2:  # at a random time soon after the start: in start-up, or loading the checkpoint
            time.sleep(rng.uniform(0.0, 0.8))
            line = ""
        else:  # past a random step, a random fraction of a step later: within a step or its write
            target = rng.randint(done + 1, min(done + 8, steps - 2))
            line = proc.stdout.readline()
            while line and not (line.startswith("step ") and int(line.split()[1]) >= target):
                if line.startswith("resumed "):
                    resumed_from.append(int(line.split()[1]))
                line = proc.stdout.readline()
            assert line, f"seed {seed}: the run ended before step {target}: {proc.stderr.read()[-2000:]}"
            time.sleep(rng.uniform(0.0, 0.03))
        if proc.poll() is not None:
            pytest.fail(f"seed {seed}: the run ended before kill {round_}: {proc.communicate()[1][-2000:]}")
        _kill(proc)
        if (parts / "checkpoint.pt").exists():
            done = load_state(parts / "checkpoint.pt", kind="train-state")["privacy"]["steps_taken"]
        kills.append(done)
    out = _finish(_start([str(KILLABLE), str(parts), str(key), str(steps)]))
    resumed_from += [int(line.split()[1]) for line in out.splitlines() if line.startswith("resumed ")]
    _finish(reference)
    a = torch.load(whole / "final.pt", weights_only=True)
    b = torch.load(parts / "final.pt", weights_only=True)
    assert any(k > 0 for k in resumed_from), f"seed {seed}: no resume from a checkpoint ({kills})"
    assert a["steps"] == b["steps"] == steps
    assert a["epsilon"] == b["epsilon"], f"seed {seed}"
    for name, value in a["params"].items():
        assert torch.equal(b["params"][name], value), f"seed {seed}, kills after steps {kills}: {name} differs"


def _train_args(folder: Path, out: Path, key: Path, steps: int) -> list[str]:
    return ["-m", "dpscale.cli", "train", "--model", str(folder / "gpt2"), "--data", str(folder / "e2e.csv"),
            "--noise-key", str(key), "--output-dir", str(out), "--trainable", "all", "--batch-size", "16",
            "--micro-batch", "8", "--max-steps", str(steps), "--checkpoint-every", "1", "--generations", "0",
            "--max-eval-examples", "4"]


def _checkpointed_step(out: Path) -> int:
    try:
        return load_state(out / "checkpoint" / "state.pt", kind="train-state")["step"]
    except Exception:  # absent (not written yet)
        return 0


@pytest.mark.slow
def test_dpscale_train_killed_twice_resumes_bit_identical(tmp_path):
    import transformers

    from tests.tiny_models import save_tiny_causal_lm, write_e2e_csv

    seed = random.randrange(2**32)
    rng = random.Random(seed)
    steps = 10
    save_tiny_causal_lm(tmp_path / "gpt2")
    write_e2e_csv(tmp_path / "e2e.csv")
    key = tmp_path / "noise.key"
    NoiseKey.write_new(key)
    reference = _start(_train_args(tmp_path, tmp_path / "whole", key, steps))
    target, kills = 0, []
    for _ in range(2):
        target = rng.randint(target + 1, target + 3)
        proc = _start(_train_args(tmp_path, tmp_path / "parts", key, steps))
        deadline = time.monotonic() + 300
        while _checkpointed_step(tmp_path / "parts") < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is not None:
            pytest.fail(f"seed {seed}: the run ended before the kill: {proc.communicate()[1][-3000:]}")
        _kill(proc)
        kills.append(_checkpointed_step(tmp_path / "parts"))
    _finish(_start(_train_args(tmp_path, tmp_path / "parts", key, steps)))
    _finish(reference)
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    parts = json.loads((tmp_path / "parts" / "metrics.json").read_text())
    assert parts["steps"] == whole["steps"] == steps
    assert parts["privacy"]["epsilon"] == whole["privacy"]["epsilon"], f"seed {seed}"
    a = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "model").state_dict()
    b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "parts" / "model").state_dict()
    for name, value in a.items():
        assert torch.equal(b[name], value), f"seed {seed}, killed after steps {kills}: {name} differs"
    assert load_state(tmp_path / "parts" / "checkpoint" / "privacy.pt")["steps_taken"] == steps


def _start_ranks(out: Path, key: Path, steps: int, timeout_s: float) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(KILLABLE), str(out), str(key), str(steps), str(timeout_s)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


@pytest.mark.slow
@pytest.mark.parametrize("signal_", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_a_rank_killed_or_hung_mid_run_ends_the_job_in_bounded_time(tmp_path, signal_):
    """Rank 1 is killed (SIGKILL: its sockets close) or hung (SIGSTOP: they stay open, so only the
    collective timeout can end the wait) at a random point after a random step. Rank 0 must exit
    with an error within the timeout plus slack, and leave a checkpoint the sealed loader accepts,
    whose parameters are finite and whose privacy state is of the same step."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    timeout_s = 8.0
    key = tmp_path / "noise.key"
    NoiseKey.write_new(key)
    ranks = _start_ranks(tmp_path, key, 2000, timeout_s)
    try:
        target = rng.randint(2, 6)
        line = ranks[0].stdout.readline()
        while line and not (line.startswith("step ") and int(line.split()[1]) >= target):
            line = ranks[0].stdout.readline()
        assert line, f"seed {seed}: rank 0 ended early: {ranks[0].communicate()[1][-3000:]}"
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(ranks[1].pid, signal_)
        start = time.monotonic()
        try:
            _, err = ranks[0].communicate(timeout=timeout_s + 60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"seed {seed}: rank 0 still waiting {timeout_s + 60:.0f} s after rank 1 was stopped")
        elapsed = time.monotonic() - start
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    assert ranks[0].returncode not in (0, None), f"seed {seed}: rank 0 finished as if nothing happened"
    assert elapsed < timeout_s + 60
    if signal_ == signal.SIGSTOP:
        assert "timeout" in err.lower() or "timed out" in err.lower(), err[-3000:]
    state = load_state(tmp_path / "checkpoint.pt", kind="train-state")  # sealed, whole
    assert state["privacy"]["steps_taken"] >= target
    assert all(torch.isfinite(value).all() for value in state["model"].values())
    last = [line for line in err.splitlines() if "Error" in line][-1:]
    print(f"seed {seed}: {signal_.name} after step {target}; rank 0 exited {ranks[0].returncode} after {elapsed:.2f} s "
          f"with {last}; checkpoint of step {state['privacy']['steps_taken']}")


def test_dpscale_train_passes_its_collective_timeout_to_the_process_group():
    from dpscale.cli import build_parser
    from dpscale.train.config import load_config
    from dpscale.train.job import _placement_kwargs

    args = build_parser().parse_args(["train", "--collective-timeout", "7.5", "--max-steps", "2"])
    config = load_config(None, {k: v for k, v in vars(args).items() if k in ("collective_timeout", "max_steps")})
    (handler,) = _placement_kwargs(config)["kwargs_handlers"]
    assert handler.to_kwargs() == {"timeout": __import__("datetime").timedelta(seconds=7.5)}
    with pytest.raises(Exception, match="collective_timeout"):
        load_config(None, {"collective_timeout": 0})


@pytest.mark.slow
@pytest.mark.parametrize("signal_", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_dpscale_train_on_two_processes_ends_when_a_rank_dies_or_hangs(tmp_path, signal_):
    """`accelerate launch` of the `dpscale train` job on 2 gloo processes with --collective-timeout
    15: rank 1 is killed or stopped after a checkpoint; the job must fail within the timeout plus
    the launcher's slack, leaving a checkpoint whose two sealed files load and agree."""
    import psutil

    from tests.tiny_models import save_tiny_causal_lm, write_e2e_csv

    timeout_s = 15
    model, data = save_tiny_causal_lm(tmp_path / "model"), write_e2e_csv(tmp_path / "e2e.csv")
    out = tmp_path / "out"
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
               str(ROOT / "launch" / "accelerate_cpu_2proc.yaml"), str(ROOT / "launch" / "train.py"), "--cpu",
               "--model", str(model), "--data", str(data), "--trainable", "all", "--batch-size", "8",
               "--max-steps", "400", "--checkpoint-every", "1", "--generations", "0", "--max-eval-examples", "4",
               "--collective-timeout", str(timeout_s), "--output-dir", str(out)]
    job = subprocess.Popen(command, cwd=ROOT, env={**ENV, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    victims = []
    try:
        deadline = time.monotonic() + 400
        while _checkpointed_step(out) < 2 and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert job.poll() is None, job.communicate()[1][-3000:]
        victims = [p for p in psutil.Process(job.pid).children(recursive=True)
                   if "train.py" in " ".join(p.cmdline()) and p.environ().get("RANK") == "1"]
        assert len(victims) == 1, [p.cmdline() for p in victims]
        victims[0].send_signal(signal_)
        start = time.monotonic()
        try:
            _, err = job.communicate(timeout=timeout_s + 120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job still ran {timeout_s + 120} s after rank 1 was stopped")
        elapsed = time.monotonic() - start
    finally:
        for victim in victims:
            with __import__("contextlib").suppress(psutil.NoSuchProcess):
                victim.kill()
        if job.poll() is None:
            job.kill()
            job.communicate()
    assert job.returncode != 0, "the job finished as if nothing happened"
    if signal_ == signal.SIGSTOP:  # nothing but the collective timeout can end rank 0's wait
        assert "timeout" in err.lower() or "timed out" in err.lower(), err[-3000:]
    last = [line.strip() for line in err.splitlines() if "Error" in line][-1:]
    state = load_state(out / "checkpoint" / "state.pt", kind="train-state")
    privacy = load_state(out / "checkpoint" / "privacy.pt", kind="privacy")
    assert state["privacy"]["steps_taken"] == state["step"] >= 2
    assert privacy["steps_taken"] in (state["step"], state["step"] - 1)  # privacy.pt may lag one write
    assert all(torch.isfinite(value).all() for value in state["params"].values())
    print(f"{signal_.name}: the job exited {job.returncode} after {elapsed:.1f} s with {last}; checkpoint of step "
          f"{state['step']}")
