"""Prompt-based classification with a causal LM (label words through the LM head): on a tiny Llama
built from config with a tiny vocabulary, in float64, the batched per-example losses, the engine's
per-example norms and clipped sums, and the evaluation all equal a loop over single examples run
unpadded; and what would break the per-example contract (left padding) or the verbalizer
(a label word of several tokens, a template without its slot) is refused."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

import dpscale
from dpscale.errors import ConfigError, LossShapeError
from dpscale.train.prompting import PromptClassificationData, evaluate_prompt_classification
from tests.oracle import assert_close
from tests.tiny_models import bpe_tokenizer

torch.set_num_threads(1)

ROWS = [{"sentence": text, "label": label} for text, label in [
    ("a good film", 1), ("a dull , bad movie ", 0), ("the film is good", 1), ("bad", 0),
    ("good , good , good", 1), ("a bad plot , a dull film", 0), ("the best film", 1), ("dull and slow", 0),
]]
WORDS = ["bad", "good"]  # labels 0, 1; each one token after a space for this tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer(bos=True)  # Llama-like: <s> before every text


def tiny_llama(tokenizer):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=True, initializer_range=0.5,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return transformers.LlamaForCausalLM(config).double()


def single_losses(model, data):
    """The reference: each example alone, unpadded, the full-vocabulary logits at its last token,
    log-softmax over the label words only."""
    losses, predictions = [], []
    for i in range(len(data.dataset)):
        item = data.dataset[i]
        logits = model(input_ids=item["input_ids"][None]).logits[0, -1]
        scores = logits[data.label_word_ids]
        losses.append(-torch.log_softmax(scores, 0)[item["labels"]])
        predictions.append(int(scores.argmax()))
    return torch.stack(losses), predictions


def test_the_rendered_prompt_ends_where_the_label_word_follows(tokenizer):
    data = PromptClassificationData(ROWS, tokenizer, label_words=WORDS, template="Review: {text} It was")
    assert data.label_word_ids == [tokenizer(" bad", add_special_tokens=False)["input_ids"][0],
                                   tokenizer(" good", add_special_tokens=False)["input_ids"][0]]
    first = data.dataset[1]["input_ids"].tolist()
    assert first[0] == tokenizer.bos_token_id
    assert tokenizer.decode(first[1:]) == "Review: a dull , bad movie It was"  # the text stripped
    assert [int(data.dataset[i]["labels"]) for i in range(len(ROWS))] == [row["label"] for row in ROWS]
    tail = tokenizer(" It was", add_special_tokens=False)["input_ids"]
    short = PromptClassificationData(ROWS, tokenizer, label_words=WORDS, max_length=len(tail) + 3)
    for i in range(len(ROWS)):  # long texts are cut, the template's end is kept
        ids = short.dataset[i]["input_ids"].tolist()
        assert len(ids) <= len(tail) + 3 and ids[-len(tail):] == tail


def test_batched_losses_equal_the_single_example_loop(tokenizer):
    model = tiny_llama(tokenizer)
    data = PromptClassificationData(ROWS, tokenizer, label_words=WORDS)
    batch = data.collate([data.dataset[i] for i in range(len(ROWS))])
    assert (batch["attention_mask"] == 0).any()  # some padding, on the right
    with torch.no_grad():
        batched = data.losses(model, batch)
        expected, predictions = single_losses(model, data)
    assert_close(batched, expected, 1e-12, "per-example losses")
    result = evaluate_prompt_classification(model, data, batch_size=3)
    assert math.isclose(result["loss"], float(expected.mean()), rel_tol=1e-9)
    labels = [row["label"] for row in ROWS]
    assert result["accuracy"] == sum(p == y for p, y in zip(predictions, labels)) / len(ROWS)


@pytest.mark.parametrize("clip_fn", ["abadi", "automatic"])
def test_engine_clips_each_examples_gradient_as_the_single_example_loop(tokenizer, clip_fn):
    """Full fine-tuning (the tied embedding and LM head included): the engine's per-example norms
    and clipped sums against autograd on each example alone, unpadded."""
    model = tiny_llama(tokenizer)
    data = PromptClassificationData(ROWS, tokenizer, label_words=WORDS)
    batch = data.collate([data.dataset[i] for i in range(len(ROWS))])
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    rows = []
    for i in range(len(ROWS)):
        item = data.dataset[i]
        logits = model(input_ids=item["input_ids"][None]).logits[0, -1, data.label_word_ids]
        loss = -torch.log_softmax(logits, 0)[item["labels"]]
        rows.append(torch.autograd.grad(loss, list(params.values())))
    norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in grads)) for grads in rows])
    R, B = 0.5 * float(norms.median()), 8.0
    factors = (R / norms).clamp(max=1.0) if clip_fn == "abadi" else R / (norms + 0.01)
    expected = {name: sum(factors[i] * rows[i][k] for i in range(len(ROWS))) / B for k, name in enumerate(params)}

    config = dpscale.DPConfig(max_grad_norm=R, expected_batch_size=B, noise_multiplier=0.0, clip_fn=clip_fn,
                              automatic_gamma=0.01)
    engine = dpscale.PrivacyEngine(model, config, optimizer=torch.optim.SGD(list(params.values()), lr=0.0))
    engine.backward(data.losses(engine.model, batch))
    assert_close(engine.last_norms, norms, 1e-9, "per-example norms")
    sums = engine.clipped_sums()
    for name in params:
        assert_close(sums[name], expected[name], 1e-9, f"clipped sum of {name}")
    engine.detach()


def test_what_breaks_the_contract_or_the_verbalizer_is_refused(tokenizer):
    model = tiny_llama(tokenizer)
    data = PromptClassificationData(ROWS, tokenizer, label_words=WORDS)
    batch = data.collate([data.dataset[i] for i in range(3)])
    left = {key: value.flip(1) for key, value in batch.items() if key != "labels"}  # padding on the left
    with torch.no_grad(), pytest.raises(LossShapeError, match="padded on the right"):
        dpscale.label_word_losses(model(**left).logits, batch["labels"], left["attention_mask"], data.label_word_ids)
    with pytest.raises(ConfigError, match="one token each"):
        PromptClassificationData(ROWS, tokenizer, label_words=["terrible", "good"])
    with pytest.raises(ConfigError, match="exactly once"):
        PromptClassificationData(ROWS, tokenizer, label_words=WORDS, template="It was")
    with pytest.raises(ConfigError, match="ends with whitespace"):
        PromptClassificationData(ROWS, tokenizer, label_words=WORDS, template="{text} It was ")
    with pytest.raises(ConfigError, match="one word per label"):
        PromptClassificationData(ROWS, tokenizer, label_words=["bad", "good", "film"])
    with pytest.raises(ConfigError, match="repeated tokens"):
        PromptClassificationData(ROWS, tokenizer, label_words=["good", "good"])
