"""dpscale.bitfit / lora / train_only choose exactly the parameters they say, refuse choices that
would train nothing or not what was asked, and the engine then clips exactly that subset against
the one-example float64 loop."""

from __future__ import annotations

import pytest
import torch
import transformers

import dpscale
from dpscale.errors import ConfigError
from tests.oracle import check_engine


def tiny_bert_classifier():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, num_labels=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config)


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                      tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config)


def trained(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_bitfit_trains_biases_and_the_head_only():
    model = dpscale.bitfit(tiny_bert_classifier())
    names = trained(model)
    assert names and all(n.endswith(".bias") or n.startswith("classifier.") for n in names)
    assert "classifier.weight" in names and "bert.encoder.layer.0.attention.self.query.bias" in names
    assert "bert.embeddings.LayerNorm.bias" in names and "bert.embeddings.LayerNorm.weight" not in names
    with_norms = trained(dpscale.bitfit(tiny_bert_classifier(), include_norms=True))
    assert with_norms - names == {n for n in with_norms if n.endswith("LayerNorm.weight")} != set()
    without_head = trained(dpscale.bitfit(tiny_bert_classifier(), include_head=False))
    assert "classifier.weight" not in without_head and "classifier.bias" in without_head


def test_bitfit_refuses_a_model_without_biases():
    with pytest.raises(ConfigError, match="use LoRA"):
        dpscale.bitfit(tiny_llama(), include_head=False)


def test_train_only_matches_patterns_and_refuses_a_pattern_that_matches_nothing():
    model = dpscale.train_only(tiny_bert_classifier(), ["*.attention.self.*", "classifier.*"])
    names = trained(model)
    assert names and all(".attention.self." in n or n.startswith("classifier.") for n in names)
    with pytest.raises(ConfigError, match="no parameter name matches"):
        dpscale.train_only(tiny_bert_classifier(), ["*.attenton.*"])


def test_lora_trains_the_adapters_and_a_copy_of_the_head():
    pytest.importorskip("peft")
    model = dpscale.lora(tiny_bert_classifier(), r=2)
    names = trained(model)
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    assert all("lora_" in n or "modules_to_save" in n for n in names)
    with pytest.raises(ConfigError, match="already wrapped by PEFT"):
        dpscale.bitfit(model)


@pytest.mark.parametrize("choose", ["bitfit", "train_only"])
def test_engine_clips_exactly_the_chosen_subset(choose):
    model = tiny_bert_classifier().double()
    if choose == "bitfit":
        dpscale.bitfit(model)
    else:
        dpscale.train_only(model, ["*.attention.output.*", "classifier.*"])
    torch.manual_seed(1)
    batches = [{"input_ids": torch.randint(1, 50, (5, 7)), "labels": torch.randint(0, 2, (5,))} for _ in range(2)]

    def losses_of(m, inputs):
        logits = m(input_ids=inputs["input_ids"]).logits
        return torch.nn.functional.cross_entropy(logits, inputs["labels"], reduction="none")

    config = dpscale.DPConfig(max_grad_norm=0.05, expected_batch_size=5, noise_multiplier=0.0)
    engine = check_engine(model, batches, losses_of, config)
    assert set(engine.parameters) == {n for n, p in model.named_parameters() if p.requires_grad}
