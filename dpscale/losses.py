"""One loss per example from model outputs: the privacy unit is one example (one sequence), so a
sequence's loss is the mean over its own tokens, never a mean over the batch's tokens. Label
smoothing, where asked, is applied per example for the same reason (the Trainer's LabelSmoother
averages over the batch's tokens, which mixes examples)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dpscale.cross_entropy import token_cross_entropy
from dpscale.errors import LossShapeError
from dpscale.per_example import accumulation_dtype

__all__ = ["causal_lm_losses", "label_word_logits", "label_word_losses", "per_example_losses",
           "sequence_classification_losses", "token_mean_losses"]


def token_mean_losses(logits: Tensor, labels: Tensor, ignore_index: int = -100, *,
                      label_smoothing: float = 0.0) -> Tensor:
    """[B] mean cross-entropy over each example's positions whose label is not ``ignore_index``
    (no shift: seq2seq decoders, token classification). An example with no labelled token has
    loss 0 and so gradient 0."""
    if logits.dim() < 3 or labels.shape != logits.shape[:-1]:
        raise LossShapeError(
            f"Expected logits [B, T, V] and labels [B, T], got {tuple(logits.shape)} and {tuple(labels.shape)}."
        )
    batch, vocab = logits.shape[0], logits.shape[-1]
    per_token = token_cross_entropy(  # chunked: no full-size float32 copy of the logits
        logits.reshape(-1, vocab), labels.reshape(-1), ignore_index, label_smoothing=label_smoothing,
        dtype=accumulation_dtype(logits),
    ).reshape(batch, -1)
    counts = (labels.reshape(batch, -1) != ignore_index).sum(1).clamp(min=1)
    return per_token.sum(1) / counts


def causal_lm_losses(logits: Tensor, labels: Tensor, ignore_index: int = -100, *,
                     label_smoothing: float = 0.0) -> Tensor:
    """[B] next-token losses: position t predicts label t+1, as Hugging Face causal LMs do. The
    labels are shifted, not the logits (the last position gets ``ignore_index``), so that the
    logits are read in place rather than copied."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise LossShapeError(
            f"Expected logits [B, T, V] and labels [B, T], got {tuple(logits.shape)} and {tuple(labels.shape)}."
        )
    shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore_index)], dim=1)
    return token_mean_losses(logits, shifted, ignore_index, label_smoothing=label_smoothing)


def sequence_classification_losses(logits: Tensor, labels: Tensor, *, label_smoothing: float = 0.0) -> Tensor:
    """[B] cross-entropy for class labels; squared error for a regression head (one output,
    floating-point labels), as ``*ForSequenceClassification`` models do (label smoothing does not
    apply to a regression head)."""
    if logits.dim() != 2 or labels.shape[0] != logits.shape[0]:
        raise LossShapeError(
            f"Expected logits [B, C] and labels [B], got {tuple(logits.shape)} and {tuple(labels.shape)}."
        )
    dtype = accumulation_dtype(logits)
    if logits.shape[1] == 1 and labels.is_floating_point():
        return (logits[:, 0].to(dtype) - labels.to(dtype)) ** 2
    return F.cross_entropy(logits.to(dtype), labels, reduction="none", label_smoothing=label_smoothing)


def per_example_losses(outputs, labels: Tensor, *, causal: bool, label_smoothing: float = 0.0) -> Tensor:
    """[B] losses of a transformers model's outputs, chosen by the logits' shape: [B, C] sequence
    classification, [B, T, V] token cross-entropy, shifted when ``causal`` (decide it with
    ``dpscale.models_kind.is_causal_lm``). DPTrainer's ``per_example_loss="auto"``."""
    logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
    if logits.dim() == 2:
        return sequence_classification_losses(logits, labels, label_smoothing=label_smoothing)
    if logits.dim() == 3:
        losses = causal_lm_losses if causal else token_mean_losses
        return losses(logits, labels, label_smoothing=label_smoothing)
    raise LossShapeError(
        f"per_example_loss='auto' knows logits [B, C] and [B, T, V], got {tuple(logits.shape)}: pass "
        "per_example_loss=fn(outputs, labels) -> [B]."
    )


def label_word_logits(logits: Tensor, attention_mask: Tensor, label_word_ids: Sequence[int] | Tensor) -> Tensor:
    """[B, K] the causal LM's logits of the K label words at each example's last real position
    (prompt-based classification: the next token after "<sentence> It was"). The batch must be
    padded on the right, as dpscale's collators pad it: with left padding the positions of an
    example's tokens, hence its logits, would depend on the longest example of the batch."""
    if logits.dim() != 3 or attention_mask.shape != logits.shape[:2]:
        raise LossShapeError(f"Expected logits [B, T, V] and attention_mask [B, T], got {tuple(logits.shape)} and "
                             f"{tuple(attention_mask.shape)}.")
    lengths = attention_mask.sum(1)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    if bool((lengths < 1).any()) or not torch.equal(attention_mask.bool(), positions[None, :] < lengths[:, None]):
        raise LossShapeError("label_word_logits needs every example padded on the right (attention_mask 1...1 0...0, "
                             "at least one real token): pad on the right (tokenizer.padding_side='right').")
    ids = torch.as_tensor(label_word_ids, dtype=torch.long, device=logits.device)
    last = logits[torch.arange(logits.shape[0], device=logits.device), lengths - 1]  # [B, V]
    return last[:, ids]


def label_word_losses(logits: Tensor, labels: Tensor, attention_mask: Tensor,
                      label_word_ids: Sequence[int] | Tensor) -> Tensor:
    """[B] cross-entropy over the label words only (their logits at the last real position,
    softmax over the K words, not the vocabulary): label k is word ``label_word_ids[k]``, as in
    Li et al. 2022 for sentence classification with a causal LM. One loss per example, so the
    engine clips each example's gradient through the LM head and the backbone."""
    scores = label_word_logits(logits, attention_mask, label_word_ids)
    if labels.shape != scores.shape[:1]:
        raise LossShapeError(f"Expected labels [B] = [{scores.shape[0]}], got {tuple(labels.shape)}.")
    return F.cross_entropy(scores.to(accumulation_dtype(scores)), labels, reduction="none")
