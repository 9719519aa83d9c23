"""Foreign gradients, tried for real in every setting: each backward other than ``engine.backward``
and each optimizer the engine does not know must be refused with a ``ForeignGradientError`` as it
happens, and leave everything as it was. Used by tests/test_foreign_gradients.py, in its own
process (one process: the local backend, Accelerate, DPTrainer) and as one rank of a 2-process run
(tests/launcher.py sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT):

    python tests/foreign_worker.py spec.json

spec keys: setting ("ddp", "deepspeed", "fsdp2"), stages (DeepSpeed ZeRO stages, run in turn in
the one launch), key (the noise key file every rank reads), out (rank r writes ``{out}/rank{r}.json``:
its ``Probe.results``, one entry per path, "ok" or what went wrong).

A ``Probe`` runs one foreign path at a time. Before it: a snapshot of what this rank holds of the
parameters (a DTensor's local shard, a ZeRO-3 partition; DeepSpeed's fp32 master partitions too),
the steps taken and epsilon. After it: the error must be a dpscale ``ForeignGradientError`` whose
message contains the expected words, every snapshot tensor bit-identical (``torch.equal``), the
steps and epsilon unchanged and ``p.grad`` None on every trainable parameter. A path that is not
refused, raises something else, or moves anything is recorded and the run goes on to the next path,
so one launch reports every path.

The paths (one engine per setting, legit steps in between, each rank running the same ones):

* plain: ``loss.backward()`` of a batch-mean loss from a forward of the model;
* aux: ``engine.backward(per_example_losses)``, then an auxiliary loss of the same forward
  back-propagated on its own (the clipped sums already held must survive, and be stepped); and an
  auxiliary loss back-propagated first on a retained graph (the engine's backward then still runs);
* accelerator / ds_engine: ``accelerator.backward(loss)`` where Accelerate prepared the model,
  ``ds_engine.backward(loss)`` under DeepSpeed (after a forward through ``ds_engine(...)``);
* shared: a second forward through a shared module (the input embedding, the tied head, the first
  layer) whose output is back-propagated plainly;
* then_step: ``loss.backward()`` then ``engine.step()``: the backward is refused and the step that
  follows is an empty one, taken and accounted, that moves each parameter by exactly its keyed
  noise (plain SGD: bit for bit);
* optimizer: a torch optimizer not attached to the engine, stepped after ``engine.backward``:
  refused by name, nothing moves, and the attached optimizer's step then applies the sums;
* param_hook (last: it poisons the engine on purpose): a shared module called when no forward of
  the model is recorded (after an evaluation forward under ``no_grad``), so that the gradient
  reaches the parameter itself: refused there, and every later backward and step refused too.

All of them must be refused as the gradient reaches a recorded module output, before any weight
gradient exists (the message names the module), but param_hook, refused at the parameter. Under
DeepSpeed each refusal inside ``with backend.accumulation():`` is tried caught inside the block and
raised out of it (DeepSpeed reduces on the block's exit), and param_hook also outside any block, on
a fresh engine. After the paths (but param_hook) a legit step must still work on every rank, and
the ranks must still hold the same parameters.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import sys
import traceback
from collections.abc import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dpscale import DPConfig, ForeignGradientError, PrivacyEngine
from dpscale.losses import causal_lm_losses
from dpscale.noise import NoiseKey, add_gaussian_noise_

KEY = NoiseKey(bytes(range(32)))
FOREIGN = "through a backward other than engine.backward"
AT_OUTPUT = "reached the output of module '[^']+' " + FOREIGN  # before any weight gradient is computed
AT_PARAMETER = "reached trainable parameter '[^']+' " + FOREIGN
NOT_ATTACHED = "steps parameters of a PrivacyEngine that is not attached"
EARLIER = "reached a trainable parameter earlier"
VOCAB, T, B, N, LR = 64, 6, 4, 64, 0.25


def config(**changes) -> DPConfig:
    """Accounted (dataset_size), so that epsilon is checked (by RDP, which is quick to ask after
    every path); the batches are the test's own."""
    values = {"max_grad_norm": 1.0, "expected_batch_size": B, "noise_multiplier": 1.0, "dataset_size": N,
              "sampling_declared_by_user": True, "accountant": "rdp"}
    return DPConfig(**{**values, **changes})


