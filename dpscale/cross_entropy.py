"""Per-token cross-entropy computed in row chunks, so that a language model's loss never holds a
second full-size copy of its logits.

``F.cross_entropy`` over [N, V] logits keeps the whole log-softmax ([N, V], float32) for its
backward, and autograd then builds a full-size gradient of it before the logits' own gradient:
with SmolLM2's vocabulary (49,152) a micro-batch of 16 sequences of 96 tokens holds 0.3 GB of
logits and as much again for each of those copies (more when the logits are bf16 and are widened
to float32 first). Here the forward reads the logits a chunk of rows at a time (widened to float32
or better per chunk) and keeps only each row's log-sum-exp; the backward writes the logits'
gradient chunk by chunk from the saved logits. Peak extra memory is one chunk (about 64 MB).

The values are F.cross_entropy's (``reduction="none"``, ``ignore_index``, ``label_smoothing``): a
row whose label is ``ignore_index`` has loss 0 and gradient 0. tests/test_cross_entropy.py checks
values and gradients against F.cross_entropy in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["token_cross_entropy"]

_CHUNK_ELEMENTS = 1 << 24  # rows per chunk: about 64 MB of float32 logits


def _rows_per_chunk(vocab: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(vocab, 1))


class _TokenCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, ignore_index: int, smoothing: float, dtype: torch.dtype):
        rows, vocab = logits.shape
        kept = labels != ignore_index
        safe = torch.where(kept, labels, torch.zeros_like(labels))
        losses = torch.empty(rows, dtype=dtype, device=logits.device)
        lse = torch.empty(rows, dtype=dtype, device=logits.device)
        step = _rows_per_chunk(vocab)
        for start in range(0, rows, step):
            chunk = logits[start : start + step].to(dtype)
            part = torch.logsumexp(chunk, dim=1)
            lse[start : start + step] = part
            nll = part - chunk.gather(1, safe[start : start + step, None])[:, 0]
            if smoothing:
                nll = (1.0 - smoothing) * nll + smoothing * (part - chunk.mean(1))
            losses[start : start + step] = nll
        losses.masked_fill_(~kept, 0.0)
        ctx.save_for_backward(logits, safe, kept, lse)
        ctx.smoothing, ctx.dtype = smoothing, dtype
        return losses

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_losses: Tensor):
        logits, safe, kept, lse = ctx.saved_tensors
        rows, vocab = logits.shape
        scale = (grad_losses.to(ctx.dtype) * kept.to(ctx.dtype))[:, None]
        grad = torch.empty_like(logits)
        step = _rows_per_chunk(vocab)
        for start in range(0, rows, step):
            end = min(start + step, rows)
            part = torch.exp(logits[start:end].to(ctx.dtype) - lse[start:end, None])  # softmax
            part.scatter_add_(1, safe[start:end, None], part.new_full((end - start, 1), -(1.0 - ctx.smoothing)))
            if ctx.smoothing:
                part -= ctx.smoothing / vocab
            grad[start:end] = part * scale[start:end]
        return grad, None, None, None, None


def token_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = -100, *, label_smoothing: float = 0.0,
                        dtype: torch.dtype = torch.float32) -> Tensor:
    """[N] cross-entropy of [N, V] ``logits`` against [N] ``labels``, computed in ``dtype``
    (float32 or float64) a chunk of rows at a time; the same values and gradients as
    ``F.cross_entropy(logits.to(dtype), labels, ignore_index=..., reduction="none",
    label_smoothing=...)``, without its full-size float32 intermediates."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"Expected logits [N, V] and labels [N], got {tuple(logits.shape)} and {tuple(labels.shape)}.")
    return _TokenCrossEntropy.apply(logits, labels, ignore_index, float(label_smoothing), dtype)
