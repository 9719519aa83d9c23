"""One loss per example from model outputs: the privacy unit is one example (one sequence), so a
sequence's loss is the mean over its own tokens, never a mean over the batch's tokens."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from dpscale.errors import LossShapeError
from dpscale.per_example import accumulation_dtype


def token_mean_losses(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """[B] mean cross-entropy over each example's positions whose label is not ``ignore_index``
    (no shift: seq2seq decoders, token classification). An example with no labelled token has
    loss 0 and so gradient 0."""
    if logits.dim() < 3 or labels.shape != logits.shape[:-1]:
        raise LossShapeError(
            f"Expected logits [B, T, V] and labels [B, T], got {tuple(logits.shape)} and {tuple(labels.shape)}."
        )
    batch, vocab = logits.shape[0], logits.shape[-1]
    dtype = accumulation_dtype(logits)
    per_token = F.cross_entropy(
        logits.reshape(-1, vocab).to(dtype), labels.reshape(-1), ignore_index=ignore_index, reduction="none"
    ).reshape(batch, -1)
    counts = (labels.reshape(batch, -1) != ignore_index).sum(1).clamp(min=1)
    return per_token.sum(1) / counts


def causal_lm_losses(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """[B] next-token losses: position t predicts label t+1, as Hugging Face causal LMs do."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise LossShapeError(
            f"Expected logits [B, T, V] and labels [B, T], got {tuple(logits.shape)} and {tuple(labels.shape)}."
        )
    return token_mean_losses(logits[:, :-1], labels[:, 1:], ignore_index)


def sequence_classification_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """[B] cross-entropy for class labels; squared error for a regression head (one output,
    floating-point labels), as ``*ForSequenceClassification`` models do."""
    if logits.dim() != 2 or labels.shape[0] != logits.shape[0]:
        raise LossShapeError(f"Expected logits [B, C] and labels [B], got {tuple(logits.shape)} and {tuple(labels.shape)}.")
    dtype = accumulation_dtype(logits)
    if logits.shape[1] == 1 and labels.is_floating_point():
        return (logits[:, 0].to(dtype) - labels.to(dtype)) ** 2
    return F.cross_entropy(logits.to(dtype), labels, reduction="none")