class _Tokens:
    """What tests.tiny_models.tiny_causal_lm reads of a tokenizer (no tokenizer to train)."""

    bos_token_id = eos_token_id = 0

    def __len__(self) -> int:
        return VOCAB


def causal_lm(kind: str, tied: bool = True) -> nn.Module:
    """A tiny GPT-2 or Llama of tests/tiny_models.py (input embedding tied to the head unless
    ``tied=False``), without dropout so that two ranks and two runs compute the same thing."""
    from tests.tiny_models import tiny_causal_lm

    model = tiny_causal_lm(kind, _Tokens(), tied=tied)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model.float().train()


def token_batch(seed: int, size: int = B) -> torch.Tensor:
    return torch.randint(0, VOCAB, (size, T), generator=torch.Generator().manual_seed(seed))


def lm_losses(model: nn.Module, ids: torch.Tensor, **kwargs):
    """(per-example losses, the model's output) of one forward."""
    out = model(input_ids=ids, **kwargs)
    return causal_lm_losses(out.logits, ids), out


def stored_value(p: torch.Tensor) -> torch.Tensor:
    """What this rank stores of a parameter: a DTensor's local shard, a ZeRO-3 partition, or the
    tensor itself."""
    if hasattr(p, "to_local"):
        return p.to_local().detach()
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor.detach()
    return p.detach()


# the probe ---------------------------------------------------------------------------------------


class Probe:
    """Runs foreign paths against one engine; ``results[label]`` is "ok" or what went wrong.

    held: extra tensors to snapshot (DeepSpeed's fp32 master partitions); model: the module whose
    registered trainable parameters must have no gradient either (under FSDP2 they are the
    DTensors again once FSDP2 has resharded)."""

    def __init__(self, engine: PrivacyEngine, model: nn.Module | None = None,
                 held: Callable[[], dict[str, torch.Tensor]] | None = None) -> None:
        self.engine = engine
        self.model = model if model is not None else engine.model
        self.held = held
        self.results: dict[str, str] = {}
        self._epsilons: dict = {}

    def state(self) -> dict[str, torch.Tensor]:
        state = {name: stored_value(p).clone() for name, p in self.engine.parameters.items()}
        if self.held is not None:
            state.update({f"held:{k}": v.detach().clone() for k, v in self.held().items()})
        return state

    def epsilon(self) -> float | None:
        """engine.epsilon(), asked once per privacy history (it is a function of the history and
        the steps taken, so a step accounted by mistake is a new key)."""
        if not self.engine.plan.accounts:
            return None
        key = (tuple(self.engine.accountant.segments), self.engine.steps_taken)
        if key not in self._epsilons:
            self._epsilons[key] = self.engine.epsilon()
        return self._epsilons[key]

    def with_gradient(self) -> list[str]:
        names = [n for n, p in self.engine.parameters.items() if p.grad is not None]
        names += [f"model:{n}" for n, p in self.model.named_parameters() if p.requires_grad and p.grad is not None]
        return names

    def refused(self, label: str, attempt: Callable[[], object], match: str = FOREIGN) -> bool:
        """Run ``attempt``: it must raise ForeignGradientError (message containing ``match``) and
        leave the parameters, steps, epsilon and gradients as they were."""
        before, steps, epsilon = self.state(), self.engine.steps_taken, self.epsilon()
        problems = []
        try:
            attempt()
        except ForeignGradientError as error:
            if not re.search(match, str(error)):
                problems.append(f"refused, but the message {str(error)[:300]!r} lacks {match!r}")
        except Exception as error:  # noqa: BLE001 - anything else is what the test reports
            problems.append(f"raised {type(error).__name__} instead of ForeignGradientError: {str(error)[:400]}"
                            f"\n{traceback.format_exc()[-1500:]}")
        else:
            problems.append("not refused: it ran to the end")
        problems += self.unchanged(before, steps, epsilon)
        self.results[label] = "; ".join(problems) or "ok"
        return not problems

    def unchanged(self, before: dict[str, torch.Tensor], steps: int, epsilon: float | None) -> list[str]:
        problems = []
        after = self.state()
        moved = [name for name in before if not torch.equal(before[name], after[name])]
        if moved:
            problems.append(f"moved: {moved[:6]}")
        if self.engine.steps_taken != steps:
            problems.append(f"steps_taken {steps} -> {self.engine.steps_taken}")
        if self.epsilon() != epsilon:
            problems.append(f"epsilon {epsilon} -> {self.epsilon()}")
        grads = self.with_gradient()
        if grads:
            problems.append(f"p.grad set on {grads[:6]}")
        return problems

    def check(self, label: str, run: Callable[[], object]) -> bool:
        """A legit action (a step after the paths, an empty step): it must not raise, and
        ``run`` may return a list of problems."""
        try:
            problems = run() or []
        except Exception as error:  # noqa: BLE001
            problems = [f"raised {type(error).__name__}: {str(error)[:400]}\n{traceback.format_exc()[-2000:]}"]
        self.results[label] = "; ".join(problems) or "ok"
        return not problems


