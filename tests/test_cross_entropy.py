"""The chunked per-token cross-entropy (dpscale/cross_entropy.py) against F.cross_entropy in
float64: values and gradients, with ignored rows, label smoothing, several chunks, bf16 logits; and
the per-example causal LM losses built on it against a plain loop over single examples."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dpscale.cross_entropy as ce
from dpscale.cross_entropy import token_cross_entropy
from dpscale.losses import causal_lm_losses, token_mean_losses


def _case(rows=37, vocab=11, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(rows, vocab, generator=g, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[::5] = -100
    return logits, labels


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk_elements", [1, 50, 1 << 24])  # one row per chunk, several rows, one chunk
def test_values_and_gradients_match_f_cross_entropy(monkeypatch, smoothing, chunk_elements):
    monkeypatch.setattr(ce, "_CHUNK_ELEMENTS", chunk_elements)
    logits, labels = _case()
    weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mine = logits.clone().requires_grad_(True)
    theirs = logits.clone().requires_grad_(True)
    got = token_cross_entropy(mine, labels, label_smoothing=smoothing, dtype=torch.float64)
    expected = F.cross_entropy(theirs, labels, reduction="none", label_smoothing=smoothing)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert (got[labels == -100] == 0).all()
    (got * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-12, atol=1e-12)
    assert (mine.grad[labels == -100] == 0).all()


def test_bf16_logits_are_widened_per_chunk_and_get_a_bf16_gradient(monkeypatch):
    monkeypatch.setattr(ce, "_CHUNK_ELEMENTS", 40)
    logits, labels = _case(dtype=torch.bfloat16)
    low = logits.clone().requires_grad_(True)
    got = token_cross_entropy(low, labels)
    assert got.dtype == torch.float32
    reference = logits.double().requires_grad_(True)
    expected = F.cross_entropy(reference, labels, reduction="none")
    # the same bf16 inputs, read exactly in float32: only float32 rounding differs
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    expected.sum().backward()
    assert low.grad.dtype == torch.bfloat16
    # the gradient is rounded once to bf16 (relative 2^-8 of each entry, entries of softmax size <= 1)
    torch.testing.assert_close(low.grad.double(), reference.grad, rtol=2**-8, atol=2**-9)


def test_causal_lm_losses_match_a_loop_over_examples_in_float64():
    g = torch.Generator().manual_seed(1)
    batch, length, vocab = 4, 9, 13
    logits = torch.randn(batch, length, vocab, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[0, :3] = -100  # a prompt
    labels[2, 5:] = -100  # padding
    labels[3, :] = -100  # nothing to predict: loss 0
    losses = causal_lm_losses(logits, labels)
    for i in range(batch):
        targets = labels[i, 1:]
        kept = targets != -100
        if kept.any():
            expected = F.cross_entropy(logits[i, :-1][kept], targets[kept], reduction="mean")
        else:
            expected = torch.zeros((), dtype=torch.float64)
        torch.testing.assert_close(losses[i], expected, rtol=1e-12, atol=1e-12)
        (grad,) = torch.autograd.grad(losses[i], logits, retain_graph=True)
        if kept.any():
            (reference,) = torch.autograd.grad(expected, logits, retain_graph=True)
        else:
            reference = torch.zeros_like(logits)
        torch.testing.assert_close(grad, reference, rtol=1e-12, atol=1e-12)
        assert grad[torch.arange(batch) != i].abs().max() == 0  # example i's loss reads example i only


def test_token_mean_losses_with_smoothing_match_a_loop():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 7, (3, 5), generator=g)
    labels[1, 2:] = -100
    got = token_mean_losses(logits, labels, label_smoothing=0.2)
    for i in range(3):
        kept = labels[i] != -100
        expected = F.cross_entropy(logits[i][kept], labels[i][kept], label_smoothing=0.2)
        torch.testing.assert_close(got[i], expected, rtol=1e-12, atol=1e-12)


def test_shape_is_checked():
    with pytest.raises(ValueError, match="Expected logits"):
        token_cross_entropy(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long))
