"""dpscale.models_kind: one causal-LM test for every caller, right under the wrappers and class
swaps a training run puts around the model (PEFT, DDP-like wrappers, FSDP2's renamed subclass)."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from dpscale.losses import causal_lm_losses, per_example_losses, token_mean_losses
from dpscale.models_kind import is_causal_lm, task_of, unwrap_model


def _gpt2_config() -> transformers.GPT2Config:
    return transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16)


def _llama() -> nn.Module:
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    return transformers.LlamaForCausalLM(config)


def _bert_classifier() -> nn.Module:
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3)
    return transformers.BertForSequenceClassification(config)


def _swap_class_as_fsdp2_does(model: nn.Module) -> nn.Module:
    """What ``fully_shard`` does to the module's class (torch.distributed.fsdp, FSDP2): a subclass of
    FSDPModule and the original class, named after it with an FSDP prefix, set in place."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(model)
    model.__class__ = type(f"FSDP{cls.__name__}", (FSDPModule, cls), {})
    return model


@pytest.mark.parametrize("build, task", [
    (lambda: transformers.GPT2LMHeadModel(_gpt2_config()), "causal-lm"),
    (_llama, "causal-lm"),
    (_bert_classifier, "classification"),
    (lambda: transformers.GPT2Model(_gpt2_config()), None),  # the family's base model: no head, no task
    (lambda: nn.Linear(4, 2), None),
])
def test_the_task_is_read_from_transformers_mappings(build, task):
    model = build()
    assert task_of(model) == task
    assert is_causal_lm(model) == (task == "causal-lm")


@pytest.mark.parametrize("build, causal", [(_llama, True), (_bert_classifier, False)])
def test_fsdp2s_renamed_class_keeps_its_kind(build, causal):
    model = _swap_class_as_fsdp2_does(build())
    assert type(model).__name__.startswith("FSDP")  # the name no mapping lists
    assert is_causal_lm(model) is causal
    assert task_of(model) == ("causal-lm" if causal else "classification")


def test_a_peft_wrapped_model_is_judged_by_its_base_model():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(task_type=peft.TaskType.CAUSAL_LM, r=2, target_modules=["c_attn"])
    wrapped = peft.get_peft_model(transformers.GPT2LMHeadModel(_gpt2_config()), config)
    assert not isinstance(wrapped, transformers.GPT2LMHeadModel)
    assert isinstance(unwrap_model(wrapped), transformers.GPT2LMHeadModel)
    assert is_causal_lm(wrapped)
    classifier = peft.get_peft_model(_bert_classifier(), peft.LoraConfig(
        task_type=peft.TaskType.SEQ_CLS, r=2, target_modules=["query", "value"]))
    assert task_of(classifier) == "classification" and not is_causal_lm(classifier)


def test_a_peft_wrapped_model_after_fsdp2s_class_swap():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(task_type=peft.TaskType.CAUSAL_LM, r=2, target_modules=["q_proj", "v_proj"])
    wrapped = peft.get_peft_model(_llama(), config)
    _swap_class_as_fsdp2_does(wrapped.get_base_model())
    assert is_causal_lm(wrapped)


def test_a_data_parallel_wrapper_is_looked_through():
    assert is_causal_lm(nn.DataParallel(_llama()))


def test_auto_losses_follow_the_kind():
    torch.manual_seed(0)
    logits, labels = torch.randn(3, 5, 7, dtype=torch.float64), torch.randint(0, 7, (3, 5))
    labels[0, 2:] = -100
    outputs = {"logits": logits}
    assert torch.equal(per_example_losses(outputs, labels, causal=True), causal_lm_losses(logits, labels))
    assert torch.equal(per_example_losses(outputs, labels, causal=False), token_mean_losses(logits, labels))
    smoothed = per_example_losses(outputs, labels, causal=True, label_smoothing=0.1)
    for i in range(3):
        kept = labels[i, 1:] != -100
        single = torch.nn.functional.cross_entropy(logits[i, :-1][kept], labels[i, 1:][kept], label_smoothing=0.1)
        assert float(smoothed[i]) == pytest.approx(float(single), rel=1e-12)
