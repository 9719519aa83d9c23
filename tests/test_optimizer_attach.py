"""Which optimizers the engine attaches: one over ``model.parameters()`` once LoRA or BiTFiT froze
the rest (the user's habit) trains exactly as one over the trainable parameters, checked against a
float64 loop over single examples; a frozen parameter that somehow holds a gradient, a parameter
from elsewhere and a trainable parameter left out are refused; a factory builds the optimizer over
the trainable parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dpscale import ConfigError, DPConfig, ForeignGradientError, PrivacyEngine
from dpscale.noise import NoiseKey, gaussian

KEY = NoiseKey(bytes(range(32)))
B, R, LR = 4, 0.3, 0.5


def frozen_first_layer(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    model[0].requires_grad_(False)  # what dpscale.lora / bitfit do to the layers that do not train
    return model


def config() -> DPConfig:
    return DPConfig(max_grad_norm=R, expected_batch_size=B, noise_multiplier=1.1, dataset_size=50,
                    sampling_declared_by_user=True)


def reference_step(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """SGD on the trainable parameters after one DP step, by a loop over single examples (float64):
    each example's gradient clipped to R, summed, keyed noise of std sigma R added, divided by B."""
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    total = {name: torch.zeros_like(p) for name, p in trainable.items()}
    for row in x:
        grads = torch.autograd.grad(model(row[None]).pow(2).sum(), list(trainable.values()))
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        factor = min(1.0, R / float(norm))
        for name, g in zip(trainable, grads):
            total[name] += factor * g
    return {name: p.detach() - LR * (total[name] + 1.1 * R * gaussian(KEY, 0, name, p.numel(),
                                                                       dtype=torch.float64).reshape(p.shape)) / B
            for name, p in trainable.items()}


def one_step(model: nn.Module, engine: PrivacyEngine, x: torch.Tensor) -> None:
    engine.backward(model(x).pow(2).sum(1))
    engine.step()


def test_an_optimizer_over_model_parameters_ignores_the_frozen_ones_and_trains_the_rest_exactly():
    model = frozen_first_layer()
    x = torch.randn(6, 5, dtype=torch.float64)
    expected = reference_step(model, x)
    frozen_before = [p.detach().clone() for p in model[0].parameters()]
    engine = PrivacyEngine(model, config(), noise_key=KEY, optimizer=torch.optim.SGD(model.parameters(), lr=LR))
    assert set(engine.parameters) == {"2.weight", "2.bias"}
    one_step(model, engine, x)
    for name, p in engine.parameters.items():
        torch.testing.assert_close(p.detach(), expected[name], rtol=0, atol=1e-12)
    assert all(torch.equal(p, q) for p, q in zip(model[0].parameters(), frozen_before))
    # AdamW over model.parameters() (weight decay included) moves exactly what AdamW over the trainable ones does
    twins = [frozen_first_layer(), frozen_first_layer()]
    engines = [PrivacyEngine(twins[0], config(), noise_key=KEY,
                             optimizer=torch.optim.AdamW(twins[0].parameters(), lr=0.1, weight_decay=0.1)),
               PrivacyEngine(twins[1], config(), noise_key=KEY,
                             optimizer=lambda params: torch.optim.AdamW(params, lr=0.1, weight_decay=0.1))]
    for _ in range(3):
        for twin, engine in zip(twins, engines):
            one_step(twin, engine, x)
    for a, b in zip(twins[0].parameters(), twins[1].parameters()):
        assert torch.equal(a, b)
    assert all(torch.equal(p, q) for p, q in zip(twins[0][0].parameters(), frozen_before))


def test_a_factory_builds_the_optimizer_over_the_trainable_parameters():
    model = frozen_first_layer()
    engine = PrivacyEngine(model, config(), noise_key=KEY, optimizer=lambda params: torch.optim.SGD(params, lr=LR))
    held = [p for group in engine.optimizer.param_groups for p in group["params"]]
    assert [id(p) for p in held] == [id(p) for p in engine.parameters.values()]
    with pytest.raises(ConfigError, match="factory returned a list"):
        PrivacyEngine(frozen_first_layer(), config(), noise_key=KEY, optimizer=lambda params: list(params))


def test_a_frozen_parameter_holding_a_gradient_is_refused_at_the_step():
    model = frozen_first_layer()
    engine = PrivacyEngine(model, config(), noise_key=KEY, optimizer=torch.optim.SGD(model.parameters(), lr=LR))
    before = model[0].weight.detach().clone()
    model(torch.randn(3, 5, dtype=torch.float64))  # a forward for the tape, then a hand-written gradient
    model[0].weight.grad = torch.ones_like(model[0].weight)
    with pytest.raises(ForeignGradientError, match="frozen parameter"):
        engine.step()
    assert torch.equal(model[0].weight, before) and model[0].weight.grad is None


def test_a_parameter_from_elsewhere_or_a_trainable_one_left_out_is_refused():
    model = frozen_first_layer()
    stray = nn.Parameter(torch.ones(3, dtype=torch.float64))
    with pytest.raises(ConfigError, match="does not clip"):
        PrivacyEngine(model, config(), noise_key=KEY, optimizer=torch.optim.SGD([*model.parameters(), stray], lr=1))
    with pytest.raises(ConfigError, match=r"leaves out 1 trainable parameter\(s\) \(\['2.bias'\]\)"):
        PrivacyEngine(model, config(), noise_key=KEY, optimizer=torch.optim.SGD([model[2].weight], lr=1))


def test_unfreezing_a_parameter_the_optimizer_holds_is_still_refused():
    model = frozen_first_layer()
    engine = PrivacyEngine(model, config(), noise_key=KEY, optimizer=torch.optim.SGD(model.parameters(), lr=LR))
    model[0].requires_grad_(True)
    with pytest.raises(ConfigError, match="added or unfrozen"):
        engine.backward(model(torch.randn(2, 5, dtype=torch.float64)).sum(1))
