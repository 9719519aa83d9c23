"""Privacy failures are loud: bad configs, unsupported layers, wrong losses and silent parameter
drops raise our own errors before a step is taken."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

import dpscale
from dpscale import (
    ConfigError,
    DPConfig,
    LossShapeError,
    NoTrainableParametersError,
    PrivacyEngine,
    TapeError,
    UnsupportedModuleError,
)

CONFIG = DPConfig(noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


BASE = {"max_grad_norm": 1.0, "expected_batch_size": 4, "noise_multiplier": 0.0}


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"max_grad_norm": float("inf")}, "max_grad_norm"),
        ({"expected_batch_size": 0}, "expected_batch_size"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"noise_multiplier": None}, "exactly one"),
        ({"target_epsilon": 3.0}, "exactly one"),
        ({"noise_multiplier": None, "target_epsilon": 3.0, "steps": 10}, "dataset_size"),
        ({"noise_multiplier": None, "target_epsilon": 3.0, "dataset_size": 100}, "steps or epochs"),
        ({"noise_multiplier": None, "target_epsilon": 3.0, "dataset_size": 100, "steps": 5, "epochs": 1.0},
         "steps or epochs"),
        ({"noise_multiplier": None, "target_epsilon": -3.0, "dataset_size": 100, "steps": 5}, "target_epsilon"),
        ({"dataset_size": 100, "target_delta": 0.01}, "1/N"),
        ({"dataset_size": 2}, "at most 1"),
        ({"accountant": "moments"}, "accountant"),
        ({"sampling": "fixed"}, "sampling"),
        ({"clip_fn": "tanh"}, "clip_fn"),
        ({"clip_fn": "automatic", "automatic_gamma": 0.0}, "gamma"),
        ({"clipping": "per_token"}, "clipping"),
        ({"clipping": [[]]}, "groups"),
        ({"clipping": [["a"], ["b"]], "group_max_grad_norms": [1.0, 1.0]}, "add up"),
    ],
)
def test_invalid_configs_are_refused(changes, match):
    with pytest.raises(ConfigError, match=match):
        DPConfig(**{**BASE, **changes})


def bound(model, config=CONFIG):
    """An engine ready for backward: an optimizer attached (lr 0: these tests read gradients)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return PrivacyEngine(model, config, optimizer=torch.optim.SGD(trainable, lr=0.0))


def test_groups_must_cover_every_trainable_parameter_once():
    with pytest.raises(ConfigError, match="not covered"):
        PrivacyEngine(
            mlp(), DPConfig(noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4, clipping=[["0.*"]])
        )
    with pytest.raises(ConfigError, match="more than one"):
        PrivacyEngine(mlp(), DPConfig(noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4,
                                      clipping=[["0.*", "2.*"], ["2.bias"]]))
    with pytest.raises(ConfigError, match="matches no"):
        PrivacyEngine(mlp(), DPConfig(noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4,
                                      clipping=[["0.*", "2.*"], ["nope"]]))


def test_group_thresholds_split_the_sensitivity():
    engine = PrivacyEngine(
        mlp(), DPConfig(noise_multiplier=0.0, max_grad_norm=2.0, expected_batch_size=4, clipping="per_layer")
    )
    assert len(engine.clipping.groups) == 4
    assert engine.clipping.sensitivity == pytest.approx(2.0)


def test_losses_must_be_one_per_example():
    model = mlp()
    engine = bound(model)
    x = torch.randn(4, 4)
    with pytest.raises(LossShapeError, match="one loss per example"):
        engine.backward(model(x).sum())
    with pytest.raises(LossShapeError, match="3 losses"):
        engine.backward(model(x).sum(1)[:3])
    with pytest.raises(LossShapeError):
        engine.backward([1.0, 2.0])
    with torch.no_grad():
        detached = model(x).sum(1)
    with pytest.raises((LossShapeError, TapeError)):
        engine.backward(detached)


def test_losses_of_an_earlier_forward_are_refused():
    model = mlp()
    engine = bound(model)
    stale = model(torch.randn(4, 4)).sum(1)
    model(torch.randn(4, 4))  # a second forward replaces the tape
    with pytest.raises(TapeError, match="last forward"):
        engine.backward(stale)


def test_backward_without_forward_is_refused():
    engine = bound(mlp())
    with pytest.raises(TapeError):
        engine.backward(torch.zeros(4, requires_grad=True))


def test_no_trainable_parameter_is_refused():
    model = mlp().requires_grad_(False)
    with pytest.raises(NoTrainableParametersError):
        PrivacyEngine(model, CONFIG)


