"""Each layer rule on its own, with fuzzed shapes, against the one-example loop in float64. Both
norm methods (ghost norms and materialised per-example gradients) are reached: the choice depends
on the shapes, and the strategies span both sides of the threshold.

Every run draws the same shapes (hypothesis derandomized) and the same data (torch seeded per test,
and per example from its shape), so a failure is a property of the code, never of the draw."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dpscale import DPConfig
from dpscale.per_example import Dense, Outer
from tests.oracle import check_engine

fuzz = settings(derandomize=True)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


class Probe(nn.Module):
    """layer -> a fixed random readout -> one loss per example, nonlinear in the output."""

    def __init__(self, layer: nn.Module, out_shape: tuple[int, ...], seed: int) -> None:
        super().__init__()
        self.layer = layer
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("readout", torch.randn(*out_shape, generator=g, dtype=torch.float64))

    def forward(self, x):
        y = self.layer(x)
        return torch.tanh(y * self.readout).flatten(1).sum(1) + (y.flatten(1) ** 2).sum(1) * 0.1


def run(layer: nn.Module, x: torch.Tensor, clip: float = 0.5, clipping="flat"):
    layer = layer.double()
    with torch.no_grad():
        out_shape = layer(x[:1]).shape[1:]
    model = Probe(layer, tuple(out_shape), seed=x.shape[0])
    config = DPConfig(noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=x.shape[0] + 1, clipping=clipping)
    return check_engine(model, [{"x": x}], lambda m, inputs: m(inputs["x"]), config)


shapes = st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 7), st.integers(1, 7))


@fuzz
@given(shapes, st.booleans(), st.booleans())
def test_linear(shape, bias, extra_dim):
    b, t, d, p = shape
    torch.manual_seed(b * 100 + t)
    x = torch.randn(b, 2, t, d, dtype=torch.float64) if extra_dim else torch.randn(b, t, d, dtype=torch.float64)
    run(nn.Linear(d, p, bias=bias), x, clipping="per_layer" if bias else "flat")


def test_linear_without_positions():
    run(nn.Linear(5, 3), torch.randn(4, 5, dtype=torch.float64))


@fuzz
@given(shapes)
def test_gpt2_conv1d(shape):
    from transformers.pytorch_utils import Conv1D

    b, t, d, p = shape
    torch.manual_seed(t)
    run(Conv1D(p, d), torch.randn(b, t, d, dtype=torch.float64))


@fuzz
@given(st.integers(1, 4), st.integers(1, 8), st.integers(2, 9), st.integers(1, 5), st.sampled_from([None, 0, 1]))
def test_embedding(b, t, vocab, dim, padding_idx):
    torch.manual_seed(vocab * 10 + t)
    ids = torch.randint(0, vocab, (b, t))
    if padding_idx is not None:
        ids[0, 0] = padding_idx
    layer = nn.Embedding(vocab, dim, padding_idx=padding_idx)
    run(layer, ids)


@fuzz
@given(shapes, st.booleans())
def test_layer_norm(shape, affine_bias):
    b, t, d, _ = shape
    torch.manual_seed(d)
    layer = nn.LayerNorm(d + 1, bias=affine_bias)
    with torch.no_grad():
        layer.weight.normal_()
    run(layer, torch.randn(b, t, d + 1, dtype=torch.float64))


@fuzz
@given(shapes)
def test_torch_rms_norm(shape):
    b, t, d, _ = shape
    torch.manual_seed(b * 100 + t * 10 + d)
    layer = nn.RMSNorm(d, eps=1e-6)
    with torch.no_grad():
        layer.weight.normal_()
    run(layer, torch.randn(b, t, d, dtype=torch.float64))


@pytest.mark.parametrize("family", ["llama", "t5", "gemma"])
def test_huggingface_rms_norms(family):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    layer = {"llama": LlamaRMSNorm, "t5": T5LayerNorm, "gemma": GemmaRMSNorm}[family](6)
    with torch.no_grad():
        layer.weight.normal_()
    engine = run(layer, torch.randn(3, 4, 6, dtype=torch.float64))
    assert engine._tape is not None


@fuzz
@given(
    st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.integers(1, 2),
    st.sampled_from([0, 1, "same", "valid"]), st.integers(1, 2), st.booleans(),
)
def test_conv2d(b, c_in, c_out, k, stride, padding, dilation, bias):
    if padding == "same":
        stride = 1
    torch.manual_seed(c_in * 7 + k)
    layer = nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding, dilation=dilation, bias=bias)
    run(layer, torch.randn(b, c_in, 6, 5, dtype=torch.float64))


@fuzz
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.sampled_from([0, 2, "same"]))
def test_conv1d(b, c_in, c_out, k, padding):
    torch.manual_seed(k)
    run(nn.Conv1d(c_in, c_out, k, padding=padding), torch.randn(b, c_in, 7, dtype=torch.float64))


def test_vit_patch_embedding():
    run(nn.Conv2d(3, 8, kernel_size=4, stride=4), torch.randn(3, 3, 8, 8, dtype=torch.float64))


class ScaleShift(nn.Module):
    """A custom layer with raw parameters and no rule: the torch.func fallback."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d))
        self.table = nn.Parameter(torch.randn(3, d))

    def forward(self, x):
        return torch.sin(x * self.scale) + self.table.sum(0) * x.mean(-1, keepdim=True)


