"""torch.nn's attention, recurrent, group/instance norm and bag-of-embeddings layers, each against the
one-example loop in float64 (tests/oracle.py), with fuzzed shapes, both batch layouts, flat and
per-layer clipping, Abadi and automatic clipping; then tiny models built from them; then what is
refused, and that the message says what to do.

Shapes are drawn by hypothesis (derandomized) and the data is seeded from them, so a failure is a
property of the code, never of the draw."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dpscale import DPConfig, PrivacyEngine, UnsupportedModuleError
from tests.oracle import check_engine

fuzz = settings(derandomize=True, max_examples=60, deadline=None)
CLIPPING = st.sampled_from(
    [("flat", "abadi"), ("per_layer", "automatic"), ("flat", "automatic"), ("per_layer", "abadi")]
)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def config(batch: int, clipping=("flat", "abadi"), clip: float = 0.5) -> DPConfig:
    mode, clip_fn = clipping
    return DPConfig(
        noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=batch + 1, clipping=mode, clip_fn=clip_fn
    )


def readout(y: torch.Tensor, seed: int) -> torch.Tensor:
    """One loss per example (batch first), nonlinear in ``y``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(y.shape[1:], generator=g, dtype=y.dtype)
    return torch.tanh(y * w).flatten(1).sum(1) + 0.1 * (y.flatten(1) ** 2).sum(1)


def randomize(module: nn.Module) -> nn.Module:
    """Biases and norm weights off their defaults (zeros and ones hide mistakes)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return module.double()


# attention ---------------------------------------------------------------------------------------


class Attend(nn.Module):
    """Batch-first inputs in, one loss per example out, whatever the layer's own layout."""

    def __init__(self, attn: nn.MultiheadAttention, masks: str, need_weights: bool, self_attention: bool) -> None:
        super().__init__()
        self.attn, self.masks, self.need_weights, self.self_attention = attn, masks, need_weights, self_attention

    def forward(self, query, key, value, padding, mask):
        attn = self.attn
        if self.self_attention:
            key = value = query
        if not attn.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
            if self.self_attention:
                key = value = query
        kwargs = {"need_weights": self.need_weights, "average_attn_weights": False}
        if "padding" in self.masks:
            kwargs["key_padding_mask"] = padding
        if "2d" in self.masks:  # shared by the batch: a fixed mask, not an input the oracle splits
            g = torch.Generator().manual_seed(3)
            shared = torch.randn(mask.shape[1:], generator=g, dtype=mask.dtype)
            kwargs["attn_mask"] = shared.index_fill(1, torch.tensor([0]), 0.0)
        if "3d" in self.masks:
            kwargs["attn_mask"] = mask.repeat_interleave(attn.num_heads, 0) > 1.0  # per (example, head)
        if "causal" in self.masks:
            tgt_len = query.shape[1 if attn.batch_first else 0]
            kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(tgt_len, dtype=query.dtype)
            kwargs["is_causal"] = True
        out, weights = attn(query, key, value, **kwargs)
        out = out if attn.batch_first else out.transpose(0, 1)
        loss = readout(out, 1)
        if self.need_weights:
            loss = loss + readout(weights, 2)
        return loss


@fuzz
@given(
    st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), st.sampled_from([1, 2]), st.booleans(), st.booleans(),
    st.sampled_from(["self", "cross", "cross-kdim"]),
    st.sampled_from(["", "padding", "2d", "3d", "padding+2d", "causal"]), st.booleans(), CLIPPING,
)
def test_multihead_attention(b, tgt, src, heads, batch_first, bias, kind, masks, need_weights, clipping):
    if kind == "self" or masks == "causal":
        src = tgt
    embed = 2 * heads
    kdim = 3 if kind == "cross-kdim" else None
    torch.manual_seed(b * 100 + tgt * 10 + src)
    attn = nn.MultiheadAttention(embed, heads, bias=bias, batch_first=batch_first, kdim=kdim, vdim=kdim)
    model = Attend(randomize(attn), masks, need_weights, self_attention=kind == "self")
    query = torch.randn(b, tgt, embed, dtype=torch.float64)
    key = torch.randn(b, src, kdim or embed, dtype=torch.float64)
    value = torch.randn(b, src, kdim or embed, dtype=torch.float64)
    padding = torch.zeros(b, src, dtype=torch.bool)
    padding[:, src - 1] = src > 1  # never a fully masked row
    mask = torch.randn(b, tgt, src, dtype=torch.float64)
    mask[:, :, 0] = 0.0  # the first key is always visible
    inputs = {"query": query, "key": key, "value": value, "padding": padding, "mask": mask}
    engine = check_engine(model, [inputs], lambda m, i: m(**i), config(b, clipping))
    assert dict(engine.rule_names) == {"attn": "multihead_attention"}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("extra", ["add_bias_kv", "add_zero_attn", "both"])
