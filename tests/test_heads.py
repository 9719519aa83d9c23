"""dpscale.zero_head zeroes the output layer of the classification head, found from the model itself
(BERT, Llama, RoBERTa, DistilBERT, under PEFT), and nothing else; with a zero head the first step's
per-example gradients are the head's alone, (p - y) h^T, checked against a float64 one-example loop
through the engine."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

import dpscale
from dpscale.errors import ConfigError
from tests.oracle import check_engine, per_example_grads

torch.set_num_threads(1)

SMALL = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
         "max_position_embeddings": 32, "vocab_size": 50}


def bert():
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        **SMALL, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SMALL, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    return transformers.LlamaForSequenceClassification(config)


def roberta():
    torch.manual_seed(0)
    return transformers.RobertaForSequenceClassification(transformers.RobertaConfig(
        **{**SMALL, "max_position_embeddings": 40}, num_labels=2, pad_token_id=1))


def distilbert():
    torch.manual_seed(0)
    return transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
        vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=32, num_labels=2))


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("build, zeroed", [
    (bert, {"classifier.weight", "classifier.bias"}),
    (llama, {"score.weight"}),  # no bias
    (roberta, {"classifier.out_proj.weight", "classifier.out_proj.bias"}),  # not classifier.dense
    (distilbert, {"classifier.weight", "classifier.bias"}),  # not pre_classifier
])
def test_zero_head_zeroes_the_output_layer_and_nothing_else(build, zeroed):
    model = build()
    with torch.no_grad():  # transformers initialises biases to zero: make every parameter nonzero first
        for p in model.parameters():
            p.add_(torch.rand_like(p) + 0.1)
    before = snapshot(model)
    dpscale.zero_head(model)
    after = snapshot(model)
    for name, value in after.items():
        if name in zeroed:
            assert torch.count_nonzero(value) == 0, name
        else:
            assert torch.equal(value, before[name]), name


def test_a_zero_head_predicts_uniformly_whatever_the_input():
    model = dpscale.zero_head(llama()).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.randint(1, 50, (4, 6))).logits
    assert torch.count_nonzero(logits) == 0
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0]))
    assert math.isclose(float(loss), math.log(3), rel_tol=1e-6)


def test_lora_trains_a_copy_of_the_zero_head():
    pytest.importorskip("peft")
    model = dpscale.lora(dpscale.zero_head(bert()), r=2, task="classification")
    names = dpscale.head_parameter_names(model)
    assert names and all("modules_to_save" in name and name.split(".")[-1] in ("weight", "bias") for name in names)
    for name, p in model.named_parameters():
        if "classifier" in name:
            assert torch.count_nonzero(p) == 0, name
    # zeroing a wrapped model reaches the trainable copy too
    wrapped = dpscale.lora(bert(), r=2, task="classification")
    dpscale.zero_head(wrapped)
    assert all(torch.count_nonzero(p) == 0 for n, p in wrapped.named_parameters() if "classifier" in n)


def test_head_parameter_names_are_the_trainable_head():
    model = dpscale.bitfit(bert())
    assert dpscale.head_parameter_names(model) == ["classifier.weight", "classifier.bias"]
    assert set(dpscale.head_parameter_names(distilbert())) == {
        "pre_classifier.weight", "pre_classifier.bias", "classifier.weight", "classifier.bias"}
    frozen = bert()
    for p in frozen.classifier.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        dpscale.head_parameter_names(frozen)


def test_models_without_a_separate_head_are_refused():
    with pytest.raises(ConfigError, match="not a transformers classifier"):
        dpscale.zero_head(torch.nn.Sequential(torch.nn.Linear(3, 2)))
    model = bert()
    model.config.num_labels = 5  # no Linear with 5 outputs in the head
    with pytest.raises(ConfigError, match="No nn.Linear with 5 outputs"):
        dpscale.zero_head(model)


def losses_of(model, inputs):
    logits = model(input_ids=inputs["input_ids"]).logits
    return torch.nn.functional.cross_entropy(logits, inputs["labels"], reduction="none")


def test_with_a_zero_head_the_first_gradients_are_the_heads_alone():
    """The one-example float64 loop: every backbone gradient is exactly zero, the head's is
    (p - y) h^T with p uniform and h the pooled features; the engine's clipped sums and norms
    agree with the loop."""
    model = dpscale.zero_head(bert().double())
    torch.manual_seed(1)
    inputs = {"input_ids": torch.randint(1, 50, (6, 7)), "labels": torch.tensor([0, 1, 1, 0, 1, 0])}
    grads = per_example_grads(model, inputs, losses_of, 6)
    for name, g in grads.items():
        if not name.startswith("classifier."):
            assert torch.count_nonzero(g) == 0, name
    with torch.no_grad():
        pooled = model.bert(input_ids=inputs["input_ids"]).pooler_output  # [6, 16]
    residual = torch.full((6, 2), 0.5, dtype=torch.float64) - torch.nn.functional.one_hot(inputs["labels"], 2)
    assert torch.allclose(grads["classifier.weight"], residual[:, :, None] * pooled[:, None, :], atol=1e-12)
    assert torch.allclose(grads["classifier.bias"], residual, atol=1e-12)
    config = dpscale.DPConfig(max_grad_norm=0.3, expected_batch_size=6, noise_multiplier=0.0, clip_fn="abadi")
    engine = check_engine(model, [inputs], losses_of, config)
    norms = engine.last_norms
    expected = math.sqrt(0.5) * (pooled.pow(2).sum(1) + 1).sqrt()  # ||p - y|| * ||(h, 1)||
    assert torch.allclose(norms.double(), expected, rtol=1e-9)