def noise_only_step(probe: Probe, label: str, step: Callable[[], None], full: Callable[[torch.Tensor], torch.Tensor],
                    key: NoiseKey, lr: float = LR) -> None:
    """``step`` is an empty step (no backward since the last one), taken by plain SGD at ``lr``:
    it must be accounted, and move each parameter by exactly -lr times its keyed noise. ``full``
    gives a parameter's whole value (all-gathered where it is sharded: a collective, which every
    rank runs)."""
    engine = probe.engine

    def run() -> list[str]:
        index, std = engine.steps_taken, engine.noise_std
        old = {name: full(p).clone() for name, p in engine.parameters.items()}
        step()
        problems = [] if engine.steps_taken == index + 1 else [f"steps_taken {index} -> {engine.steps_taken}"]
        for name, p in engine.parameters.items():
            noise = torch.zeros(old[name].numel(), dtype=old[name].dtype)
            add_gaussian_noise_(noise, key, index, name, std, offset=0)
            expected = old[name].clone()
            expected.view(-1).add_(noise, alpha=-lr)
            got = full(p)
            if not torch.equal(got, expected):
                problems.append(f"{name} moved by {float((got - old[name]).abs().max()):.3g}, not by its noise "
                                f"(off by {float((got - expected).abs().max()):.3g})")
        grads = probe.with_gradient()
        if grads:
            problems.append(f"p.grad set after the step on {grads[:6]}")
        return problems

    probe.check(label, run)


# one process and data parallel: the same paths -----------------------------------------------------


