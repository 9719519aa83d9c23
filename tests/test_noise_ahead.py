"""Noise drawn ahead of the step (dpscale/noise/ahead.py) and the host generator spread over threads
(dpscale/noise/workers.py): every value is bit-identical (torch.equal) to the noise drawn at the step
by one thread, in every case where a step is not the one prepared (first step, resume, refused
step, budget stop, another std, changed requests); failures in the thread surface as dpscale
errors; threads end with their owner."""

from __future__ import annotations

import gc
import threading

import pytest
import torch
from torch import nn

from dpscale import DPConfig, PrivacyEngine, StepBoundaryError, run_logical_step, run_steps
from dpscale.errors import ConfigError, PrivacyBudgetExhausted, SamplingError
from dpscale.noise import (
    NoiseAhead,
    NoiseAheadOptions,
    NoiseKey,
    NoiseWorkers,
    add_gaussian_noise_,
    gaussian,
    host_generator,
)
from dpscale.noise import ahead as ahead_module

KEY = NoiseKey(bytes(range(32)))
CHUNK = host_generator._CHUNK


# --- the host generator over threads --------------------------------------------------------------


@pytest.fixture(scope="module")
def workers():
    pool = NoiseWorkers(3)
    yield pool
    pool.close()


@pytest.mark.parametrize("numel,offset", [(2 * CHUNK, 0), (5 * CHUNK + 4099, 77), (3 * CHUNK - 1, CHUNK - 5),
                                          (7, 3), (2 * CHUNK + 1, 10**9 + 13)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_threads_add_the_same_noise_as_one_thread(workers, numel, offset, dtype):
    base = torch.randn(numel, generator=torch.Generator().manual_seed(numel)).to(dtype)
    one, many = base.clone(), base.clone()
    add_gaussian_noise_(one, KEY, 3, "w", 0.7, offset=offset)
    add_gaussian_noise_(many, KEY, 3, "w", 0.7, offset=offset, workers=workers)
    assert torch.equal(one, many)
    assert not torch.equal(one, base)  # the comparison can fail: noise was added
    assert torch.equal(gaussian(KEY, 3, "w", numel, offset, dtype=dtype, workers=workers),
                       gaussian(KEY, 3, "w", numel, offset, dtype=dtype))


def test_pinned_values_hold_over_threads(workers):
    """test_noise.py's pinned values of scheme v2, from a request spread over three threads."""
    got = gaussian(KEY, 0, "model.embed_tokens.weight", 3 * CHUNK, offset=10**9 - CHUNK, dtype=torch.float64,
                   workers=workers)
    pinned = [0.577997307508969, 0.08324986050214082, -0.42539481639101134, 1.444202636499784]
    assert got[CHUNK : CHUNK + 4].tolist() == pinned


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("numel,offset", [(1, 0), (2 * CHUNK, 0), (9 * CHUNK + 5, 3 * CHUNK - 1), (10**6, 12345)])
def test_spans_cover_the_request_once_cut_at_chunks(threads, numel, offset):
    spans = host_generator._spans(numel, offset, NoiseWorkers(threads))
    assert spans[0][0] == 0 and spans[-1][1] == numel and len(spans) <= threads
    assert all(a < b and b == c for (a, b), (c, _) in zip(spans, spans[1:] + [(numel, None)]))
    assert all((offset + a) % CHUNK == 0 for a, _ in spans[1:])


def test_a_failing_task_raises_and_the_pool_stops():
    pool = NoiseWorkers(2)

    def fail():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        pool.run([lambda: None, fail])
    assert pool.alive_threads == 1
    pool.close()
    for thread in pool._started:
        thread.join(5)
    assert pool.alive_threads == 0
    pool.run([lambda: None, lambda: None])  # after close: on the calling thread


# --- NoiseAhead on its own --------------------------------------------------------------------------


def tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [("a.weight", torch.randn(3000, generator=g), 0), ("a.bias", torch.randn(17, generator=g).double(), 5),
            ("b.weight", torch.randn(2 * CHUNK + 3, generator=g).bfloat16(), 1000)]


def noised(add_noise, seed=0):
    out = tensors(seed)
    for name, t, offset in out:
        add_noise(name, t, offset)
    return [t for _, t, _ in out]


def inline(step, std, seed=0):
    return noised(lambda name, t, offset: add_gaussian_noise_(t, KEY, step, name, std, offset=offset), seed)


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture
def counted(monkeypatch):
    """How many requests were drawn at the step (not served from the drawn plan)."""
    calls = []
    real = ahead_module.add_gaussian_noise_
    monkeypatch.setattr(ahead_module, "add_gaussian_noise_", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    return calls


def test_served_noise_is_bit_identical_and_used(counted):
    ahead = NoiseAhead(KEY, NoiseAheadOptions(threads=2))
    assert same(noised(ahead.noise_fn(0, 0.5)), inline(0, 0.5))  # step 0: nothing recorded yet
    assert len(counted) == 3
    for step in (1, 2, 3):
        ahead.prepare(step, 0.5)
        assert same(noised(ahead.noise_fn(step, 0.5), seed=step), inline(step, 0.5, seed=step))
    assert len(counted) == 3  # steps 1-3 were all served from the drawn noise
    assert not same(inline(2, 0.5), inline(3, 0.5))  # and steps differ: the comparison can fail
    ahead.close()


@pytest.mark.parametrize("case", ["other step", "other std", "not prepared", "changed requests"])
def test_noise_prepared_for_another_step_is_never_used(counted, case):
    ahead = NoiseAhead(KEY, NoiseAheadOptions())
    noised(ahead.noise_fn(0, 1.0))
    if case != "not prepared":
        ahead.prepare(5, 1.0 if case != "other std" else 2.0)
    step = 6 if case == "other step" else 5
    if case == "changed requests":
        add_noise = ahead.noise_fn(step, 1.0)
        t = torch.zeros(3000)
        add_noise("a.weight", t, 1)  # another offset than the plan's first request
        want = torch.zeros(3000)
        add_gaussian_noise_(want, KEY, step, "a.weight", 1.0, offset=1)
        assert torch.equal(t, want)
        return
    counted.clear()
    assert same(noised(ahead.noise_fn(step, 1.0)), inline(step, 1.0))
    assert len(counted) == 3  # drawn at the step, not served
    ahead.close()


def test_memory_stays_within_the_budget():
    ahead = NoiseAhead(KEY, NoiseAheadOptions(max_mb=0.05))  # 52 KiB: a few pieces of 4096 elements
    noised(ahead.noise_fn(0, 1.0))
    ahead.prepare(1, 1.0)
    assert same(noised(ahead.noise_fn(1, 1.0)), inline(1, 1.0))
    assert 0 < ahead.last_peak_bytes <= max(ahead.max_bytes, 8 * ahead._piece)
    ahead.close()


def test_a_failure_in_the_thread_is_raised_at_the_step(monkeypatch):
    ahead = NoiseAhead(KEY, NoiseAheadOptions())
    noised(ahead.noise_fn(0, 1.0))

    def broken(*args, **kwargs):
        raise MemoryError("no room")

    monkeypatch.setattr(host_generator, "scaled_noise_into", broken)
    ahead.prepare(1, 1.0)
    with pytest.raises(StepBoundaryError, match="ahead failed .*MemoryError"):
        noised(ahead.noise_fn(1, 1.0))
    ahead.close()


def test_threads_end_on_close_and_on_garbage_collection():
    ahead = NoiseAhead(KEY, NoiseAheadOptions(threads=2))
    noised(ahead.noise_fn(0, 1.0))
    ahead.prepare(1, 1.0)
    threads = [ahead.thread]
    noised(ahead.noise_fn(1, 1.0))
    threads += ahead.workers._started
    assert len(threads) == 2 and all(t.daemon and t.is_alive() for t in threads)
    del ahead
    gc.collect()
    for thread in threads:
        thread.join(5)
    assert not any(t.is_alive() for t in threads)


def test_options_are_checked():
    for bad in (dict(threads=0), dict(threads=1.5), dict(max_mb=0), dict(max_mb=float("nan"))):
        with pytest.raises(ConfigError):
            NoiseAheadOptions(**bad)
    with pytest.raises(ConfigError):
        NoiseAhead(KEY, {"threads": 2})


# --- through the engine -----------------------------------------------------------------------------

N, B = 64, 8


def data():
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randint(0, 11, (N, 4), generator=g), torch.randn(N, 3, generator=g))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)).mean(1))