@fuzz
@given(shapes)
def test_functional_fallback_on_raw_parameters(shape):
    b, t, d, _ = shape
    torch.manual_seed(b * 100 + t * 10 + d)
    run(ScaleShift(d), torch.randn(b, t, d, dtype=torch.float64))


def test_group_norm_is_exact():
    run(nn.GroupNorm(2, 4), torch.randn(3, 4, 5, dtype=torch.float64))


@pytest.mark.parametrize("vocab,dim,length", [(6, 4, 3), (40, 4, 3), (5, 4, 8)])
def test_tied_embedding_and_head_cross_terms(vocab, dim, length):
    """One parameter used twice; (6, 4, 3) mixes a materialised head with a ghost embedding,
    (40, 4, 3) is ghost/ghost, (5, 4, 8) dense/dense."""

    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, dim)
            self.mix = nn.Linear(dim, dim)
            self.head = nn.Linear(dim, vocab, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            logits = self.head(torch.tanh(self.mix(self.embed(ids))))
            return torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids, reduction="none").mean(1)

    torch.manual_seed(vocab)
    model = TiedLM().double()
    ids = torch.randint(0, vocab, (3, length))
    config = DPConfig(noise_multiplier=0.0, max_grad_norm=0.3, expected_batch_size=3)
    engine = check_engine(model, [{"ids": ids}], lambda m, inputs: m(inputs["ids"]), config)
    assert list(engine.parameters) == ["embed.weight", "mix.weight", "mix.bias"]


def test_both_norm_methods_are_reached():
    """The shape threshold really switches between the two forms."""
    long = Outer(left=torch.randn(2, 16, 3), right=torch.randn(2, 16, 3), m=3, shape=torch.Size([3, 3]))
    short = Outer(left=torch.randn(2, 2, 30), right=torch.randn(2, 2, 30), m=30, shape=torch.Size([30, 30]))
    assert long.prefers_materialized() and not short.prefers_materialized()
    assert isinstance(long.materialize(), Dense)


def test_rms_norm_rule_ignores_hooks_and_partitioned_storage():
    """Under ZeRO-3 a weight's storage is partitioned away (numel 0, full shape in ds_shape) and
    the engine's forward hooks gather it: the rule must need neither."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from dpscale.layers.normalization import broadcast_scale_grads

    torch.manual_seed(3)
    x, g = torch.randn(3, 4, 6, dtype=torch.float64), torch.randn(3, 4, 6, dtype=torch.float64)
    full = LlamaRMSNorm(6).double()
    expected = broadcast_scale_grads(full, (x,), g, ("weight",))["weight"].grad
    oracle = torch.stack(
        [(g[i] * (x[i] * torch.rsqrt(x[i].pow(2).mean(-1, keepdim=True) + 1e-6))).sum(0) for i in range(3)]
    )
    assert torch.allclose(expected, oracle)

    partitioned = LlamaRMSNorm(6).double()
    partitioned.weight = nn.Parameter(torch.empty(0, dtype=torch.float64))
    partitioned.weight.ds_shape = torch.Size([6])

    def refuse(*_):
        raise AssertionError("the rule ran the module's hooks")

    partitioned.register_forward_pre_hook(refuse)
    got = broadcast_scale_grads(partitioned, (x,), g, ("weight",))["weight"].grad
    assert torch.allclose(got, oracle)
    assert partitioned.weight.numel() == 0