def test_multihead_attention_appended_keys(batch_first, extra):
    attn = nn.MultiheadAttention(4, 2, batch_first=batch_first, add_bias_kv=extra != "add_zero_attn",
                                 add_zero_attn=extra != "add_bias_kv")
    model = Attend(randomize(attn), "padding", need_weights=False, self_attention=False)
    b, tgt, src = 3, 2, 4
    inputs = {
        "query": torch.randn(b, tgt, 4, dtype=torch.float64), "key": torch.randn(b, src, 4, dtype=torch.float64),
        "value": torch.randn(b, src, 4, dtype=torch.float64), "padding": torch.rand(b, src) > 0.6,
        "mask": torch.zeros(b, tgt, src, dtype=torch.float64),
    }
    check_engine(model, [inputs], lambda m, i: m(**i), config(b, ("per_layer", "abadi")))


def test_only_the_out_projection_trains():
    attn = randomize(nn.MultiheadAttention(4, 2, batch_first=True))
    attn.in_proj_weight.requires_grad_(False)
    attn.in_proj_bias.requires_grad_(False)
    model = Attend(attn, "", need_weights=False, self_attention=True)
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    inputs = {"query": x, "key": x, "value": x, "padding": None, "mask": None}
    engine = check_engine(model, [inputs], lambda m, i: m(**i), config(3))
    assert list(engine.parameters) == ["attn.out_proj.weight", "attn.out_proj.bias"]


# recurrent layers --------------------------------------------------------------------------------


class Recur(nn.Module):
    def __init__(self, rnn: nn.RNNBase, with_state: bool) -> None:
        super().__init__()
        self.rnn, self.with_state = rnn, with_state

    def forward(self, x, h0, c0):
        rnn = self.rnn
        x = x if rnn.batch_first else x.transpose(0, 1)
        hx = None
        if self.with_state:
            hx = (
                (h0.transpose(0, 1).contiguous(), c0.transpose(0, 1).contiguous()) if isinstance(rnn, nn.LSTM)
                else h0.transpose(0, 1).contiguous()
            )
        out, state = rnn(x, hx)
        out = out if rnn.batch_first else out.transpose(0, 1)
        states = state if isinstance(state, tuple) else (state,)
        return readout(out, 1) + sum(readout(s.transpose(0, 1), 2 + i) for i, s in enumerate(states))


@fuzz
@given(
    st.sampled_from(["LSTM", "GRU", "RNN_TANH", "RNN_RELU", "LSTM-proj"]), st.integers(1, 3), st.integers(1, 4),
    st.integers(1, 3), st.integers(1, 2), st.booleans(), st.booleans(), st.booleans(), st.booleans(), CLIPPING,
)
def test_recurrent(kind, b, steps, d, layers, bidirectional, batch_first, bias, with_state, clipping):
    torch.manual_seed(b * 100 + steps * 10 + d)
    hidden, proj = 3, (2 if kind == "LSTM-proj" else 0)
    common = {"num_layers": layers, "bidirectional": bidirectional, "batch_first": batch_first, "bias": bias}
    if kind.startswith("LSTM"):
        rnn = nn.LSTM(d, hidden, proj_size=proj, **common)
    elif kind == "GRU":
        rnn = nn.GRU(d, hidden, **common)
    else:
        rnn = nn.RNN(d, hidden, nonlinearity="tanh" if kind == "RNN_TANH" else "relu", **common)
    directions = 2 if bidirectional else 1
    inputs = {
        "x": torch.randn(b, steps, d, dtype=torch.float64),
        "h0": torch.randn(b, layers * directions, proj or hidden, dtype=torch.float64),
        "c0": torch.randn(b, layers * directions, hidden, dtype=torch.float64),
    }
    model = Recur(randomize(rnn), with_state)
    engine = check_engine(model, [inputs], lambda m, i: m(**i), config(b, clipping))
    assert dict(engine.rule_names) == {"rnn": "recurrent"}