def build(ahead, **changes):
    torch.manual_seed(0)
    net = Net()
    config = DPConfig(**{**dict(max_grad_norm=1.0, expected_batch_size=B, noise_multiplier=1.0, dataset_size=N),
                         **changes})
    engine = PrivacyEngine(net, config, noise_key=KEY, noise_ahead=ahead)
    optimizer = engine.attach_optimizer(torch.optim.SGD(engine.parameters.values(), lr=0.1))
    loader = engine.make_data_loader(data(), max_physical_batch_size=3)
    return net, engine, optimizer, loader


def losses_of(net):
    return lambda micro: (net(micro[0]) - micro[1]).pow(2).sum(1)


def params(net):
    return [p.detach().clone() for p in net.parameters()]


def run_script(ahead, script):
    """Run the same script with or without noise drawn ahead; the parameters after each action."""
    net, engine, optimizer, loader = build(ahead)
    batches, saved, trace = iter(loader), {}, []
    for action in script:
        if action == "step":
            run_logical_step(engine, next(batches), losses_of(net))
        elif action == "save":
            saved = {"engine": engine.state_dict(), "model": {k: v.clone() for k, v in net.state_dict().items()}}
        elif action == "resume":  # back to the saved step: the drawn noise is for a later one
            engine.load_state_dict(saved["engine"])
            net.load_state_dict(saved["model"])
            batches = iter(loader)
        elif action == "refused":  # an optimizer step with no drawn batch: refused, nothing taken
            with pytest.raises(SamplingError):
                optimizer.step()
        trace.append(params(net))
    engine.detach()
    return trace