def optimizer_paths(probe: Probe, model: nn.Module, ids: torch.Tensor, key: NoiseKey, full, *,
                    step: Callable[[], None], inner: nn.Module | None = None) -> None:
    """The paths of an engine with an attached torch optimizer (local, DDP, FSDP2): ``model`` is
    what the user calls forward on (a DDP wrapper's inner module is ``inner``), ``step`` the user's
    close of a logical step (engine.step())."""
    engine, backward = probe.engine, probe.engine.backward
    inner = inner if inner is not None else model
    embedding = inner.get_input_embeddings()

    # plain: the model's own batch-mean loss
    probe.refused("plain", lambda: model(input_ids=ids, labels=ids).loss.backward(), AT_OUTPUT)

    # aux: the engine's backward, then an auxiliary loss of the same forward on its own
    losses, out = lm_losses(model, ids)
    backward(losses)
    held = {name: value.clone() for name, value in _local_sums(engine).items()}
    probe.refused("aux", lambda: out.logits.float().pow(2).mean().backward(), AT_OUTPUT)
    probe.check("aux: the sums of the engine's backward are kept", lambda: _same_sums(engine, held))
    step()

    # aux before the engine's backward, on a retained graph (a hidden-state penalty): refused, and
    # the engine's backward on that forward still runs
    losses, out = lm_losses(model, ids, output_hidden_states=True)
    probe.refused("aux_retained", lambda: out.hidden_states[1].pow(2).mean().backward(retain_graph=True),
                  AT_OUTPUT)
    probe.check("aux_retained: the engine's backward still runs", lambda: backward(losses))
    step()

    # shared: a second forward through the input embedding (tied to the head in GPT-2)
    losses, out = lm_losses(model, ids)
    backward(losses)
    probe.refused("shared_embedding", lambda: embedding(ids).pow(2).mean().backward(), AT_OUTPUT)
    probe.refused("shared_head", lambda: inner.lm_head(embedding(ids)).mean().backward(), AT_OUTPUT)
    step()

    # optimizer: not attached, stepped after engine.backward
    losses, _ = lm_losses(model, ids)
    backward(losses)
    foreign = torch.optim.SGD(list(engine.parameters.values()), lr=1.0)
    probe.refused("optimizer", foreign.step, NOT_ATTACHED)
    adam = torch.optim.Adam(list(engine.parameters.values()), lr=1.0)
    probe.refused("optimizer_adam", adam.step, "Adam " + NOT_ATTACHED)
    before = probe.state()
    probe.check("optimizer: the attached optimizer then steps",
                lambda: _moved_by_step(probe, step, before))

    # then_step: a refused plain backward, then engine.step(): an empty step, noise alone
    probe.refused("then_step", lambda: model(input_ids=ids, labels=ids).loss.backward(), AT_OUTPUT)
    noise_only_step(probe, "then_step: engine.step() is an empty step", step, full, key)


def poison_paths(probe: Probe, model: nn.Module, ids: torch.Tensor, *, step: Callable[[], None],
                 evaluate: nn.Module | None = None, at_step: bool = False) -> None:
    """Last: a gradient that reaches a parameter itself (no recorded forward to stop it) is
    refused there, and the engine takes no further backward or step. ``model`` holds the modules
    (a DDP wrapper's inner module), ``evaluate`` what the evaluation forward runs (the wrapper).
    at_step: FSDP2, whose own post-backward (which reduces into the sharded parameters the hooks
    are on) no longer runs once a refusal stopped a backward midway: the stray gradient left on
    the registered parameter is refused at the step instead, before anything moves."""
    backward = probe.engine.backward
    embedding = model.get_input_embeddings()
    with torch.no_grad():  # an evaluation forward: nothing is recorded, so no output is guarded
        (evaluate or model)(input_ids=ids)
    if at_step:
        probe.refused("param_hook", lambda: (embedding(ids).pow(2).mean().backward(), step()),
                      AT_PARAMETER + "|hold gradients that engine.backward did not write")
    else:
        probe.refused("param_hook", lambda: embedding(ids).pow(2).mean().backward(), AT_PARAMETER)
    probe.refused("param_hook: later backward refused", lambda: backward(lm_losses(model, ids)[0]), EARLIER)
    probe.refused("param_hook: later step refused", step, EARLIER)


def _local_sums(engine: PrivacyEngine) -> dict[str, torch.Tensor]:
    try:
        return dict(engine.clipped_sums())
    except Exception:  # noqa: BLE001 - FSDP2 holds no local sums whole: nothing to compare
        return {}


