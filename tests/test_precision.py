"""bf16 autocast on CPU: activations and output gradients arrive in bf16, norms and clip factors
are computed in float32 and agree with the float32 computation to bf16 accuracy."""

from __future__ import annotations

import torch
import transformers

from dpscale import DPConfig, PrivacyEngine
from dpscale.losses import causal_lm_losses


def _run(model, ids, autocast: bool):
    model.zero_grad(set_to_none=True)
    engine = PrivacyEngine(model, DPConfig(noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4),
                           optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids).logits
    engine.backward(causal_lm_losses(logits, ids))
    engine.detach()
    grads = {n: g.clone() for n, g in engine.clipped_sums().items()}
    return engine, grads


def test_bf16_autocast_norms_in_float32():
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(1))
    low, low_grads = _run(model, ids, autocast=True)
    full, full_grads = _run(model, ids, autocast=False)
    assert low.last_norms.dtype == torch.float32 and low.last_clip_factors.dtype == torch.float32
    assert torch.allclose(low.last_norms, full.last_norms, rtol=3e-2)
    for name, grad in full_grads.items():
        assert low_grads[name].dtype == torch.float32
        assert (low_grads[name] - grad).norm() <= 5e-2 * grad.norm() + 1e-6, name
