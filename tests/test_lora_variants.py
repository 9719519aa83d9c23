"""PEFT LoRA as users configure it: any rank, rsLoRA, dropout in training (exact for the masks the
forward drew), all against per-example references in float64; DoRA refused when the engine is
built, with what to do instead."""

from __future__ import annotations

import peft
import pytest
import torch
import transformers

import dpscale
from dpscale.errors import UnsupportedModuleError
from dpscale.losses import causal_lm_losses
from tests.oracle import assert_close, check_engine, clipped_sum


def _llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                      tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config)


def _peft(**lora):
    torch.manual_seed(1)
    lora.setdefault("target_modules", "all-linear")
    model = peft.get_peft_model(_llama(), peft.LoraConfig(init_lora_weights=False, **lora)).double()
    return model


def _losses(model, inputs):
    return causal_lm_losses(model(input_ids=inputs["input_ids"]).logits, inputs["input_ids"])


def _batches():
    torch.manual_seed(2)
    return [{"input_ids": torch.randint(0, 40, (4, 6))} for _ in range(2)]


@pytest.mark.parametrize("lora",
                         [dict(r=1, lora_alpha=2), dict(r=16, lora_alpha=8), dict(r=4, lora_alpha=8, use_rslora=True)],
                         ids=["rank-1", "rank-16", "rslora"])
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_lora_ranks_and_rslora_match_the_single_example_loop(lora, clipping):
    model = _peft(**lora)
    config = dpscale.DPConfig(max_grad_norm=0.05, expected_batch_size=4, noise_multiplier=0.0, clipping=clipping)
    engine = check_engine(model, _batches(), _losses, config)
    assert engine.parameters and all("lora_" in name for name in engine.parameters)


def test_lora_dropout_in_training_is_exact_for_the_masks_of_the_forward():
    """With dropout the reference cannot rerun examples one by one (new masks): it differentiates
    each example's loss through the very forward the engine recorded, whose masks it shares."""
    model = _peft(r=4, lora_alpha=8, lora_dropout=0.3).train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    config = dpscale.DPConfig(max_grad_norm=0.05, expected_batch_size=4, noise_multiplier=0.0)
    engine = dpscale.PrivacyEngine(model, config, optimizer=torch.optim.SGD(list(params.values()), lr=0.0))
    torch.manual_seed(3)
    losses = _losses(model, _batches()[0])
    with engine.paused():  # the reference differentiates the recorded forward itself
        rows = [torch.autograd.grad(losses[i], list(params.values()), retain_graph=True) for i in range(4)]
    expected = {n: torch.stack([row[k] for row in rows]) for k, n in enumerate(params)}
    engine.backward(losses)
    norms, sums = clipped_sum(expected, engine.clipping, 4)
    assert_close(engine.last_norms, norms, 1e-6, "per-example norms")
    got = engine.clipped_sums()
    for name in engine.parameters:
        assert_close(got[name], sums[name], 1e-6, f"clipped sum of {name}")
    # the masks mattered: the same examples without dropout give other gradients
    model.eval()
    with engine.paused():
        plain = torch.autograd.grad(_losses(model, _batches()[0])[0], list(params.values()))
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(plain, (row for row in rows[0])))
    engine.detach()


def test_dora_is_refused_when_the_engine_is_built():
    model = _peft(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(UnsupportedModuleError, match=r"DoRA.*use_dora=False"):
        dpscale.PrivacyEngine(model, dpscale.DPConfig(max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=4),
                              optimizer=torch.optim.SGD(trainable, lr=0.1))