# group and instance norm ---------------------------------------------------------------------------


class Readout(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return readout(self.layer(x), 1)


@fuzz
@given(st.integers(1, 4), st.sampled_from([(1, 2), (2, 4), (3, 6), (4, 4)]), st.integers(1, 5), st.booleans(), CLIPPING)
def test_group_norm(b, groups_channels, length, image, clipping):
    groups, channels = groups_channels
    torch.manual_seed(b * 10 + length)
    shape = (b, channels, length, 2) if image else (b, channels, length + 1)
    engine = check_engine(Readout(randomize(nn.GroupNorm(groups, channels))),
                          [{"x": torch.randn(*shape, dtype=torch.float64)}], lambda m, i: m(i["x"]),
                          config(b, clipping))
    assert dict(engine.rule_names) == {"layer": "group_norm"}


@fuzz
@given(st.integers(1, 4), st.integers(1, 4), st.integers(2, 5), st.booleans(), CLIPPING)
def test_instance_norm(b, channels, length, image, clipping):
    torch.manual_seed(b * 10 + length)
    layer = nn.InstanceNorm2d(channels, affine=True) if image else nn.InstanceNorm1d(channels, affine=True)
    x = (
        torch.randn(b, channels, length, 3, dtype=torch.float64) if image
        else torch.randn(b, channels, length, dtype=torch.float64)
    )
    if image and length == 2:
        layer, x = nn.InstanceNorm3d(channels, affine=True), x[..., None].expand(-1, -1, -1, -1, 2) + 0.1 * x[..., None]
    engine = check_engine(Readout(randomize(layer)), [{"x": x}], lambda m, i: m(i["x"]), config(b, clipping))
    assert dict(engine.rule_names) == {"layer": "instance_norm"}


def test_instance_norm_with_frozen_running_statistics_in_eval_mode():
    layer = randomize(nn.InstanceNorm1d(3, affine=True, track_running_stats=True))
    with torch.no_grad():
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2.0)
    model = Readout(layer).eval()
    check_engine(model, [{"x": torch.randn(4, 3, 5, dtype=torch.float64)}], lambda m, i: m(i["x"]), config(4))


# bags of embeddings --------------------------------------------------------------------------------


class Bag(nn.Module):
    def __init__(self, bag: nn.EmbeddingBag) -> None:
        super().__init__()
        self.bag = bag

    def forward(self, ids, weights=None):
        return readout(self.bag(ids, per_sample_weights=weights), 1)


@fuzz
@given(st.integers(1, 4), st.integers(1, 6), st.integers(2, 30), st.integers(1, 4),
       st.sampled_from(["sum", "mean", "max"]), st.sampled_from([None, 0]), st.booleans(), CLIPPING)
def test_embedding_bag(b, n, vocab, dim, mode, padding_idx, sample_weights, clipping):
    torch.manual_seed(vocab * 10 + n)
    ids = torch.randint(0, vocab, (b, n))
    if padding_idx is not None:
        ids[0, 0] = padding_idx
        if n > 1:
            ids[-1, :] = padding_idx  # an all-padding bag
    inputs = {"ids": ids}
    if sample_weights and mode == "sum":
        inputs["weights"] = torch.randn(b, n, dtype=torch.float64)
    bag = randomize(nn.EmbeddingBag(vocab, dim, mode=mode, padding_idx=padding_idx))
    engine = check_engine(Bag(bag), [inputs], lambda m, i: m(**i), config(b, clipping))
    assert dict(engine.rule_names) == {"bag": "embedding_bag"}


# tiny models ---------------------------------------------------------------------------------------


