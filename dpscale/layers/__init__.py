"""Per-layer rules and the registry that maps modules to them (the torch.func fallback is its
default). Adding a layer family is one new file here and one line in ``default_registry``."""

from __future__ import annotations

from torch import nn

from dpscale.layers.attention import MULTIHEAD_ATTENTION, is_plain_attention
from dpscale.layers.convolution import CONVOLUTION, is_plain_convolution
from dpscale.layers.embedding import EMBEDDING, EMBEDDING_BAG
from dpscale.layers.functional import FALLBACK
from dpscale.layers.linear import LINEAR, TRANSPOSED_LINEAR
from dpscale.layers.normalization import (
    BROADCAST_SCALE,
    GROUP_NORM,
    INSTANCE_NORM,
    LAYER_NORM,
    RMS_NORM,
    is_huggingface_rms_norm,
    is_plain_instance_norm,
)
from dpscale.layers.peft_dora import DORA_UNSUPPORTED, is_peft_dora_layer
from dpscale.layers.registry import RuleRegistry
from dpscale.layers.rnn import RECURRENT, is_plain_recurrent
from dpscale.layers.rule import CallInputs, Rule
from dpscale.layers.tensor_parallel import TP_LINEAR, TP_UNSUPPORTED, is_autotp_layer, is_autotp_linear


def _same_forward(base: type):
    """Matches ``base`` and subclasses that keep its forward (a subclass that overrides forward
    computes something else and gets the registry's default, the torch.func fallback)."""

    def matches(module: nn.Module) -> bool:
        return isinstance(module, base) and type(module).forward is base.forward

    matches.__name__ = f"same_forward_as_{base.__name__}"
    return matches


def _transformer_batch_dim(module: nn.Module) -> int:
    """nn.Transformer* keep the batch in dim 1 unless built with batch_first=True."""
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)):
        module = module.layers[0]
    batch_first = module.batch_first if isinstance(module, nn.Transformer) else module.self_attn.batch_first
    return 0 if batch_first else 1


def default_registry() -> RuleRegistry:
    """A fresh registry with dpscale's rules; register more on it before building the engine."""
    registry = RuleRegistry()
    registry.register(_same_forward(nn.Linear), LINEAR)
    registry.register(_same_forward(nn.Embedding), EMBEDDING)
    registry.register(_same_forward(nn.LayerNorm), LAYER_NORM)
    registry.register(_same_forward(nn.RMSNorm), RMS_NORM)
    registry.register(is_plain_convolution, CONVOLUTION)
    registry.register(_same_forward(nn.EmbeddingBag), EMBEDDING_BAG)
    registry.register(_same_forward(nn.GroupNorm), GROUP_NORM)
    registry.register(is_plain_instance_norm, INSTANCE_NORM)
    registry.register(is_plain_recurrent, RECURRENT)
    registry.register(is_plain_attention, MULTIHEAD_ATTENTION)
    for container in (nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder,
                      nn.TransformerEncoderLayer, nn.TransformerDecoderLayer):
        registry.register_layout(container, _transformer_batch_dim)
    registry.register(is_huggingface_rms_norm, BROADCAST_SCALE)
    registry.differentiate_through_parent("relative_attention_bias")  # T5, mT5, LongT5, UMT5, Switch
    from transformers.pytorch_utils import Conv1D  # a dependency; imported when a registry is built

    registry.register(Conv1D, TRANSPOSED_LINEAR)
    registry.register(is_autotp_layer, TP_UNSUPPORTED)  # DeepSpeed AutoTP: only the two plain layers
    registry.register(is_autotp_linear, TP_LINEAR)
    registry.register(is_peft_dora_layer, DORA_UNSUPPORTED)
    return registry


__all__ = ["FALLBACK", "CallInputs", "Rule", "RuleRegistry", "default_registry"]