def test_batch_norm_in_training_mode_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(UnsupportedModuleError, match="BatchNorm"):
        PrivacyEngine(model, CONFIG)
    model.eval()
    engine = PrivacyEngine(model, CONFIG)
    model.train()
    with pytest.raises(UnsupportedModuleError, match="training mode"):
        model(torch.randn(4, 4))
    engine.detach()


@pytest.mark.parametrize("kwargs", [{"scale_grad_by_freq": True}, {"max_norm": 1.0}, {"sparse": True}])
def test_embedding_options_that_break_per_example_gradients(kwargs):
    with pytest.raises(UnsupportedModuleError):
        PrivacyEngine(nn.Embedding(10, 4, **kwargs), CONFIG)


def test_parameter_used_outside_its_module_is_refused():
    class HiddenUse(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(x @ self.proj.weight.T)  # proj's forward is never called

    model = HiddenUse()
    engine = bound(model)
    with pytest.raises(UnsupportedModuleError, match="outside the forward"):
        engine.backward(model(torch.randn(4, 4)).sum(1))


def test_random_ops_in_a_fallback_module_are_refused():
    class NoisyScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return torch.nn.functional.dropout(x * self.scale, p=0.5, training=True)

    model = NoisyScale()
    engine = bound(model)
    with pytest.raises(UnsupportedModuleError, match="random"):
        engine.backward(model(torch.randn(4, 4)).sum(1))


@pytest.mark.parametrize("where", ["hugging_face", "user_code"])
def test_reentrant_checkpointing_is_refused_before_any_gradient(where):
    """Non-reentrant checkpointing is exact (tests/test_checkpointing.py); the reentrant kind
    back-propagates in a nested backward of its own, which would write non-private gradients."""
    if where == "hugging_face":
        cfg = transformers.GPT2Config(vocab_size=20, n_positions=8, n_embd=8, n_layer=1, n_head=2)
        model = transformers.GPT2LMHeadModel(cfg).train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        engine = bound(model)  # only the backward sees which kind the layers use

        def forward():
            return model(input_ids=torch.randint(0, 20, (4, 5))).logits.sum((1, 2))
    else:
        model = mlp()
        engine = bound(model)

        def forward():
            hidden = torch.tanh(model[0](torch.randn(4, 4)))
            return torch.utils.checkpoint.checkpoint(model[2], hidden, use_reentrant=True).sum(1)
    with pytest.raises(UnsupportedModuleError, match="use_reentrant=False"):
        engine.backward(forward())
    assert all(p.grad is None for p in model.parameters())


def test_frozen_parameters_cost_nothing():
    """No hooks on fully frozen modules, no recorded activations, no gradient."""
    model = mlp()
    model[0].requires_grad_(False)
    engine = bound(model)
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks
    out = model(torch.randn(4, 4))
    assert [call.qualname for call in engine._tape.calls] == ["2"]
    engine.backward(out.sum(1))
    assert set(engine.clipped_sums()) == {"2.weight", "2.bias"}
    assert all(p.grad is None for p in model.parameters())


def test_detach_leaves_the_model_as_found():
    model = mlp()
    before = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    engine = PrivacyEngine(model, CONFIG)
    engine.detach()
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == before


def test_two_engines_coexist_on_two_models():
    a, b = mlp(), mlp()
    ea, eb = bound(a), bound(b, DPConfig(noise_multiplier=0.0, max_grad_norm=0.01, expected_batch_size=4))
    x = torch.randn(4, 4)
    ea.backward(a(x).sum(1))
    eb.backward(b(x).sum(1))
    assert torch.allclose(ea.last_norms, eb.last_norms)
    assert ea.clipped_sums()["0.weight"].norm() > eb.clipped_sums()["0.weight"].norm()


def test_unused_trainable_parameters_get_zero_gradients():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(3, 2)
            self.unused = nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    model = TwoHeads()
    engine = bound(model)
    engine.backward(model(torch.randn(4, 3)).sum(1))
    sums = engine.clipped_sums()
    assert torch.equal(sums["unused.weight"], torch.zeros(2, 3))
    assert sums["used.weight"].abs().sum() > 0


def test_public_api():
    for name in dpscale.__all__:
        assert hasattr(dpscale, name)


@pytest.mark.parametrize("fields", [{"max_grad_norm": 1e-60, "noise_multiplier": 1.0, "expected_batch_size": 4},
                                    {"max_grad_norm": 1.0, "noise_multiplier": 0.0, "expected_batch_size": 1e-60}])
def test_scales_outside_float32_are_refused(fields):
    """A noise std that underflows float32 would add no noise at all; R / B that overflows, inf."""
    with pytest.raises(ConfigError, match="outside float32's range"):
        PrivacyEngine(mlp(), DPConfig(**fields))
