"""Clipping groups finished during the backward (dpscale.group_clipping): under per-layer and
grouped clipping each group's norms, factors and clipped sums are formed, and handed to the
backend, as soon as its parameters' uses are in, so that its per-example forms are released then.

Checked on a tiny Llama with tied embeddings and Hugging Face's (non-reentrant) checkpointing,
against a plain loop over single examples in float64 (``tests.oracle``) clipped by the book with
the per-group non-finite rule: a unit whose loss is not finite is zeroed in every group, a unit
whose norm in group k is not finite is zeroed in group k only. A NaN is put into one example's
gradient inside the model (the gradient reaching layer 0's MLP output), so that the groups the
backward reaches first (layer 1, the final norm) are finite for it and those it reaches later
(layer 0, the tied embedding) are not: the case in which a group must be finished before it is
known whether a later one is bad.
"""

from __future__ import annotations

import math
import weakref

import pytest
import torch

from dpscale import DPConfig, PrivacyEngine, StepBoundaryError
from dpscale.adaptive_clipping import COUNT_NOISE_NAME
from dpscale.backends import LocalBackend
from dpscale.noise import NoiseKey, gaussian
from dpscale.per_example import GramCache
from tests.oracle import assert_close, per_example_grads, per_group_clipped_sum
from tests.test_models import llama

KEY = NoiseKey(bytes(range(32)))
MARK = 1  # an example whose first token is MARK gets a NaN gradient inside layer 0's MLP
COUNT_STD = 1.0  # small enough that the noisy fractions are rarely clamped, so the counts show
GROUPED = [["model.embed_tokens.weight"], ["model.layers.0.*"], ["model.layers.1.*", "model.norm.weight"]]


class _NaNGradient(torch.autograd.Function):
    """Identity; in the backward the gradient of the rows in ``rows`` becomes NaN."""

    @staticmethod
    def forward(ctx, x, rows):
        ctx.rows = rows
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad[ctx.rows] = math.nan
        return grad, None


def poisoned_llama(checkpointing: bool = True):
    """The tied tiny Llama of tests/test_models.py in float64; the rows whose first input token is
    MARK get a NaN gradient at layer 0's MLP output (forward unchanged, so every loss is finite).
    The same weights at every call."""
    torch.manual_seed(0)
    model, loss_fn, batch = llama()
    seen = {}
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.update(ids=kwargs["input_ids"]), with_kwargs=True)

    def poison(module, args, output):
        rows = (seen["ids"][:, 0] == MARK).nonzero().flatten()
        return _NaNGradient.apply(output, rows) if len(rows) else output

    model.model.layers[0].mlp.register_forward_hook(poison)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, loss_fn, batch


def marked(inputs: dict, rows: list[int]) -> dict:
    inputs = {k: v.clone() for k, v in inputs.items()}
    inputs["input_ids"][:, 0] = torch.where(inputs["input_ids"][:, 0] == MARK, MARK + 1, inputs["input_ids"][:, 0])
    inputs["input_ids"][rows, 0] = MARK
    inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return inputs


def resolved_groups(engine) -> list[list[str]]:
    return [list(group) for group in engine.clipping.groups]


def config(clipping, **changes) -> DPConfig:
    base = dict(max_grad_norm=1.0, expected_batch_size=4.0, noise_multiplier=0.0, clipping=clipping)
    return DPConfig(**{**base, **changes})


def check_against_oracle(engine, model, loss_fn, batches, users=None, tol=1e-9):
    """Run the engine's backwards (accumulated), then the oracle on the same batches."""
    norms_seen, factors_seen = [], []
    for j, inputs in enumerate(batches):
        engine.backward(loss_fn(model, inputs), **({} if users is None else {"users": users[j]}))
        norms_seen.append(engine.last_group_norms.clone())
        factors_seen.append(engine.last_clip_factors.clone())
    got = {n: g.clone() for n, g in engine.clipped_sums().items()}
    groups, plan = resolved_groups(engine), engine.clipping
    expected = {n: torch.zeros_like(p) for n, p in engine.parameters.items()}
    with engine.paused():
        for j, inputs in enumerate(batches):
            batch = inputs["input_ids"].shape[0]
            grads = per_example_grads(model, inputs, loss_fn, batch)
            if users is not None:
                order = list(dict.fromkeys(users[j]))
                grads = {n: torch.stack([g[[i for i, v in enumerate(users[j]) if v == u]].sum(0) for u in order])
                         for n, g in grads.items()}
            units = next(iter(grads.values())).shape[0]
            norms, factors, sums, _ = per_group_clipped_sum(grads, [False] * units, groups, plan.thresholds,
                                                            plan.clip_fn, plan.gamma, engine.config.expected_batch_size)
            finite = torch.isfinite(norms)
            assert torch.equal(torch.isfinite(norms_seen[j]), finite)
            assert_close(norms_seen[j][finite], norms[finite], tol, "group norms")
            assert_close(factors_seen[j], factors, tol, "clip factors")
            for n in expected:
                expected[n] += sums[n]
    for n, value in expected.items():
        assert torch.isfinite(got[n]).all(), n
        assert_close(got[n], value, tol, f"clipped sum of {n}")
    return norms_seen


