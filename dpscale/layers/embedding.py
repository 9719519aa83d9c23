"""``nn.Embedding``: the per-example gradient scatters the output gradient into the rows of the
looked-up ids, kept as integer indices (one-hot left factor) so that neither a [B, V, d]
gradient nor a [B, T, V] one-hot is ever formed.

``nn.EmbeddingBag`` reduces each example's bag of ids to one vector: with ``mode="sum"`` or
``"mean"`` the example's gradient is that same scatter, each id's row receiving the output gradient
times the id's coefficient (its per-sample weight, or 1 / bag size; ids equal to ``padding_idx``
count for nothing). With ``mode="max"`` each output coordinate k comes from one row, so the example's
gradient is ``sum_k e_{row_k} (x) g_k e_k``, again an outer product over k. Bags must arrive as a
2-D [B, n] tensor, one example per row: with 1-D ids and offsets, the model's inputs do not say how
many examples the batch holds."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dpscale.errors import UnsupportedModuleError
from dpscale.layers.rule import CallInputs, Rule
from dpscale.per_example import Outer, accumulation_dtype, param_shape


def embedding_grads(module: nn.Embedding, inputs: tuple, output_grad: Tensor, names: tuple[str, ...]):
    ids = inputs[0]
    batch = ids.shape[0]
    ids = ids.reshape(batch, -1)
    grads = output_grad.reshape(batch, ids.shape[1], -1)
    if module.padding_idx is not None:
        # torch gives the padding row no gradient; neither do we.
        grads = grads.masked_fill((ids == module.padding_idx)[:, :, None], 0)
    return {
        "weight": Outer(left=ids, right=grads, m=module.num_embeddings, shape=param_shape(module.weight)).cheapest()
    }


def _bag_arguments(inputs: CallInputs) -> tuple:
    names = ("input", "offsets", "per_sample_weights")
    values = list(inputs) + [inputs.kwargs.get(name) for name in names[len(inputs) :]]
    return tuple(values[:3]) + (None,) * (3 - len(values[:3]))


def embedding_bag_batch_size(module: nn.EmbeddingBag, inputs: CallInputs) -> int:
    ids, offsets, _ = _bag_arguments(inputs)
    if ids.dim() != 2 or offsets is not None:
        raise UnsupportedModuleError(
            "nn.EmbeddingBag was called with 1-D ids and offsets; dpscale needs one example per row: pass the "
            "bags as a 2-D [batch, n] tensor, shorter bags padded with the bag's padding_idx (build it with "
            "EmbeddingBag(..., padding_idx=p); padded ids count for nothing in sum and mean)."
        )
    return ids.shape[0]


def embedding_bag_grads(module: nn.EmbeddingBag, inputs: CallInputs, output_grad: Tensor, names: tuple[str, ...]):
    ids, _, sample_weights = _bag_arguments(inputs)
    dtype = accumulation_dtype(output_grad)
    grad = output_grad.to(dtype)
    shape = param_shape(module.weight)
    kept = torch.ones_like(ids, dtype=torch.bool) if module.padding_idx is None else ids != module.padding_idx
    if module.mode == "max":
        rows = module.weight.detach().to(dtype)[ids].masked_fill(~kept[:, :, None], float("-inf"))  # [B, n, d]
        chosen = ids.gather(1, rows.argmax(1))  # [B, d]: the row each coordinate comes from
        right = torch.diag_embed(grad.masked_fill(~kept.any(1, keepdim=True), 0))  # empty bags output zeros
        return {"weight": Outer(left=chosen, right=right, m=module.num_embeddings, shape=shape).cheapest()}
    coefficient = kept.to(dtype)
    if sample_weights is not None:
        coefficient = coefficient * sample_weights.detach().to(dtype)
    if module.mode == "mean":
        coefficient = coefficient / kept.sum(1, keepdim=True).clamp(min=1)
    right = coefficient[:, :, None] * grad[:, None, :]  # [B, n, d]
    return {"weight": Outer(left=ids, right=right, m=module.num_embeddings, shape=shape).cheapest()}


def validate_embedding(module: nn.Embedding | nn.EmbeddingBag) -> None:
    name = type(module).__name__
    if module.scale_grad_by_freq:
        raise UnsupportedModuleError(
            f"nn.{name}(scale_grad_by_freq=True) scales each example's gradient by token counts "
            "over the whole batch, which mixes examples; build the embedding without it."
        )
    if module.max_norm is not None:
        raise UnsupportedModuleError(
            f"nn.{name}(max_norm=...) renormalises weights in place during the forward pass; "
            "build the embedding without max_norm to train it privately."
        )
    if module.sparse:
        raise UnsupportedModuleError(f"nn.{name}(sparse=True) is not supported; use sparse=False.")


EMBEDDING = Rule("embedding", embedding_grads, validate_embedding)
EMBEDDING_BAG = Rule("embedding_bag", embedding_bag_grads, validate_embedding, batch_size_of=embedding_bag_batch_size)
