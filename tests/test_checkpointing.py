"""Activation checkpointing (non-reentrant): tiny GPT-2 and Llama (tied embeddings) with Hugging
Face's checkpointing, and a model checkpointed in user code, against the one-example loop in
float64, two accumulated backwards; each call recorded once although the backward re-runs the
checkpointed forwards. The reentrant kind is refused (tests/test_refusals.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dpscale import DPConfig, PrivacyEngine
from dpscale.losses import token_mean_losses
from tests.oracle import check_engine
from tests.test_models import gpt2, llama

CONFIGS = {
    "flat-abadi": {"max_grad_norm": 1.0, "expected_batch_size": 4.0},
    "flat-automatic": {"max_grad_norm": 1.0, "expected_batch_size": 4.0, "clip_fn": "automatic",
                       "automatic_gamma": 0.01},
    "per_layer-abadi": {"max_grad_norm": 0.5, "expected_batch_size": 5.0, "clipping": "per_layer"},
    "per_layer-automatic": {"max_grad_norm": 0.5, "expected_batch_size": 5.0, "clipping": "per_layer",
                            "clip_fn": "automatic"},
}


def hugging_face_case(name: str):
    model, loss_fn, batch = gpt2(True) if name == "gpt2-tied" else llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, loss_fn, batch


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", ["gpt2-tied", "llama-tied"])
def test_hugging_face_checkpointing_matches_single_example_loop(name, config):
    model, loss_fn, batch = hugging_face_case(name)
    check_engine(model, [batch(1), batch(2)], loss_fn, DPConfig(noise_multiplier=0.0, **CONFIGS[config]))


@pytest.mark.parametrize("name", ["gpt2-tied", "llama-tied"])
def test_each_call_is_recorded_once_though_the_backward_reruns_it(name):
    model, loss_fn, batch = hugging_face_case(name)
    model.gradient_checkpointing_disable()
    engine = PrivacyEngine(model, DPConfig(noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=3.0),
                           optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    loss_fn(model, batch(1))
    plain = [(call.qualname, len(call.edges)) for call in engine._tape.take()]
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layer = model.transformer.h[0].attn if name == "gpt2-tied" else model.model.layers[0].self_attn
    runs = []
    handle = layer.register_forward_hook(lambda *_: runs.append(torch.is_grad_enabled()))
    losses = loss_fn(model, batch(1))
    assert [(call.qualname, len(call.edges)) for call in engine._tape.calls] == plain
    engine.backward(losses)
    handle.remove()
    assert runs == [True, True]  # the forward, then its recomputation inside engine.backward
    assert engine._tape.calls == []  # what the recomputation recorded was thrown away


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, h):
        return h + self.down(torch.nn.functional.gelu(self.up(self.norm(h))))


class UserCheckpointed(nn.Module):
    """Checkpoints in its own forward; the first region holds a broadcast call (positions [1, T],
    whose output the tape expands to the batch), which the recomputation must expand again."""

    def __init__(self, use_reentrant: bool = False, vocab: int = 11, width: int = 6, length: int = 5) -> None:
        super().__init__()
        self.use_reentrant = use_reentrant
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(length, width)
        self.blocks = nn.ModuleList([Block(width), Block(width)])
        self.head = nn.Linear(width, vocab)

    def embed_and_first_block(self, ids):
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        return self.blocks[0](self.tokens(ids) * self.positions(positions).sigmoid())

    def forward(self, ids):
        h = checkpoint(self.embed_and_first_block, ids, use_reentrant=self.use_reentrant)
        h = checkpoint(self.blocks[1], h, use_reentrant=self.use_reentrant)
        return self.head(h)


def user_case(use_reentrant: bool = False):
    torch.manual_seed(0)
    model = UserCheckpointed(use_reentrant).double()

    def loss_fn(m, inputs):
        return token_mean_losses(m(inputs["ids"]), inputs["ids"])

    def batch(seed):
        return {"ids": torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(seed))}

    return model, loss_fn, batch


@pytest.mark.parametrize("config", ["flat-abadi", "per_layer-automatic"])
def test_checkpoint_in_user_code_matches_single_example_loop(config):
    model, loss_fn, batch = user_case()
    check_engine(model, [batch(1), batch(2)], loss_fn, DPConfig(noise_multiplier=0.0, **CONFIGS[config]))


def test_checkpoint_wrapper_changes_neither_names_nor_noise():
    """torch's checkpoint_wrapper (Accelerate's FSDP activation checkpointing, torchtune) inserts
    ``_checkpoint_wrapped_module`` into every parameter name beneath it. The engine keys the noise
    and the clipping groups by name, so it drops that segment: with sigma > 0 and one key, a step
    of the wrapped model equals the plain model's bit for bit, and a per-group config written with
    the plain names applies."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from dpscale.noise import NoiseKey

    key = NoiseKey(bytes(range(32)))
    results = []
    for wrapped in (False, True):
        model, loss_fn, batch = user_case()
        if wrapped:
            model.blocks[1] = checkpoint_wrapper(model.blocks[1])
            assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_parameters())
        groups = [["head.weight", "head.bias"], [n for n in ("tokens.weight", "positions.weight")]]
        rest = [n for n in (f"blocks.{i}.{layer}.{kind}" for i in (0, 1) for layer in ("norm", "up", "down")
                            for kind in ("weight", "bias"))]
        config = DPConfig(max_grad_norm=0.5, expected_batch_size=3.0, noise_multiplier=1.0, clipping=[*groups, rest])
        engine = PrivacyEngine(model, config, noise_key=key)
        optimizer = engine.attach_optimizer(torch.optim.SGD(engine.parameters.values(), lr=1.0))
        for seed in (1, 2):
            engine.backward(loss_fn(model, batch(seed)))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        results.append({n: p.detach().clone() for n, p in engine.parameters.items()})
        engine.detach()
    plain, wrapped = results
    assert list(plain) == list(wrapped)
    for name, value in plain.items():
        assert torch.equal(value, wrapped[name]), name