def _same_sums(engine: PrivacyEngine, held: dict[str, torch.Tensor]) -> list[str]:
    now = _local_sums(engine)
    changed = [name for name in held if not torch.equal(held[name], now[name])]
    return [f"the clipped sums changed: {changed[:6]}"] if changed else []


def _moved_by_step(probe: Probe, step: Callable[[], None], before: dict[str, torch.Tensor]) -> list[str]:
    steps = probe.engine.steps_taken
    step()
    after = probe.state()
    problems = [] if probe.engine.steps_taken == steps + 1 else [f"steps_taken {steps} -> {probe.engine.steps_taken}"]
    still = [name for name in before if torch.equal(before[name], after[name]) and after[name].numel()]
    if still:
        problems.append(f"did not move: {still[:6]}")
    grads = probe.with_gradient()
    if grads:
        problems.append(f"p.grad set after the step on {grads[:6]}")
    return problems


def local_run(kind: str) -> dict[str, str]:
    """One process, LocalBackend: every path on a tiny GPT-2 or Llama."""
    model = causal_lm(kind)
    engine = PrivacyEngine(model, config(), noise_key=KEY)
    engine.attach_optimizer(torch.optim.SGD(engine.parameters.values(), lr=LR))
    probe = Probe(engine)
    ids = token_batch(1)
    optimizer_paths(probe, model, ids, KEY, lambda p: p.detach(), step=engine.step)
    probe.check("a legit step after the paths", lambda: _legit_step(probe, model, ids, engine.step))
    poison_paths(probe, model, ids, step=engine.step)
    engine.detach()
    return probe.results


def _legit_step(probe: Probe, model: nn.Module, ids: torch.Tensor, step, backward=None) -> list[str]:
    losses, _ = lm_losses(model, ids)
    (backward or probe.engine.backward)(losses)
    return _moved_by_step(probe, step, probe.state())


