"""DP-BiTFiT keeps no activation: a layer whose only trainable parameter is its bias (Linear,
GPT-2 Conv1D, convolutions, LayerNorm, GroupNorm, InstanceNorm) is recorded without its input,
and its per-example bias gradients (the output gradient summed over positions) stay exact
against the one-example float64 loop."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

import dpscale
from tests.oracle import check_engine


def _bias_only(model: nn.Module) -> nn.Module:
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("bias"))
    return model


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(3, 6, 3, padding=1)
        self.group = nn.GroupNorm(2, 6)
        self.conv2 = nn.Conv2d(6, 4, 3, padding="same")
        self.instance = nn.InstanceNorm2d(4, affine=True)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # x: [B, 3, L]
        h = torch.tanh(self.group(self.conv1(x)))  # [B, 6, L]
        h = h[..., None].expand(*h.shape, 2)  # [B, 6, L, 2]
        h = torch.tanh(self.instance(self.conv2(h)))  # [B, 4, L, 2]
        return self.head(self.norm(h.mean((2, 3))))


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def _gpt2_losses(model, inputs):
    logits = model(input_ids=inputs["input_ids"]).logits[:, :-1]
    labels = inputs["input_ids"][:, 1:]
    return nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(1)


def _conv_losses(model, inputs):
    return nn.functional.cross_entropy(model(inputs["x"]), inputs["y"], reduction="none")


def _cases():
    torch.manual_seed(0)
    conv = _bias_only(ConvNet()).double()
    conv_batches = [{"x": torch.randn(4, 3, 5, dtype=torch.float64), "y": torch.randint(0, 3, (4,))} for _ in range(2)]
    gpt2 = _bias_only(_gpt2()).double()
    gpt2_batches = [{"input_ids": torch.randint(0, 40, (3, 6))} for _ in range(2)]
    return {"convolutions and norms": (conv, conv_batches, _conv_losses),
            "gpt2 conv1d and layer norms": (gpt2, gpt2_batches, _gpt2_losses)}


@pytest.mark.parametrize("case", ["convolutions and norms", "gpt2 conv1d and layer norms"])
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_bias_only_layers_are_exact(case, clipping):
    model, batches, losses_of = _cases()[case]
    config = dpscale.DPConfig(max_grad_norm=0.05, expected_batch_size=4, noise_multiplier=0.0, clipping=clipping)
    engine = check_engine(model, batches, losses_of, config)
    assert set(engine.parameters) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith("bias") for n in engine.parameters)


@pytest.mark.parametrize("case", ["convolutions and norms", "gpt2 conv1d and layer norms"])
def test_bias_only_calls_are_recorded_without_inputs(case):
    model, batches, losses_of = _cases()[case]
    engine = dpscale.PrivacyEngine(
        model, dpscale.DPConfig(max_grad_norm=1.0, expected_batch_size=4, noise_multiplier=0.0)
    )
    losses_of(model, batches[0])
    calls = engine._tape.take()
    assert calls, "nothing was recorded"
    assert all(call.inputs == () for call in calls), [call.qualname for call in calls if call.inputs != ()]
    engine.detach()


def test_a_layer_whose_weight_also_trains_keeps_its_input():
    """The control: the same layers with weights trainable do record their inputs."""
    model, batches, losses_of = _cases()["convolutions and norms"]
    for p in model.parameters():
        p.requires_grad_(True)
    engine = dpscale.PrivacyEngine(
        model, dpscale.DPConfig(max_grad_norm=1.0, expected_batch_size=4, noise_multiplier=0.0)
    )
    losses_of(model, batches[0])
    calls = engine._tape.take()
    assert calls and all(len(call.inputs) >= 1 for call in calls)
    engine.detach()


def test_bias_only_with_checkpointing_is_exact_and_replays_record_nothing_whole():
    """Checkpointing stops each replay once it has rebuilt the tensors it needs, so the last calls
    of a region are cut short by an exception: they must record nothing (a whole-call record
    would hold their inputs until the backward ends)."""
    model, batches, losses_of = _cases()["gpt2 conv1d and layer norms"]
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    config = dpscale.DPConfig(max_grad_norm=0.05, expected_batch_size=4, noise_multiplier=0.0)
    check_engine(model, batches, losses_of, config)

    engine = dpscale.PrivacyEngine(model, config, optimizer=torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.0))
    tape = engine._tape
    replayed = []
    real_replaying = tape.replaying

    import contextlib

    @contextlib.contextmanager
    def watching():
        with real_replaying():
            yield
            replayed.extend(tape.calls)

    tape.replaying = watching
    engine.backward(losses_of(model, batches[0]))
    assert replayed, "no region was replayed: the model was not checkpointed"
    whole = [call.qualname for call in replayed if call.rule.whole_call]
    assert not whole, f"calls cut short were recorded whole: {whole}"
    engine.detach()


def test_a_call_whose_forward_raises_records_nothing():
    class RaisingLinear(nn.Linear):  # its own forward: the torch.func fallback would read it whole
        def forward(self, x):
            super().forward(x)
            raise KeyError("stop")

    model = nn.Sequential(nn.Linear(3, 3), RaisingLinear(3, 3))
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("bias"))
    engine = dpscale.PrivacyEngine(
        model, dpscale.DPConfig(max_grad_norm=1.0, expected_batch_size=2, noise_multiplier=0.0)
    )
    with pytest.raises(KeyError):
        model(torch.randn(2, 3))
    recorded = {call.qualname: call.rule.name for call in engine._tape.take()}
    assert recorded == {"0": "linear"}, recorded
    engine.detach()