@pytest.mark.parametrize("script", [
    ["step"] * 4,
    ["step", "save", "step", "step", "resume", "step", "step"],
    ["step", "step", "refused", "step"],
])
def test_engine_steps_are_bit_identical_with_and_without_noise_ahead(script, counted):
    without = run_script(None, script)
    inline_requests = len(counted)
    counted.clear()
    with_ahead = run_script(NoiseAheadOptions(threads=2), script)
    assert all(same(a, b) for a, b in zip(without, with_ahead))
    assert not same(without[0], without[-1])
    assert len(counted) < inline_requests  # steps after the first were served from noise drawn ahead


def test_no_noise_is_drawn_past_the_budget():
    """A run stopped at its budget: the same parameters as without noise drawn ahead, and nothing
    drawn for the step the budget refuses."""
    finals = []
    for ahead in (None, NoiseAheadOptions()):
        net, engine, optimizer, loader = build(ahead, noise_multiplier=None, target_epsilon=1.0, steps=3)
        outcome = run_steps(engine, loader, losses_of(net), max_steps=50)
        assert outcome.stopped == "budget" and engine.budget_exhausted
        assert engine._boundary.noise_ahead._shared.plan is None
        with pytest.raises(PrivacyBudgetExhausted):
            next(iter(loader))
        finals.append(params(net))
        engine.detach()
    assert same(*finals)


def test_engine_detach_ends_the_thread_and_a_thread_failure_stops_the_step(monkeypatch):
    net, engine, optimizer, loader = build(NoiseAheadOptions())
    batches = iter(loader)
    monkeypatch.setattr(host_generator, "scaled_noise_into", lambda *a, **k: 1 / 0)  # the thread's draw
    run_logical_step(engine, next(batches), losses_of(net))  # step 0 is drawn at the step (nothing recorded yet)
    before = params(net)
    with pytest.raises(StepBoundaryError, match="ZeroDivisionError"):
        run_logical_step(engine, next(batches), losses_of(net))
    assert same(before, params(net))  # no update without its noise
    thread = engine._boundary.noise_ahead.thread
    assert isinstance(thread, threading.Thread) and thread.is_alive()
    engine.detach()
    thread.join(5)
    assert not thread.is_alive()