class EncoderClassifier(nn.Module):
    def __init__(self, batch_first: bool, vocab: int = 11, d: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(vocab, d, padding_idx=0)
        layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=12, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, ids, labels):
        h = self.embed(ids)
        padding = ids == 0
        h = self.encoder(h if self.batch_first else h.transpose(0, 1), src_key_padding_mask=padding)
        h = h if self.batch_first else h.transpose(0, 1)
        pooled = h.masked_fill(padding[:, :, None], 0).sum(1) / (~padding).sum(1, keepdim=True)
        return nn.functional.cross_entropy(self.head(pooled), labels, reduction="none")


class Seq2Seq(nn.Module):
    """A decoder layer (causal self-attention and cross-attention) over an encoder's memory."""

    def __init__(self, batch_first: bool, vocab: int = 9, d: int = 4) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(vocab, d)
        self.encoder = nn.TransformerEncoderLayer(d, 2, dim_feedforward=6, dropout=0.0, batch_first=batch_first)
        self.decoder = nn.TransformerDecoderLayer(d, 2, dim_feedforward=6, dropout=0.0, batch_first=batch_first,
                                                  norm_first=True)
        self.head = nn.Linear(d, vocab)

    def forward(self, src, tgt):
        def layout(x):
            return x if self.batch_first else x.transpose(0, 1)

        memory = self.encoder(layout(self.embed(src)))
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], dtype=memory.dtype)
        h = layout(self.decoder(layout(self.embed(tgt)), memory, tgt_mask=causal, tgt_is_causal=True))
        return nn.functional.cross_entropy(self.head(h).transpose(1, 2), tgt, reduction="none").mean(1)


class RecurrentClassifier(nn.Module):
    def __init__(self, cell: type, batch_first: bool, vocab: int = 10, d: int = 4, hidden: int = 3) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(vocab, d)
        self.rnn = cell(d, hidden, num_layers=2, bidirectional=True, batch_first=batch_first)
        self.head = nn.Linear(2 * hidden, 2)

    def forward(self, ids, labels):
        h = self.embed(ids)
        out, _ = self.rnn(h if self.batch_first else h.transpose(0, 1))
        out = out if self.batch_first else out.transpose(0, 1)
        return nn.functional.cross_entropy(self.head(out.mean(1)), labels, reduction="none")


def _token_batches(vocab: int, shapes, classes: int, pad: bool):
    batches = []
    for b, t in shapes:
        ids = torch.randint(1, vocab, (b, t))
        if pad:
            ids[0, t - 1 :] = 0  # one padded position
        batches.append({"ids": ids, "labels": torch.randint(0, classes, (b,))})
    return batches


@pytest.mark.parametrize("clipping", [("flat", "abadi"), ("per_layer", "automatic")])
@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_classifier(batch_first, clipping):
    model = randomize(EncoderClassifier(batch_first))
    batches = _token_batches(11, [(3, 5), (2, 4)], 3, pad=True)  # two accumulated backward calls
    engine = check_engine(model, batches, lambda m, i: m(**i), config(5, clipping, clip=0.3))
    rules = set(engine.rule_names.values())
    assert "multihead_attention" in rules and "torch_func" not in rules
    assert not any(name.endswith("out_proj") for name in engine.rule_names)


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_decoder_layer(batch_first):
    model = randomize(Seq2Seq(batch_first))
    batch = {"src": torch.randint(0, 9, (3, 4)), "tgt": torch.randint(0, 9, (3, 3))}
    check_engine(model, [batch], lambda m, i: m(**i), config(3, ("flat", "automatic"), clip=0.3))


@pytest.mark.parametrize("clipping", [("flat", "abadi"), ("per_layer", "automatic")])
@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("batch_first", [True, False])
def test_bidirectional_recurrent_classifier(cell, batch_first, clipping):
    model = randomize(RecurrentClassifier(cell, batch_first))
    batches = _token_batches(10, [(3, 4), (2, 3)], 2, pad=False)
    engine = check_engine(model, batches, lambda m, i: m(**i), config(5, clipping, clip=0.3))
    assert engine.rule_names["rnn"] == "recurrent"


# refusals ------------------------------------------------------------------------------------------


CONFIG = DPConfig(noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4)