def accelerate_run(kind: str = "gpt2") -> dict[str, str]:
    """One process under Accelerate: ``accelerator.backward(loss)`` on the prepared model, alone and
    after the engine's backward."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from dpscale.integrations.accelerate import make_private

    accelerator = Accelerator(cpu=True)
    try:
        model = causal_lm(kind)
        model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR))
        engine = make_private(accelerator, model, optimizer, config(), noise_key=KEY)
        probe = Probe(engine)
        accelerate_paths(probe, accelerator, engine.model, token_batch(2), optimizer)
        engine.detach()
        return probe.results
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def accelerate_paths(probe: Probe, accelerator, model: nn.Module, ids: torch.Tensor, optimizer) -> None:
    engine = probe.engine

    def step() -> None:
        optimizer.step()  # Accelerate's AcceleratedOptimizer: the attached optimizer's step
        optimizer.zero_grad()

    probe.refused("accelerator", lambda: accelerator.backward(model(input_ids=ids, labels=ids).loss), AT_OUTPUT)
    losses, out = lm_losses(model, ids)
    engine.backward(losses)
    probe.refused("accelerator_aux", lambda: accelerator.backward(out.logits.float().pow(2).mean()), AT_OUTPUT)
    probe.check("accelerator: a legit step after", lambda: _moved_by_step(probe, step, probe.state()))
    probe.refused("accelerator: then_step", lambda: accelerator.backward(model(input_ids=ids, labels=ids).loss),
                  AT_OUTPUT)
    steps = engine.steps_taken
    probe.check("accelerator: the empty step is taken",
                lambda: [] if (step(), engine.steps_taken)[1] == steps + 1 else [f"steps {engine.steps_taken}"])


# two processes ----------------------------------------------------------------------------------


def _same_on_every_rank(tensors: dict[str, torch.Tensor]) -> list[str]:
    import torch.distributed as dist

    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors.values()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return [] if all(torch.equal(gathered[0], g) for g in gathered) else ["the ranks' parameters differ"]


def ddp_run(spec: dict, rank: int) -> dict[str, str]:
    """2 processes, DistributedDataParallel (DataParallelBackend): every path; then a second model
    prepared by Accelerate for accelerator.backward."""
    key = NoiseKey.from_file(spec["key"])
    model = causal_lm("gpt2")
    ddp = nn.parallel.DistributedDataParallel(model)
    engine = PrivacyEngine(ddp, config(), noise_key=spec["key"])
    assert type(engine.backend).__name__ == "DataParallelBackend", type(engine.backend)
    engine.attach_optimizer(torch.optim.SGD(engine.parameters.values(), lr=LR))
    probe = Probe(engine)
    ids = token_batch(10 + rank)  # each rank its own examples
    optimizer_paths(probe, ddp, ids, key, lambda p: p.detach(), step=engine.step, inner=model)
    probe.check("a legit step after the paths", lambda: _legit_step(probe, ddp, ids, engine.step))
    probe.check("the ranks hold the same parameters", lambda: _same_on_every_rank(dict(engine.parameters)))
    poison_paths(probe, ddp.module, ids, step=engine.step, evaluate=ddp)
    engine.detach()
    results = {f"ddp {label}": value for label, value in probe.results.items()}

    from accelerate import Accelerator

    from dpscale.integrations.accelerate import make_private

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2, accelerator.num_processes
    model = causal_lm("llama")
    prepared, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR))
    engine = make_private(accelerator, prepared, optimizer, config(), noise_key=spec["key"])
    probe = Probe(engine)
    accelerate_paths(probe, accelerator, prepared, token_batch(20 + rank), optimizer)
    probe.check("the ranks hold the same parameters", lambda: _same_on_every_rank(dict(engine.parameters)))
    engine.detach()
    results.update({f"accelerate {label}": value for label, value in probe.results.items()})
    return results


def fsdp2_run(spec: dict, rank: int) -> dict[str, str]:
    """2 processes, fully_shard on the (untied) embedding, each Llama decoder layer, the head and
    the root (FSDP2Backend), as Accelerate's FSDP2 wraps it: the embedding and the head are units of
    their own, so that calling them again outside the model's forward gathers them (a module inside
    another unit holds only its shard there, and torch refuses the call)."""
    from torch.distributed.fsdp import fully_shard

    key = NoiseKey.from_file(spec["key"])
    model = causal_lm("llama", tied=False)
    for unit in [model.model.embed_tokens, *model.model.layers, model.lm_head]:
        fully_shard(unit)
    fully_shard(model)
    engine = PrivacyEngine(model, config(), noise_key=spec["key"])
    assert type(engine.backend).__name__ == "FSDP2Backend", type(engine.backend)
    engine.attach_optimizer(torch.optim.SGD(engine.parameters.values(), lr=LR))
    probe = Probe(engine)
    ids = token_batch(30 + rank)
    optimizer_paths(probe, model, ids, key, lambda p: p.detach().full_tensor(), step=engine.step)
    probe.check("a legit step after the paths", lambda: _legit_step(probe, model, ids, engine.step))
    probe.check("the ranks hold the same parameters",
                lambda: _same_on_every_rank({n: p.detach().full_tensor() for n, p in engine.parameters.items()}))
    poison_paths(probe, model, ids, step=engine.step, at_step=True)
    engine.detach()
    return {f"fsdp2 {label}": value for label, value in probe.results.items()}


# DeepSpeed ----------------------------------------------------------------------------------------


def deepspeed_run(spec: dict, rank: int) -> dict[str, str]:
    """2 processes, DeepSpeed ZeRO-2 and ZeRO-3 in turn, the model and config of
    tests/deepspeed_worker.py; the PrivacyEngine built on the DeepSpeedEngine itself. Two engines a
    stage: every path (``deepspeed_paths``), then a fresh one for the gradient that reaches a
    parameter outside an accumulation block (``deepspeed_parameter_outside_block``)."""
    import deepspeed

    from tests.deepspeed_worker import ds_config, make_model

    results = {}
    g = torch.Generator().manual_seed(40 + rank)
    x, y = torch.randn(B, 6, generator=g), torch.randn(B, 3, generator=g)
    for stage in spec["stages"]:
        for paths in (deepspeed_paths, deepspeed_parameter_outside_block):
            model = make_model()
            ds_engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                                 config=ds_config(stage, False, {}))
            engine = PrivacyEngine(ds_engine, config(expected_batch_size=8), noise_key=spec["key"])
            assert type(engine.backend).__name__ == "DeepSpeedBackend", type(engine.backend)
            base = engine.backend.own_optimizers[0]
            probe = Probe(engine, held=lambda base=base: {f"{i}.{j}": p for i, group in enumerate(base.param_groups)
                                                           for j, p in enumerate(group["params"])})
            paths(probe, ds_engine, x, y)
            results.update({f"zero{stage} {label}": value for label, value in probe.results.items()})
            engine.detach()
            ds_engine.destroy()
    return results


def deepspeed_paths(probe: Probe, ds_engine, x: torch.Tensor, y: torch.Tensor) -> None:
    """Inside ``with backend.accumulation():`` a refusal is tried both ways: caught inside the block
    (the block then ends as usual) and raised out of it, as in the user's loop, where DeepSpeed's
    reduction on the block's exit must not hide it."""
    engine, backend, module = probe.engine, probe.engine.backend, ds_engine.module

    def per_example(out: torch.Tensor) -> torch.Tensor:
        return (out - y).pow(2).sum(1)

    def mean_loss(out: torch.Tensor) -> torch.Tensor:
        return (out - y).pow(2).mean()

    def legit_step() -> list[str]:
        steps = engine.steps_taken
        with backend.accumulation():
            engine.backward(per_example(module(x)))
        ds_engine.step()
        return [] if engine.steps_taken == steps + 1 else [f"steps_taken {steps} -> {engine.steps_taken}"]

    # plain: outside the block, caught inside it, raised out of it
    probe.refused("plain", lambda: mean_loss(module(x)).backward(), AT_OUTPUT)
    with backend.accumulation():
        probe.refused("plain in the accumulation block", lambda: mean_loss(module(x)).backward(), AT_OUTPUT)
        engine.backward(per_example(module(x)))
    ds_engine.step()
    probe.check("a legit step after plain", lambda: [] if engine.steps_taken == 1 else [f"steps {engine.steps_taken}"])
    probe.refused("plain raised out of the accumulation block",
                  lambda: _in_block(backend, lambda: mean_loss(module(x)).backward()), AT_OUTPUT)
    probe.check("a legit step after plain raised out of the block", legit_step)

    # ds_engine: its own backward, on its own forward
    probe.refused("ds_engine.backward", lambda: ds_engine.backward(mean_loss(ds_engine(x))), AT_OUTPUT)
    probe.check("a legit step after ds_engine.backward", legit_step)

    # aux: the engine's backward, then an auxiliary loss of the same forward, plainly and by DeepSpeed
    with backend.accumulation():
        out = module(x)
        engine.backward(per_example(out))
        probe.refused("aux", lambda: out.pow(2).mean().backward(), AT_OUTPUT)
        out = module(x)
        engine.backward(per_example(out))
        probe.refused("aux by ds_engine.backward", lambda: ds_engine.backward(out.pow(2).mean()), AT_OUTPUT)
    ds_engine.step()

    # shared: the first layer called again
    with backend.accumulation():
        engine.backward(per_example(module(x)))
        probe.refused("shared_first_layer", lambda: module[0](x).pow(2).mean().backward(), AT_OUTPUT)
    ds_engine.step()

    # optimizer: a torch optimizer over the module's parameters, not DeepSpeed's own
    with backend.accumulation():
        engine.backward(per_example(module(x)))
        foreign = torch.optim.SGD(list(engine.parameters.values()), lr=1.0)
        probe.refused("optimizer", foreign.step, NOT_ATTACHED)
    ds_engine.step()

    # then_step: the refused backward, then the step (an empty one, every rank alike)
    with backend.accumulation():
        probe.refused("then_step", lambda: mean_loss(module(x)).backward(), AT_OUTPUT)
    steps = engine.steps_taken
    probe.check("then_step: the empty step is taken",
                lambda: [] if (engine.step(), engine.steps_taken)[1] == steps + 1 else [f"steps {engine.steps_taken}"])
    probe.check("a legit step after the paths", legit_step)
    probe.check("the ranks hold the same parameters", lambda: _same_on_every_rank(_deepspeed_full(ds_engine)))

    # param_hook, last: no recorded forward, in the user's loop; DeepSpeed's own gradient hooks see
    # the gradient before the engine's parameter hook refuses it
    with torch.no_grad():
        module(x)
    probe.refused("param_hook", lambda: _in_block(backend, lambda: module[0](x).pow(2).mean().backward()),
                  AT_PARAMETER)
    probe.refused("param_hook: later backward refused",
                  lambda: _in_block(backend, lambda: engine.backward(per_example(module(x)))), EARLIER)


