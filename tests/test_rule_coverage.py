"""Which rule differentiates which layer. The fallback is exact for every layer, so a built-in layer
that silently lost its rule (a registration dropped, a matcher that stopped matching) would still
pass every oracle test, only slower and heavier: these tests pin the rule of each built-in layer
type, when the engine is built and in the calls a forward pass records."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.t5.modeling_t5 import T5LayerNorm
from transformers.pytorch_utils import Conv1D

import dpscale
from dpscale import ConfigError, DPConfig, PrivacyEngine, Rule, UnsupportedModuleError
from dpscale.layers import FALLBACK
from dpscale.layers.attention import MULTIHEAD_ATTENTION
from dpscale.layers.convolution import CONVOLUTION
from dpscale.layers.embedding import EMBEDDING, EMBEDDING_BAG
from dpscale.layers.linear import LINEAR, TRANSPOSED_LINEAR
from dpscale.layers.normalization import (
    BROADCAST_SCALE,
    GROUP_NORM,
    INSTANCE_NORM,
    LAYER_NORM,
    RMS_NORM,
)
from dpscale.layers.rnn import RECURRENT
from tests.oracle import check_engine
from tests.test_models import MODELS

CONFIG = DPConfig(noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4)


class RawScale(nn.Module):
    """A custom layer holding a raw nn.Parameter: no rule matches it."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return torch.tanh(x * self.scale)


class ClampedLinear(nn.Linear):
    """Overrides nn.Linear's forward: the linear rule would be wrong for it."""

    def forward(self, x):
        return super().forward(x).clamp(-1, 1)


@pytest.mark.parametrize(
    "layer, rule",
    [
        (nn.Linear(4, 3), LINEAR),
        (Conv1D(3, 4), TRANSPOSED_LINEAR),
        (nn.Embedding(5, 3), EMBEDDING),
        (nn.LayerNorm(4), LAYER_NORM),
        (nn.RMSNorm(4), RMS_NORM),
        (LlamaRMSNorm(4), BROADCAST_SCALE),
        (nn.Conv2d(2, 3, 3), CONVOLUTION),
        (nn.Conv1d(2, 3, 3), CONVOLUTION),
        (RawScale(), FALLBACK),
        (ClampedLinear(4, 3), FALLBACK),
        (nn.GroupNorm(2, 4), GROUP_NORM),
        (nn.InstanceNorm1d(4, affine=True), INSTANCE_NORM),
        (nn.InstanceNorm2d(4, affine=True), INSTANCE_NORM),
        (nn.EmbeddingBag(5, 3), EMBEDDING_BAG),
        (nn.EmbeddingBag(5, 3, mode="max"), EMBEDDING_BAG),
        (nn.LSTM(3, 4), RECURRENT),
        (nn.GRU(3, 4, num_layers=2, bidirectional=True), RECURRENT),
        (nn.RNN(3, 4), RECURRENT),
        (nn.MultiheadAttention(4, 2), MULTIHEAD_ATTENTION),  # out_proj is read by its parent: no owner of its own
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, nn.Module) else value.name,
)
def test_rule_of_each_layer(layer, rule):
    assert dict(PrivacyEngine(layer, CONFIG).rule_names) == {"": rule.name}


MODEL_RULES = {
    "gpt2-tied": {Conv1D: TRANSPOSED_LINEAR, nn.Embedding: EMBEDDING, nn.LayerNorm: LAYER_NORM, nn.Linear: LINEAR},
    "llama-tied": {nn.Linear: LINEAR, nn.Embedding: EMBEDDING, LlamaRMSNorm: BROADCAST_SCALE},
    "bert-classification": {nn.Linear: LINEAR, nn.Embedding: EMBEDDING, nn.LayerNorm: LAYER_NORM},
    "t5": {nn.Linear: LINEAR, nn.Embedding: EMBEDDING, T5LayerNorm: BROADCAST_SCALE},
}


def _owning_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {
        name: module for name, module in model.named_modules()
        if any(p is not None and p.requires_grad for p in module._parameters.values())
    }


@pytest.mark.parametrize("name", list(MODEL_RULES))
def test_rule_of_each_layer_in_real_models(name):
    """Every module owning parameters in a tiny real model gets its family's rule; T5's relative
    position bias (no batch dimension) is the one module left to the fallback, at its parent."""
    model, loss_fn, batch = MODELS[name]()
    engine = PrivacyEngine(model, CONFIG)
    owners = _owning_modules(model)
    assert set(engine.rule_names) == set(owners)
    expected = {}
    for qualname, module in owners.items():
        if qualname.endswith("relative_attention_bias"):
            expected[qualname] = FALLBACK.name
        else:
            assert type(module) in MODEL_RULES[name], f"{qualname}: {type(module).__name__} has no expected rule"
            expected[qualname] = MODEL_RULES[name][type(module)].name
    assert dict(engine.rule_names) == expected
    assert {type(owners[q]) for q, rule in expected.items() if rule != FALLBACK.name} == set(MODEL_RULES[name])

    loss_fn(model, batch(0))  # the calls recorded at run time use the same rules
    recorded = {call.qualname: call.rule.name for call in engine._tape.calls}
    # T5's bias table is differentiated through each enclosing attention call; nothing else falls back.
    bias_parents = {q.rsplit(".", 1)[0] for q in expected if q.endswith("relative_attention_bias")}
    assert {q for q, rule in recorded.items() if rule == FALLBACK.name} == bias_parents
    assert {q: rule for q, rule in recorded.items() if q not in bias_parents}.items() <= expected.items()
    engine.detach()


def test_a_registered_rule_replaces_the_fallback():
    registry = dpscale.default_registry()
    mine = Rule("mine", FALLBACK.grads, whole_call=True)
    registry.register(RawScale, mine)
    model = nn.Sequential(nn.Linear(4, 4), RawScale()).double()
    engine = check_engine(model, [{"x": torch.randn(3, 4, dtype=torch.float64)}], lambda m, i: m(i["x"]).sum(1), CONFIG,
                          rules=registry)
    assert dict(engine.rule_names) == {"0": LINEAR.name, "1": "mine"}


def test_the_default_rule_can_be_replaced():
    def refuse(module):
        raise UnsupportedModuleError(f"{type(module).__name__} has no rule of its own.")

    registry = dpscale.default_registry()
    registry.set_default(Rule("refuse", FALLBACK.grads, validate=refuse, whole_call=True))
    PrivacyEngine(nn.Linear(4, 3), CONFIG, rules=registry)
    with pytest.raises(UnsupportedModuleError, match="RawScale has no rule"):
        PrivacyEngine(RawScale(), CONFIG, rules=registry)
    with pytest.raises(ConfigError, match="whole_call=True"):
        registry.set_default(LINEAR)


def test_layer_rules_know_no_tape():
    """Rules are functions of (module, inputs, output gradient): nothing in layers/ imports the tape
    or the engine."""
    layers = Path(dpscale.__file__).parent / "layers"
    for path in layers.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            assert not [n for n in names if n in ("dpscale.tape", "dpscale.engine")], f"{path.name} imports {names}"
