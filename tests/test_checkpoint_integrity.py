"""Checkpoints are sealed with a SHA-256 and refused whole when anything is wrong with them: torn,
flipped bytes, a foreign file, another kind, another model or another mechanism. A refused load
leaves the engine (and its loader) exactly as it was; the job refuses a state.pt of another model
before copying any parameter, and a state.pt and privacy.pt of different steps."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from dpscale import CheckpointError, ConfigError, PrivacyEngine
from dpscale.checkpoint import load_state, save_atomic
from dpscale.driver import run_steps
from tests.test_step_boundary import KEY, config, data, losses_of, model

torch.set_num_threads(1)


def trained(tmp_path, steps: int = 2, **changes):
    net = model()
    engine = PrivacyEngine(net, config(**changes), noise_key=KEY, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    loader = engine.make_data_loader(data(), max_physical_batch_size=4)
    run_steps(engine, loader, losses_of(net), max_steps=steps)
    path = tmp_path / "privacy.pt"
    engine.save_checkpoint(path)
    return engine, path


def fresh(net=None, **changes):
    """An engine that has taken one step of its own, so an accidental half-load would show."""
    net = net or model()
    engine = PrivacyEngine(net, config(**changes), noise_key=KEY, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    loader = engine.make_data_loader(data(), max_physical_batch_size=4)
    run_steps(engine, loader, losses_of(net), max_steps=1)
    return engine


def observed(engine):
    return (engine.steps_taken, engine.accountant.state_dict(), engine.data_loader.state_dict(), engine.epsilon())


def test_a_sealed_checkpoint_round_trips(tmp_path):
    engine, path = trained(tmp_path)
    assert path.read_bytes().startswith(b"DPSCALE-CHECKPOINT 1\nkind privacy\n")
    other = fresh()
    other.load_checkpoint(path)
    assert observed(other)[:2] == observed(engine)[:2] and other.epsilon() == engine.epsilon()


def _torn(raw: bytes) -> bytes:
    return raw[: len(raw) // 2]


def _flipped(raw: bytes) -> bytes:
    middle = len(raw) - 40  # inside the payload, past the header
    return raw[:middle] + bytes([raw[middle] ^ 0x01]) + raw[middle + 1 :]


def _one_more_byte(raw: bytes) -> bytes:
    return raw + b"\x00"


def _header_hash(raw: bytes) -> bytes:
    return raw.replace(b"sha256 ", b"sha256 0", 1)[:-1]


@pytest.mark.parametrize("damage, says", [
    (_torn, "torn"), (_flipped, "damaged"), (_one_more_byte, "torn"), (_header_hash, "damaged"),
    (lambda raw: b"", "not a dpscale checkpoint"), (lambda raw: b"hello, world\n" * 10, "not a dpscale checkpoint"),
    (lambda raw: raw[:30], "damaged dpscale checkpoint header"),
    (lambda raw: raw.replace(b"CHECKPOINT 1", b"CHECKPOINT 9", 1), "version 9"),
])
def test_damaged_files_are_refused_and_nothing_changes(tmp_path, damage, says):
    _, path = trained(tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    engine = fresh()
    before = observed(engine)
    with pytest.raises(CheckpointError, match=says):
        engine.load_checkpoint(path)
    assert observed(engine) == before


def test_foreign_and_mismatched_kinds_are_refused(tmp_path):
    engine = fresh()
    before = observed(engine)
    torch.save({"format": 1, "weights": torch.zeros(3)}, tmp_path / "foreign.pt")  # a bare torch file, not ours
    with pytest.raises(CheckpointError, match="format 2"):
        engine.load_checkpoint(tmp_path / "foreign.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="list"):
        engine.load_checkpoint(tmp_path / "list.pt")
    save_atomic({"params": {}}, tmp_path / "state.pt", kind="train-state")
    with pytest.raises(CheckpointError, match="'train-state' checkpoint where a 'privacy' one"):
        engine.load_checkpoint(tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match="No dpscale checkpoint"):
        engine.load_checkpoint(tmp_path / "absent.pt")
    assert observed(engine) == before
    assert issubclass(CheckpointError, ConfigError)  # callers that caught ConfigError still do


def test_a_checkpoint_written_before_the_seal_is_still_read(tmp_path, caplog):
    engine, _ = trained(tmp_path)
    torch.save(engine.state_dict(), tmp_path / "old.pt")  # what save_checkpoint wrote before
    other = fresh()
    with caplog.at_level(logging.WARNING, logger="dpscale.checkpoint"):
        other.load_checkpoint(tmp_path / "old.pt")
    assert "read unchecked" in caplog.text and other.steps_taken == engine.steps_taken


@pytest.mark.parametrize("changes, says", [
    ({"noise_multiplier": 2.0}, "noise_multiplier"),
    ({"max_grad_norm": 0.5}, "sensitivity"),
    ({"expected_batch_size": 4}, "expected_batch_size"),
    ({"accountant": "rdp"}, "accountant"),
    ({"clip_fn": "automatic"}, "clip_fn"),
    ({"clip_fn": "automatic", "automatic_gamma": 0.5}, "clip_fn"),
    ({"clipping": "per_layer"}, "sensitivity|clip_groups"),
])
def test_another_mechanism_is_refused_and_nothing_changes(tmp_path, changes, says):
    _, path = trained(tmp_path)
    engine = fresh(**changes)
    before = observed(engine)
    with pytest.raises(CheckpointError, match=says):
        engine.load_checkpoint(path)
    assert observed(engine) == before


def test_automatic_clipping_with_another_gamma_is_refused(tmp_path):
    _, path = trained(tmp_path, clip_fn="automatic", automatic_gamma=0.01)
    engine = fresh(clip_fn="automatic", automatic_gamma=0.1)
    with pytest.raises(CheckpointError, match="clip_gamma"):
        engine.load_checkpoint(path)


@pytest.mark.parametrize("other", [
    lambda: nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 3)),  # same names, other shapes
    lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 7), nn.Linear(7, 3)),  # other names
])
def test_another_model_is_refused_and_nothing_changes(tmp_path, other):
    _, path = trained(tmp_path)
    engine = fresh(other())
    before = observed(engine)
    with pytest.raises(CheckpointError, match="parameters"):
        engine.load_checkpoint(path)
    assert observed(engine) == before


def test_a_part_that_fails_to_load_rolls_the_others_back(tmp_path):
    engine, _ = trained(tmp_path, steps=3)
    state = engine.state_dict()
    state["data_loader"] = {**state["data_loader"], "version": -1}  # the loader refuses, after the accountant loaded
    other = fresh()
    before = observed(other)
    with pytest.raises(ConfigError):
        other.load_state_dict(state)
    assert observed(other) == before


def test_load_state_refuses_before_unpickling(tmp_path, monkeypatch):
    _, path = trained(tmp_path)
    path.write_bytes(_flipped(path.read_bytes()))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load ran on a damaged file"))
    with pytest.raises(CheckpointError):
        load_state(path)


def test_the_seal_covers_the_kind(tmp_path):
    save_atomic({"a": 1}, tmp_path / "x.pt", kind="train-state")
    raw = (tmp_path / "x.pt").read_bytes()
    (tmp_path / "x.pt").write_bytes(raw.replace(b"kind train-state", b"kind privacy", 1).replace(
        b"size ", b"size ", 1))
    with pytest.raises(CheckpointError, match="damaged"):
        load_state(tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="kind"):
        save_atomic({}, tmp_path / "y.pt", kind="model")


class _Accelerator:
    @staticmethod
    def unwrap_model(model):
        return model


@pytest.mark.parametrize("other", [
    lambda: nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 3)),
    lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 7), nn.Linear(7, 3)),
])
def test_the_job_refuses_a_train_state_of_another_model_before_copying(other):
    from dpscale.train.job import _restore

    net = model()
    optimizer = torch.optim.AdamW(net.parameters())
    state = {"params": {n: p.detach().clone() + 1 for n, p in net.named_parameters()},
             "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}
    target = other()
    before = [p.detach().clone() for p in target.parameters()]
    with pytest.raises(CheckpointError, match="--model"):
        _restore(target, torch.optim.AdamW(target.parameters()), state, _Accelerator())
    assert all(torch.equal(a, b) for a, b in zip(before, target.parameters()))
    _restore(net, optimizer, state, _Accelerator())  # the right model takes it
    assert all(torch.equal(p, state["params"][n]) for n, p in net.named_parameters())


def test_the_job_refuses_a_damaged_state_and_a_torn_pair(tmp_path, capsys):
    from dpscale.cli import main as cli
    from dpscale.noise import NoiseKey
    from tests.tiny_models import save_tiny_causal_lm, write_e2e_csv

    NoiseKey.write_new(tmp_path / "noise.key")
    flags = ["train", "--model", str(save_tiny_causal_lm(tmp_path / "gpt2")), "--data",
             str(write_e2e_csv(tmp_path / "e2e.csv")), "--noise-key", str(tmp_path / "noise.key"), "--output-dir",
             str(tmp_path / "out"), "--trainable", "all", "--batch-size", "16", "--micro-batch", "8", "--max-steps",
             "3", "--stop-after", "2", "--checkpoint-every", "1", "--generations", "0"]
    assert cli(flags) == 0
    folder = tmp_path / "out" / "checkpoint"
    good = (folder / "state.pt").read_bytes()
    (folder / "state.pt").write_bytes(_flipped(good))
    capsys.readouterr()
    assert cli(flags) == 2 and "damaged" in capsys.readouterr().err
    (folder / "state.pt").write_bytes(good)
    privacy = load_state(folder / "privacy.pt")
    save_atomic({**privacy, "steps_taken": privacy["steps_taken"] - 1}, folder / "privacy.pt")  # a torn pair
    legacy = load_state(folder / "state.pt", kind="train-state")
    del legacy["privacy"]  # a state.pt written before it held the privacy state: the pair is all there is
    save_atomic(legacy, folder / "state.pt", kind="train-state")
    assert cli(flags) == 2 and "died between the two writes" in capsys.readouterr().err
    # today's state.pt holds the privacy state of its own step: a run killed between the two writes resumes
    (folder / "state.pt").write_bytes(good)
    assert cli([*flags[:-6], "--checkpoint-every", "1", "--generations", "0"]) == 0  # no --stop-after: to step 3
    assert load_state(folder / "privacy.pt")["steps_taken"] == 3