def deepspeed_parameter_outside_block(probe: Probe, ds_engine, x: torch.Tensor, y: torch.Tensor) -> None:
    """A gradient that reaches a parameter outside ``backend.accumulation()`` (after a legit step
    and an evaluation forward): DeepSpeed's own gradient hook, which runs before the engine's, takes
    the parameter into its reduction bucket there. The refusal must still be a ForeignGradientError,
    and so must the refusal of every later backward, also when it leaves an accumulation block
    (whose exit runs DeepSpeed's reduction)."""
    engine, backend, module = probe.engine, probe.engine.backend, ds_engine.module
    with backend.accumulation():
        engine.backward((module(x) - y).pow(2).sum(1))
    ds_engine.step()
    with torch.no_grad():
        module(x)
    probe.refused("param_hook outside the accumulation block", lambda: module[0](x).pow(2).mean().backward(),
                  AT_PARAMETER)
    probe.refused("param_hook outside: later backward refused, outside a block",
                  lambda: engine.backward((module(x) - y).pow(2).sum(1)), EARLIER)
    probe.refused("param_hook outside: later backward refused, in a block",
                  lambda: _in_block(backend, lambda: engine.backward((module(x) - y).pow(2).sum(1))), EARLIER)


def _in_block(backend, run) -> None:
    with backend.accumulation():
        run()


def _deepspeed_full(ds_engine) -> dict[str, torch.Tensor]:
    """The module's whole parameters (gathered under ZeRO-3; every rank takes part)."""
    import deepspeed

    params = dict(ds_engine.module.named_parameters())
    gather = deepspeed.zero.GatheredParameters(list(params.values())) if ds_engine.zero_optimization_stage() == 3 \
        else contextlib.nullcontext()
    with gather:
        return {name: p.detach().clone() for name, p in params.items()}


# entry ------------------------------------------------------------------------------------------


def main() -> None:
    torch.set_num_threads(1)
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    rank = int(os.environ["RANK"])
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=spec.get("timeout_s", 60))
    if spec["setting"] == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    run = {"ddp": ddp_run, "fsdp2": fsdp2_run, "deepspeed": deepspeed_run}[spec["setting"]]
    try:
        results = run(spec, rank)
    except Exception:  # noqa: BLE001 - a crash between paths is a result too
        results = {"crashed": traceback.format_exc()[-4000:]}
    with open(os.path.join(spec["out"], f"rank{rank}.json"), "w") as f:
        json.dump(results, f, indent=1)
    from tests.worker_exit import finish

    finish()


if __name__ == "__main__":
    main()
