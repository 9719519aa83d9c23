"""The noise key never leaves its key file: not through repr, str, pickling, copies or the errors
raised on a bad key file, and not into anything a whole `dpscale train` run writes (model folder,
checkpoints, report, metrics, plots, TensorBoard and wandb runs) or logs (every logger at DEBUG,
the process's stdout and stderr). The search looks for the key as raw bytes, hex (lower and upper
case) and base64 (standard and urlsafe, at each of the three byte alignments), and for the
sampling seed derived from it; positive controls show that it finds each form."""

from __future__ import annotations

import base64
import copy
import logging
import os
import pickle
import stat
from pathlib import Path

import pytest
import torch

from dpscale import ConfigError
from dpscale.cli import main as cli
from dpscale.noise import NoiseKey
from tests.tiny_models import save_tiny_causal_lm, write_e2e_csv

torch.set_num_threads(1)


def forms(secret: bytes) -> dict[str, bytes]:
    """Every encoding of ``secret`` the search looks for. Base64 of the secret inside a longer blob
    depends on where it starts modulo 3: for each offset, the characters that encode key bytes only."""
    found = {"raw": secret, "hex": secret.hex().encode(), "HEX": secret.hex().upper().encode()}
    for name, encode in (("base64", base64.b64encode), ("base64url", base64.urlsafe_b64encode)):
        for shift in range(3):
            start = 4 if shift else 0
            found[f"{name}+{shift}"] = encode(bytes(shift) + secret)[start : start + 40]
    return found


def search(blobs: dict[str, bytes], secrets: dict[str, bytes]) -> list[tuple[str, str]]:
    """(where, which form) for every secret form found in the blobs."""
    return [(where, f"{label}:{form}") for where, blob in blobs.items() for label, secret in secrets.items()
            for form, needle in forms(secret).items() if needle in blob]


def every_file(*roots: Path) -> dict[str, bytes]:
    return {str(path): path.read_bytes() for root in roots for path in sorted(root.rglob("*")) if path.is_file()}


# the key object ---------------------------------------------------------------------------------


def test_repr_str_format_pickle_and_copies_hold_no_secret():
    secret = os.urandom(32)
    key = NoiseKey(secret)
    texts = (repr(key), str(key), f"{key}", f"{key!r}", repr([key]), repr({"k": key}))
    assert not search({text: text.encode() for text in texts}, {"key": secret})
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(ConfigError, match="cannot be pickled") as refused:
            pickle.dumps({"nested": [key]}, protocol=protocol)
        assert not search({"error": str(refused.value).encode()}, {"key": secret})
    with pytest.raises(ConfigError, match="cannot be pickled"):
        key.__getstate__()
    assert copy.copy(key) is key and copy.deepcopy({"k": key})["k"] is key  # shared, never serialized


@pytest.mark.parametrize("content", [
    lambda s: s.hex().encode() + b"00",  # one byte too many
    lambda s: s.hex().encode() + b" trailing words",
    lambda s: s + b"\n",  # 33 raw bytes
    lambda s: s[:31],
    lambda s: b"key = " + s.hex().encode(),
    lambda s: base64.b64encode(s),
])
def test_errors_on_a_malformed_key_file_do_not_echo_it(tmp_path, content):
    secret = os.urandom(32)
    path = tmp_path / "bad.key"
    path.write_bytes(content(secret))
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="write_new") as refused:
        NoiseKey.from_file(path)
    error = refused.value
    told = "".join((str(error), repr(error), repr(error.args), str(error.__cause__), str(error.__context__)))
    assert error.__cause__ is None
    assert not search({"error": told.encode()}, {"key": secret, "half": secret[:16], "tail": secret[16:]})


def test_key_files_are_written_private_and_loose_ones_are_refused(tmp_path, caplog):
    key = NoiseKey.write_new(tmp_path / "run.key")
    assert stat.S_IMODE(os.stat(tmp_path / "run.key").st_mode) == 0o600
    for mode in (0o640, 0o604):
        (tmp_path / "run.key").chmod(mode)
        with caplog.at_level(logging.DEBUG), pytest.raises(ConfigError, match="chmod 600") as refused:
            NoiseKey.from_file(tmp_path / "run.key")
        assert not search({"log": caplog.text.encode(), "error": str(refused.value).encode()}, {"key": key._secret})
    (tmp_path / "run.key").chmod(0o600)
    assert NoiseKey.from_file(tmp_path / "run.key") == key


# a whole run ------------------------------------------------------------------------------------


def test_a_whole_train_run_writes_and_logs_no_trace_of_the_key(tmp_path, monkeypatch, caplog, capfd):
    trackers = ["tensorboard"] + (["wandb"] if _importable("wandb") else [])
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "false")
    (tmp_path / "wandb").mkdir()
    keys = tmp_path / "keys"
    keys.mkdir()
    key = NoiseKey.write_new(keys / "noise.key")
    secret = key._secret
    secrets = {"key": secret, "sampling seed": key.derive_seed("sampling")}
    gpt2, e2e = save_tiny_causal_lm(tmp_path / "gpt2"), write_e2e_csv(tmp_path / "e2e.csv")
    out = tmp_path / "out"
    with caplog.at_level(logging.DEBUG):
        assert cli(["train", "--model", str(gpt2), "--data", str(e2e), "--eval-data", str(e2e), "--noise-key",
                    str(keys / "noise.key"), "--output-dir", str(out), "--trainable", "all", "--batch-size", "16",
                    "--micro-batch", "8", "--max-steps", "3", "--checkpoint-every", "1", "--max-eval-examples", "8",
                    "--generations", "1", "--max-new-tokens", "2", "--report-to", ",".join(trackers)]) == 0
    captured = capfd.readouterr()
    written = every_file(out, tmp_path / "wandb")
    names = "\n".join(written)
    assert "checkpoint/state.pt" in names and "checkpoint/privacy.pt" in names and "model/config.json" in names
    assert "events.out.tfevents" in names
    if "wandb" in trackers:
        assert ".wandb" in names, names
    assert len(caplog.records) > 0 and captured.out
    blobs = {**written, "caplog": caplog.text.encode(), "stdout": captured.out.encode(),
             "stderr": captured.err.encode(),
             "log record args": repr([(r.msg, r.args) for r in caplog.records]).encode()}
    assert search(blobs, secrets) == []
    # positive controls: the search finds the key in its own file, and each form of it anywhere in a blob
    assert ("key file", "key:hex") in search({"key file": (keys / "noise.key").read_bytes()}, secrets)
    for form, needle in forms(secret).items():
        planted = {"planted": os.urandom(7) + needle + os.urandom(5)}
        assert (("planted", f"key:{form}") in search(planted, secrets)), form
    for shift in range(3):  # base64 of a larger blob holding the key at any offset
        blob = base64.b64encode(os.urandom(10 + shift) + secret + os.urandom(9))
        assert search({"blob": blob}, secrets), shift


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True
