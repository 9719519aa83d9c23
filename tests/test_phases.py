"""LP-FT as one accounted run (dpscale.phases): the head alone for k steps, then the subset and the
head, two engines built from one DPConfig, the second continuing the first. Checked from outside:
phase 1 moves the head only; phase 2's first update, read off a float64 SGD step of rate 1, is the
float64 one-example loop's clipped sum over phase 2's parameters plus the keyed noise of step k
(not step 0: no draw reused); the final epsilon is compute_epsilon's for k + t steps of (q, sigma)
and within the target; the budget counts both phases; and every way of breaking the hand-over is
refused before anything moves."""

from __future__ import annotations

import pytest
import torch
import transformers

import dpscale
from dpscale.accounting import compute_epsilon
from dpscale.driver import run_logical_step
from dpscale.errors import ConfigError, PrivacyBudgetExhausted, StepBoundaryError
from dpscale.noise import NoiseKey, gaussian
from tests.oracle import clipped_sum, per_example_grads

torch.set_num_threads(1)

N, B, R = 40, 8.0, 0.5


def model_and_data():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, num_labels=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = dpscale.bitfit(transformers.BertForSequenceClassification(config).double())
    data = [{"input_ids": torch.randint(1, 50, (6,)), "labels": torch.tensor(i % 2)} for i in range(N)]
    return model, data


def collate(items):
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def losses_of(model, inputs):
    logits = model(input_ids=inputs["input_ids"]).logits
    return torch.nn.functional.cross_entropy(logits, inputs["labels"], reduction="none")


def dp_config(steps=5, budget=True):
    """With a target epsilon (sigma calibrated once per engine), or a given sigma (the refusals); RDP: fast."""
    noise = {"target_epsilon": 4.0} if budget else {"noise_multiplier": 1.0}
    return dpscale.DPConfig(max_grad_norm=R, expected_batch_size=B, dataset_size=N, steps=steps, clip_fn="abadi",
                            accountant="rdp", **noise)


def sgd(model):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)


def first_phase(model, data, key, k=2, steps=5, budget=True):
    """Phase 1 (the head alone) for k steps; returns (engine, loader, phase 2's names)."""
    full = [name for name, p in model.named_parameters() if p.requires_grad]
    dpscale.set_trainable(model, dpscale.head_parameter_names(model))
    engine = dpscale.PrivacyEngine(model, dp_config(steps, budget), optimizer=sgd(model), noise_key=key)
    loader = engine.make_data_loader(data, max_physical_batch_size=16, collate_fn=collate)
    dpscale.run_steps(engine, loader, lambda micro: losses_of(engine.model, micro), max_steps=k)
    return engine, loader, full


def test_phase_two_continues_the_run_of_phase_one():
    model, data = model_and_data()
    key = NoiseKey.generate()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    first, loader, full = first_phase(model, data, key, k=2)
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert moved == {"classifier.weight", "classifier.bias"}  # phase 1 trains the head alone
    first.detach()

    dpscale.set_trainable(model, full)
    second = dpscale.PrivacyEngine(model, dp_config(), optimizer=sgd(model), noise_key=key)
    dpscale.continue_run(second, first)
    assert second.steps_taken == 2 and second.data_loader is loader
    assert second.accountant.state_dict() == first.accountant.state_dict()

    # phase 2's first step, seen from outside: update = clipped sum over its parameters + keyed noise of step 2
    start = {name: p.detach().clone() for name, p in second.parameters.items()}
    batch = next(iter(loader))
    assert batch.step == 2 and batch.size > 0
    inputs = collate([data[i] for i in batch.indices])
    with second.paused():  # the reference, at the parameters before the step (autograd.grad: no p.grad)
        grads = per_example_grads(model, inputs, losses_of, batch.size)
    _, sums = clipped_sum(grads, second.clipping, B)
    run_logical_step(second, batch, lambda micro: losses_of(second.model, micro))
    std = second.noise_std
    assert std > 0 and set(sums) == set(full)
    for name, p in second.parameters.items():
        update = start[name] - p.detach()
        expected = sums[name] + std * gaussian(key, 2, name, p.numel(), dtype=torch.float64).view_as(p)
        assert torch.allclose(update, expected, rtol=0, atol=1e-10), name
        stale = sums[name] + std * gaussian(key, 0, name, p.numel(), dtype=torch.float64).view_as(p)
        assert not torch.allclose(update, stale, rtol=0, atol=1e-10), name  # the step index continued

    dpscale.run_steps(second, loader, lambda micro: losses_of(second.model, micro), max_steps=2)
    assert second.steps_taken == 5
    sigma, q, delta = second.noise_multiplier, second.sample_rate, second.delta
    assert second.epsilon() == pytest.approx(compute_epsilon(sigma, q, 5, delta, "rdp"), rel=1e-9)
    assert second.epsilon() <= 4.0
    # one budget for both phases: the engine stops where a single run of the plan would
    while not second.budget_exhausted:
        dpscale.run_steps(second, loader, lambda micro: losses_of(second.model, micro), max_steps=1)
    assert second.steps_taken == second.budget_steps
    assert compute_epsilon(sigma, q, second.budget_steps, delta, "rdp") <= 4.0 < compute_epsilon(
        sigma, q, second.budget_steps + 1, delta, "rdp")
    with pytest.raises(PrivacyBudgetExhausted):
        next(iter(loader))


def test_a_second_engine_of_another_plan_is_refused():
    model, data = model_and_data()
    key = NoiseKey.generate()
    first, _, full = first_phase(model, data, key, budget=False)
    first.detach()
    dpscale.set_trainable(model, full)
    other = dpscale.PrivacyEngine(model, dp_config(steps=50, budget=False), optimizer=sgd(model), noise_key=key)
    with pytest.raises(ConfigError, match="plan differs"):
        dpscale.continue_run(other, first)
    assert other.steps_taken == 0 and other.data_loader is None
    other.detach()
    foreign = dpscale.PrivacyEngine(model, dp_config(budget=False), optimizer=sgd(model),
                                    noise_key=NoiseKey.generate())
    with pytest.raises(ConfigError, match="plan differs"):  # another key: other noise and batches
        dpscale.continue_run(foreign, first)


def test_handing_over_mid_step_or_attached_is_refused():
    model, data = model_and_data()
    key = NoiseKey.generate()
    first, loader, full = first_phase(model, data, key, budget=False)
    second_model = model_and_data()[0]
    second = dpscale.PrivacyEngine(second_model, dp_config(budget=False), optimizer=sgd(second_model), noise_key=key)
    with pytest.raises(StepBoundaryError, match="detach"):
        dpscale.continue_run(second, first)  # still attached
    batch = next(iter(loader))
    first.backward(losses_of(first.model, batch.micro_batches[0]))
    first.detach()
    with pytest.raises(StepBoundaryError, match="middle of a step"):
        dpscale.continue_run(second, first)


def test_set_trainable_refuses_unknown_names():
    model, _ = model_and_data()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    with pytest.raises(ConfigError, match="no parameter"):
        dpscale.set_trainable(model, ["classifier.weight", "classifier.weigth"])
    assert [name for name, p in model.named_parameters() if p.requires_grad] == trainable  # refused before any change