@pytest.mark.parametrize("poisoned", [False, True], ids=["finite", "nan-in-layer-0"])
@pytest.mark.parametrize("clipping", ["per_layer", "grouped"])
def test_groups_finished_during_the_backward_match_the_single_example_loop(clipping, poisoned):
    model, loss_fn, batch = poisoned_llama()
    batches = [marked(batch(1), [1] if poisoned else []), marked(batch(2), [])]
    engine = PrivacyEngine(model, config(GROUPED if clipping == "grouped" else clipping, max_grad_norm=0.5,
                                         clip_fn="abadi"),
                           optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    norms = check_against_oracle(engine, model, loss_fn, batches)
    if poisoned:  # the case the rule is about: some groups finite for the bad example, some not
        bad = ~torch.isfinite(norms[0][:, 1])
        assert bad.any() and not bad.all()
    engine.step()
    assert engine.nonfinite_examples == int(poisoned)
    engine.detach()


def test_user_level_with_a_nan_in_one_users_example():
    """Users of 2, 1 and 2 examples (not adjacent); a NaN in one example of the first user: that
    user is zeroed in the groups its summed gradient is not finite in, and only there."""
    model, loss_fn, batch = poisoned_llama()
    inputs = marked(batch(3), [2])
    extra = marked(batch(4), [])
    inputs = {k: torch.cat([v, extra[k][:2]]) for k, v in inputs.items()}  # 5 examples
    users = [[7, 8, 7, 9, 9]]
    engine = PrivacyEngine(model, config("per_layer", privacy_unit="user", examples_per_user=2,
                                         expected_batch_size=2.5, clip_fn="automatic", automatic_gamma=0.01),
                           optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    norms = check_against_oracle(engine, model, loss_fn, [inputs], users=users)
    bad = ~torch.isfinite(norms[0][:, 0])
    assert bad.any() and not bad.all() and torch.isfinite(norms[0][:, 1:]).all()
    engine.detach()


def test_adaptive_per_layer_counts_follow_the_per_group_rule():
    """Adaptive clipping, per layer, checkpointed, a NaN in one example: each group's centred count
    (a zeroed unit counts as clipped in that group) moves its threshold; checked through the
    thresholds after the step, against the loop's counts and the keyed count noise."""
    model, loss_fn, batch = poisoned_llama()
    inputs = marked(batch(5), [0])
    cfg = config("per_layer", noise_multiplier=0.3, dataset_size=40, sampling_declared_by_user=True,
                 clip_quantile=0.5, clip_quantile_lr=0.7, clip_count_std=COUNT_STD, expected_batch_size=3.0)
    engine = PrivacyEngine(model, cfg, noise_key=KEY, optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    before = engine.clip_thresholds
    engine.backward(loss_fn(model, inputs))
    groups = resolved_groups(engine)
    with engine.paused():
        grads = per_example_grads(model, inputs, loss_fn, 3)
    norms, _, sums, centred = per_group_clipped_sum(grads, [False] * 3, groups, before, "abadi", 0.0, 3.0)
    got = engine.clipped_sums()
    for n, value in sums.items():
        assert_close(got[n], value, 1e-9, f"clipped sum of {n}")
    engine.step()
    z = gaussian(KEY, 0, COUNT_NOISE_NAME, len(groups), dtype=torch.float64).tolist()
    expected = []
    for k, r in enumerate(before):
        b = min(1.0, max(0.0, (centred[k] + COUNT_STD * z[k]) / 3.0 + 0.5))
        expected.append(r * math.exp(-0.7 * (b - 0.5)))
    assert engine.clip_thresholds == pytest.approx(tuple(expected), rel=1e-12)
    assert any(not math.isfinite(float(v)) for v in norms[:, 0]) and len(set(centred)) > 1
    engine.detach()


# when the sums reach the backend, and what is held --------------------------------------------


class RecordingBackend(LocalBackend):
    """A local backend that notes, for each sum it receives, whether the backward had already
    reached the embedding's output (the last gradient it computes), and keeps weak references to
    the sum's per-example forms, to see whether anything still holds them."""

    def __init__(self, during_backward: bool = True) -> None:
        super().__init__()
        self.accumulates_during_backward = during_backward
        self.received: list[tuple[str, bool]] = []
        self.forms: dict[str, list[weakref.ref]] = {}
        self.reached_embedding = False
        self.alive_at_embedding: list[str] = []

    def accumulate(self, name, clipped) -> None:
        self.received.append((name, self.reached_embedding))
        if clipped is not None:
            self.forms[name] = [weakref.ref(t) for use in clipped._uses for t in _factors(use)]
        super().accumulate(name, clipped)

    def at_embedding_output(self, grad):
        self.reached_embedding = True
        self.alive_at_embedding = [name for name, refs in self.forms.items() if any(r() is not None for r in refs)]


def _factors(use):
    return (use.grad,) if hasattr(use, "grad") else (use.left, use.right)


def recorded_backward(clipping: str, during_backward: bool = True):
    model, loss_fn, batch = poisoned_llama()
    backend = RecordingBackend(during_backward)
    engine = PrivacyEngine(model, config(clipping), backend=backend,
                           optimizer=torch.optim.SGD(model.parameters(), lr=0.0))

    def mark(module, args, output):
        output.register_hook(backend.at_embedding_output)

    model.model.embed_tokens.register_forward_hook(mark)
    inputs = batch(1)
    engine.backward(loss_fn(model, inputs))
    return engine, backend


def test_per_layer_sums_reach_the_backend_during_the_backward_and_their_forms_are_released():
    engine, backend = recorded_backward("per_layer")
    names = list(engine.parameters)
    assert sorted(name for name, _ in backend.received) == sorted(names)  # each once
    early = [name for name, after in backend.received if not after]
    # every layer's sum before the backward reached the embedding; the tied embedding and LM head
    # (one parameter, two uses) only after its last use, the embedding
    assert set(early) == set(names) - {"model.embed_tokens.weight"}, early
    # and what was handed over is no longer held: nothing kept those forms until the end
    assert backend.alive_at_embedding == [], backend.alive_at_embedding
    engine.detach()


def test_flat_clipping_holds_every_form_until_the_last_use():
    """The floor of one backward under flat clipping: the one clip factor needs every layer's norm."""
    engine, backend = recorded_backward("flat")
    assert backend.received and all(after for _, after in backend.received)
    engine.detach()


def test_a_backend_that_takes_sums_after_the_backward_gets_them_in_order_and_the_same_numbers():
    early_engine, early = recorded_backward("per_layer")
    late_engine, late = recorded_backward("per_layer", during_backward=False)
    assert [name for name, _ in late.received] == list(late_engine.parameters)  # the engine's order
    assert all(after for _, after in late.received)
    assert torch.equal(early_engine.last_group_norms, late_engine.last_group_norms)
    assert torch.equal(early_engine.last_clip_factors, late_engine.last_clip_factors)
    early_sums, late_sums = early_engine.clipped_sums(), late_engine.clipped_sums()
    for name in early_engine.parameters:
        assert torch.equal(early_sums[name], late_sums[name]), name


class _Raise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("simulated: out of memory late in the backward")


@pytest.mark.parametrize("clipping", ["per_layer", "flat"])
def test_a_backward_that_fails_after_handing_sums_over_closes_no_step(clipping):
    """Per layer, the layers' sums are with the backend when the backward fails at the embedding:
    the step would hold part of those examples (run again, twice), so it is never closed. Flat
    clipping hands nothing over before the end: the failure leaves the step as it was."""
    model, loss_fn, batch = poisoned_llama()
    engine = PrivacyEngine(model, config(clipping), optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    handle = model.model.embed_tokens.register_forward_hook(lambda m, args, output: _Raise.apply(output))
    with pytest.raises(RuntimeError, match="simulated"):
        engine.backward(loss_fn(model, batch(1)))
    handle.remove()
    if clipping == "flat":
        engine.backward(loss_fn(model, batch(1)))
        engine.step()
        assert engine.steps_taken == 1
    else:
        with pytest.raises(StepBoundaryError, match="part of its clipped sums"):
            engine.backward(loss_fn(model, batch(1)))
        with pytest.raises(StepBoundaryError, match="part of its clipped sums"):
            engine.step()
        assert engine.steps_taken == 0
    engine.detach()


def test_a_cached_gram_neither_keeps_its_activation_nor_outlives_it():
    """Groups finished one after another share the Gram matrix of an activation they read (the
    query, key and value projections), through a cache that outlives some forms: it must hold no
    activation alive, and never serve a gram for a tensor gone (a later one may sit at its address)."""
    cache = GramCache()
    x = torch.randn(2, 3, 4)
    key = cache.key(x, torch.float32)
    gram = cache.gram(x, torch.float32)
    assert cache.gram(x.view(2, 3, 4), torch.float32) is gram  # another view of the same storage: shared
    alias = x.detach()  # a tensor of its own over the same storage, as checkpointing gives each call
    gone = weakref.ref(x)
    del x
    assert gone() is None  # the cache held no tensor
    assert cache.gram(alias, torch.float32) is gram  # the storage lives on: still shared
    storage = weakref.ref(alias.untyped_storage())
    del alias
    assert storage() is None  # nor the storage
    assert cache.get(key) is None  # and serves nothing for whatever is allocated there next
