"""``nn.Embedding``: the per-example gradient scatters the output gradient into the rows of the
looked-up ids, kept as integer indices (one-hot left factor) so that neither a [B, V, d]
gradient nor a [B, T, V] one-hot is ever formed."""

from __future__ import annotations

from torch import Tensor, nn

from dpscale.errors import UnsupportedModuleError
from dpscale.layers.rule import Rule
from dpscale.per_example import Outer, param_shape


def embedding_grads(module: nn.Embedding, inputs: tuple, output_grad: Tensor, names: tuple[str, ...]):
    ids = inputs[0]
    batch = ids.shape[0]
    ids = ids.reshape(batch, -1)
    grads = output_grad.reshape(batch, ids.shape[1], -1)
    if module.padding_idx is not None:
        # torch gives the padding row no gradient; neither do we.
        grads = grads.masked_fill((ids == module.padding_idx)[:, :, None], 0)
    return {"weight": Outer(left=ids, right=grads, m=module.num_embeddings, shape=param_shape(module.weight)).cheapest()}


def validate_embedding(module: nn.Embedding) -> None:
    if module.scale_grad_by_freq:
        raise UnsupportedModuleError(
            "nn.Embedding(scale_grad_by_freq=True) scales each example's gradient by token counts "
            "over the whole batch, which mixes examples; build the embedding without it."
        )
    if module.max_norm is not None:
        raise UnsupportedModuleError(
            "nn.Embedding(max_norm=...) renormalises weights in place during the forward pass; "
            "build the embedding without max_norm to train it privately."
        )
    if module.sparse:
        raise UnsupportedModuleError("nn.Embedding(sparse=True) is not supported; use sparse=False.")


EMBEDDING = Rule("embedding", embedding_grads, validate_embedding)
