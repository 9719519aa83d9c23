"""Whole tiny models of real architectures, built from config, against the one-example loop in
float64: per-example norms and p.grad after engine.backward, for every clipping mode."""

from __future__ import annotations

import pytest
import torch
import transformers

from dpscale import DPConfig
from dpscale.losses import causal_lm_losses, sequence_classification_losses, token_mean_losses
from tests.oracle import check_engine

B = 3


def _ids(vocab: int, batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _prepare(model):
    torch.manual_seed(0)
    return model.double().train()


def causal_lm_case(model, vocab, length=7):
    def loss_fn(m, inputs):
        return causal_lm_losses(
            m(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits, inputs["labels"]
        )

    def batch(seed):
        ids = _ids(vocab, B, length, seed)
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0  # a right-padded example
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return model, loss_fn, batch


def gpt2(tied: bool):
    cfg = transformers.GPT2Config(vocab_size=61, n_positions=32, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tied)
    return causal_lm_case(_prepare(transformers.GPT2LMHeadModel(cfg)), 61)


def llama():
    cfg = transformers.LlamaConfig(vocab_size=67, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=True)
    return causal_lm_case(_prepare(transformers.LlamaForCausalLM(cfg)), 67)


def opt():
    cfg = transformers.OPTConfig(vocab_size=59, hidden_size=16, ffn_dim=24, num_hidden_layers=2, num_attention_heads=2,
                                 max_position_embeddings=32, word_embed_proj_dim=12, dropout=0.0, attention_dropout=0.0,
                                 activation_dropout=0.0, layerdrop=0.0)
    return causal_lm_case(_prepare(transformers.OPTForCausalLM(cfg)), 59)


def bert():
    cfg = transformers.BertConfig(vocab_size=53, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, num_labels=3)
    model = _prepare(transformers.BertForSequenceClassification(cfg))

    def loss_fn(m, inputs):
        out = m(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                token_type_ids=inputs["token_type_ids"])
        return sequence_classification_losses(out.logits, inputs["labels"])

    def batch(seed):
        ids = _ids(53, B, 6, seed)
        mask = torch.ones_like(ids)
        mask[1, -1] = 0
        types = torch.zeros_like(ids)
        types[:, 3:] = 1
        labels = torch.randint(0, 3, (B,), generator=torch.Generator().manual_seed(seed + 1))
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels}

    return model, loss_fn, batch


def t5(length=6):
    cfg = transformers.T5Config(vocab_size=71, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=2,
                                num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    model = _prepare(transformers.T5ForConditionalGeneration(cfg))

    def loss_fn(m, inputs):
        out = m(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=inputs["labels"])
        return token_mean_losses(out.logits, inputs["labels"])

    def batch(seed):
        ids = _ids(71, B, length, seed)
        mask = torch.ones_like(ids)
        mask[2, -2:] = 0
        labels = _ids(71, B, length - 1, seed + 7)
        labels[0, -1] = -100
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return model, loss_fn, batch


def vit():
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=24, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0, num_labels=4)
    model = _prepare(transformers.ViTForImageClassification(cfg))

    def loss_fn(m, inputs):
        return sequence_classification_losses(m(pixel_values=inputs["pixel_values"]).logits, inputs["labels"])

    def batch(seed):
        g = torch.Generator().manual_seed(seed)
        return {"pixel_values": torch.randn(B, 3, 8, 8, generator=g, dtype=torch.float64),
                "labels": torch.randint(0, 4, (B,), generator=g)}

    return model, loss_fn, batch


MODELS = {
    "gpt2-tied": lambda: gpt2(True),
    "gpt2-untied": lambda: gpt2(False),
    "llama-tied": llama,
    "opt": opt,
    "bert-classification": bert,
    "t5": t5,
    "vit": vit,
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("clip_fn", ["abadi", "automatic"])
def test_flat_clipping_matches_single_example_loop(name, clip_fn):
    model, loss_fn, batch = MODELS[name]()
    # A threshold between the smallest and largest norm, so that some examples are clipped and some not.
    config = DPConfig(noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4.0, clip_fn=clip_fn,
                      automatic_gamma=0.01)
    engine = check_engine(model, [batch(0)], loss_fn, config)
    assert engine.last_norms.shape == (B,)


@pytest.mark.parametrize("name", list(MODELS))
def test_per_layer_clipping_and_two_accumulated_backwards(name):
    model, loss_fn, batch = MODELS[name]()
    config = DPConfig(noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=5.0, clipping="per_layer")
    check_engine(model, [batch(1), batch(2)], loss_fn, config)


def test_grouped_clipping_on_gpt2():
    model, loss_fn, batch = gpt2(True)
    groups = [["transformer.wte.weight", "transformer.wpe.weight"], ["transformer.h.0.*"],
              ["transformer.h.1.*", "transformer.ln_f.*"]]
    config = DPConfig(noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=3.0, clipping=groups,
                      group_max_grad_norms=[0.6, 0.6, 0.52915026])
    check_engine(model, [batch(3)], loss_fn, config)


def test_norms_are_clipped_somewhere_and_not_everywhere():
    """Guards the tests above against a vacuous threshold."""
    model, loss_fn, batch = gpt2(True)
    config = DPConfig(noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4.0)
    engine = check_engine(model, [batch(0)], loss_fn, config)
    assert (engine.last_norms > 1.0).any()


def test_t5_relative_bias_when_sequence_length_equals_batch_size():
    """The bias table is [T, T]: with T == B its shape looks batched; the registry sends it
    through the enclosing attention module all the same."""
    model, loss_fn, batch = t5(length=B)
    batch_inputs = batch(4)
    batch_inputs["labels"] = batch_inputs["labels"][:, :2]
    config = DPConfig(noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=3.0)
    check_engine(model, [batch_inputs], loss_fn, config)