def test_attention_dropout_in_training_is_refused_with_the_fix():
    layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, batch_first=True)  # dropout 0.1 by default
    with pytest.raises(UnsupportedModuleError, match=r"self_attn\.dropout = 0\.0"):
        PrivacyEngine(layer, CONFIG)
    layer.self_attn.dropout = 0.0  # the layer's other dropouts are fine: they sit outside every rule
    engine = PrivacyEngine(layer, CONFIG, optimizer=torch.optim.SGD(layer.parameters(), lr=0.0))
    engine.backward(layer(torch.randn(4, 3, 4)).pow(2).sum((1, 2)))
    assert engine.last_norms.shape == (4,)
    layer.self_attn.dropout = 0.2  # switched on after the engine was built: refused at the backward
    with pytest.raises(UnsupportedModuleError, match="dropout"):
        engine.backward(layer(torch.randn(4, 3, 4)).pow(2).sum((1, 2)))


def test_attention_in_eval_mode_may_keep_its_dropout():
    attn = nn.MultiheadAttention(4, 2, dropout=0.5, batch_first=True).double().eval()
    model = Attend(attn, "", need_weights=False, self_attention=True)
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    check_engine(model, [{"query": x, "key": x, "value": x, "padding": None, "mask": None}], lambda m, i: m(**i),
                 config(3))


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN])
def test_recurrent_dropout_in_training_is_refused_with_the_fix(cell):
    with pytest.raises(UnsupportedModuleError, match=r"dropout=0.*nn\.Dropout between"):
        PrivacyEngine(cell(3, 4, num_layers=2, dropout=0.2), CONFIG)
    PrivacyEngine(cell(3, 4, num_layers=2, dropout=0.2).eval(), CONFIG)
    PrivacyEngine(cell(3, 4, num_layers=1), CONFIG)


def test_packed_sequences_are_refused():
    from torch.nn.utils.rnn import pack_padded_sequence

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(3, 4, batch_first=True)

        def forward(self, x):
            packed = pack_padded_sequence(x, torch.tensor([3, 2]), batch_first=True)
            return self.rnn(packed)[1][0].sum(1)

    model = Packed()
    PrivacyEngine(model, CONFIG, optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    with pytest.raises(UnsupportedModuleError, match="PackedSequence.*pad_sequence"):
        model(torch.randn(2, 3, 3))


def test_a_layer_called_on_part_of_the_batch_is_refused():
    class FirstOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(3, 4)

        def forward(self, x):  # batch_first data given to a batch_first=False LSTM: dim 1 is time
            return self.rnn(x)[0].sum((1, 2))

    model = FirstOnly()
    PrivacyEngine(model, CONFIG, optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    with pytest.raises(UnsupportedModuleError, match="'rnn' .LSTM. was called on a batch of 5 examples.*carry 4"):
        model(torch.randn(4, 5, 3))


def test_embedding_bag_with_offsets_is_refused_with_the_fix():
    class Tutorial(nn.Module):  # PyTorch's text classification tutorial
        def __init__(self):
            super().__init__()
            self.bag = nn.EmbeddingBag(10, 3, mode="mean")

        def forward(self, text, offsets):
            return self.bag(text, offsets).sum(1)

    model = Tutorial()
    PrivacyEngine(model, CONFIG, optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    with pytest.raises(UnsupportedModuleError, match=r"2-D \[batch, n\].*padding_idx"):
        model(torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 2]))


@pytest.mark.parametrize("layer", [nn.InstanceNorm1d(3, affine=True, track_running_stats=True),
                                   nn.InstanceNorm2d(3, affine=True, track_running_stats=True)])
def test_instance_norm_tracking_statistics_in_training_is_refused(layer):
    with pytest.raises(UnsupportedModuleError, match="track_running_stats=False"):
        PrivacyEngine(layer, CONFIG)


@pytest.mark.parametrize("argument", ["scale_grad_by_freq", "max_norm", "sparse"])
def test_embedding_bag_options_that_cannot_be_exact_are_refused(argument):
    value = 1.0 if argument == "max_norm" else True
    with pytest.raises(UnsupportedModuleError, match=rf"nn\.EmbeddingBag\({argument}"):
        PrivacyEngine(nn.EmbeddingBag(5, 3, **{argument: value}), CONFIG)
