"""Every backward but ``engine.backward`` and every optimizer the engine does not know is refused as
it happens, in every setting, with nothing moved: a dpscale ``ForeignGradientError`` naming what
happened, the parameters bit-identical to a snapshot taken just before, the steps and epsilon
unchanged, and no ``p.grad`` on any trainable parameter. The paths and the checks are in
tests/foreign_worker.py (its docstring lists them); here each setting runs them all, in one
process or in one 2-process launch, and every path must come back "ok":

* one process, the local backend, a tiny GPT-2 (tied embedding) and a tiny Llama;
* one process under Accelerate (``accelerator.backward``);
* DPTrainer: a plain backward from a callback, ``accelerator.backward`` and a plain backward of an
  auxiliary loss inside a ``training_step`` override; the error reaches ``trainer.train()``'s caller;
* 2 processes over gloo: DDP (and Accelerate's DDP), DeepSpeed ZeRO-2 and ZeRO-3, FSDP2;
* and the guards themselves: an engine never detached is collected with its model, leaving no
  guard behind to break a later optimizer's step.

Where a setting's paths split into two tests (DeepSpeed, FSDP2), the second holds the case that
fails for a reason of its own, named in its docstring; both read the same launch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dpscale import ForeignGradientError
from dpscale.noise import NoiseKey
from tests import foreign_worker as worker
from tests.launcher import launch_workers

WORKER = Path(__file__).resolve().parent / "foreign_worker.py"

# The paths each setting must have run (besides the checks between them).
OPTIMIZER_PATHS = {"plain", "aux", "aux_retained", "shared_embedding", "shared_head", "optimizer", "optimizer_adam",
                   "then_step", "then_step: engine.step() is an empty step", "a legit step after the paths",
                   "param_hook", "param_hook: later backward refused", "param_hook: later step refused"}
ACCELERATE_PATHS = {"accelerator", "accelerator_aux", "accelerator: then_step", "accelerator: the empty step is taken"}
DEEPSPEED_PATHS = {"plain", "plain in the accumulation block", "plain raised out of the accumulation block",
                   "a legit step after plain raised out of the block", "ds_engine.backward", "aux",
                   "aux by ds_engine.backward",
                   "shared_first_layer", "optimizer", "then_step", "then_step: the empty step is taken",
                   "a legit step after the paths", "the ranks hold the same parameters", "param_hook",
                   "param_hook: later backward refused", "param_hook outside the accumulation block",
                   "param_hook outside: later backward refused, outside a block",
                   "param_hook outside: later backward refused, in a block"}


def assert_all_ok(results: dict[str, str], expected: set[str], where: str = "") -> None:
    missing = expected - set(results)
    assert not missing, f"{where}: these paths did not run: {sorted(missing)}\n{json.dumps(results, indent=1)[-6000:]}"
    failed = {label: outcome for label, outcome in results.items() if outcome != "ok"}
    assert not failed, f"{where}: " + "\n".join(f"[{label}] {outcome}" for label, outcome in failed.items())


def launch(setting: str, directory: Path, timeout: float, **spec) -> list[dict[str, str]]:
    """Both ranks of ``setting``; each must exit cleanly and report its paths."""
    key = directory / "noise.key"
    NoiseKey.write_new(key)
    results = launch_workers(WORKER, {"setting": setting, "key": str(key), **spec}, directory, world_size=2,
                             timeout=timeout, env={"DS_ACCELERATOR": "cpu"})
    reports = []
    for rank, (code, err) in enumerate(results):
        report = directory / f"rank{rank}.json"
        assert report.is_file(), f"rank {rank} wrote no report (exit {code}):\n{err[-4000:]}"
        reports.append(json.loads(report.read_text()))
        assert "crashed" not in reports[-1], f"rank {rank} crashed between paths:\n{reports[-1]['crashed']}"
        assert code == 0, f"rank {rank} exited with {code}:\n{err[-4000:]}"
    return reports


# one process ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_local_backend_refuses_every_foreign_path(kind):
    assert_all_ok(worker.local_run(kind), OPTIMIZER_PATHS, kind)


def test_accelerator_backward_is_refused():
    assert_all_ok(worker.accelerate_run(), ACCELERATE_PATHS, "accelerate")


def test_an_engine_never_detached_is_collected_and_leaves_no_guard_behind():
    """What dpscale.gradient_guard promises of its guards: the optimizer guard holds its engine
    through a weak reference and removes itself once the engine is collected, so that engines come
    and go without detach() (a DPTrainer never detaches its engine). Dropped with their models, two
    engines must be collected, and an unrelated optimizer stepped afterwards must step."""
    import gc
    import weakref

    from torch.optim import optimizer as torch_optimizer

    from dpscale import DPConfig, PrivacyEngine

    hooks = torch_optimizer._global_optimizer_pre_hooks
    before = set(hooks)

    def dropped() -> weakref.ref:
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        engine = PrivacyEngine(model, DPConfig(max_grad_norm=1.0, expected_batch_size=2, noise_multiplier=1.0),
                               noise_key=worker.KEY)
        engine.attach_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
        engine.backward(model(torch.randn(2, 3)).pow(2).sum(1))
        return weakref.ref(engine)

    try:
        engines = [dropped(), dropped()]
        gc.collect()
        other = torch.nn.Linear(3, 2)
        optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
        other(torch.randn(2, 3)).sum().backward()
        problems = []
        try:
            optimizer.step()
        except RuntimeError as error:
            problems.append(f"an unrelated optimizer's step raised {error!r} (a collected engine's guard removed "
                            "itself while torch iterated over its global optimizer pre-hooks)")
        alive = sum(ref() is not None for ref in engines)
        if alive:
            problems.append(f"{alive} of 2 dropped engines (and their models) were not collected; their guards "
                            f"stay registered ({len(set(hooks) - before)} global optimizer pre-hooks left)")
        assert not problems, "; ".join(problems)
    finally:
        for key in set(hooks) - before:  # leave no guard to the next tests, whatever happened
            del hooks[key]


# DPTrainer --------------------------------------------------------------------------------------


def _trainer_with_foreign_backward(tmp_path: Path, how: str):
    """A DPTrainer whose second step runs a foreign backward (after its first step was taken):
    ``callback`` (a plain ``loss.backward()`` in ``on_step_begin``), ``accelerator`` (a
    ``training_step`` override that calls ``self.accelerator.backward`` on an auxiliary loss after the
    engine's backward), ``plain`` (the same with ``loss.backward()``). The trainer records the
    parameters, steps and epsilon just before the foreign call."""
    from transformers import TrainerCallback

    from dpscale.integrations.trainer import DPTrainer
    from tests import trainer_worker as tw

    ids = tw.TokenDataset().ids[:2]
    seen: dict = {}

    def snapshot(trainer) -> None:
        engine = trainer.privacy_engine
        seen.update(params={n: p.detach().clone() for n, p in engine.parameters.items()},
                    steps=engine.steps_taken, epsilon=engine.epsilon())

    class ForeignTrainer(DPTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            if how != "callback" and self.state.global_step == 1:
                snapshot(self)
                aux = self.privacy_engine.model(input_ids=ids).logits.pow(2).mean()
                seen["called"] = True
                self.accelerator.backward(aux) if how == "accelerator" else aux.backward()
            return loss

    class PlainBackward(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if how == "callback" and state.global_step == 1:
                snapshot(trainer)
                seen["called"] = True
                model(input_ids=ids, labels=ids).loss.backward()

    spec = {"dtype": "float64", "steps": 3}
    trainer = ForeignTrainer(model=tw.gpt2(), args=tw.training_arguments(spec, str(tmp_path)),
                             train_dataset=tw.TokenDataset(), data_collator=tw.collate, dp_config=tw.config(spec),
                             noise_key=tw.KEY, callbacks=[PlainBackward()])
    return trainer, seen


@pytest.mark.parametrize("how", ["callback", "accelerator", "plain"])
def test_dptrainer_refuses_a_foreign_backward_and_the_error_reaches_the_user(tmp_path, how):
    trainer, seen = _trainer_with_foreign_backward(tmp_path, how)
    with pytest.raises(ForeignGradientError, match=worker.AT_OUTPUT):
        trainer.train()
    assert seen.get("called"), "the foreign backward never ran"
    engine = trainer.privacy_engine
    assert seen["steps"] == 1 and seen["epsilon"] > 0, "the foreign backward must come after a step was taken"
    assert engine.steps_taken == seen["steps"] and engine.epsilon() == seen["epsilon"]
    assert trainer.state.global_step == 1
    for name, p in engine.parameters.items():
        assert torch.equal(p.detach(), seen["params"][name]), f"{name} moved"
        assert p.grad is None, f"{name} has a gradient"
    assert all(p.grad is None for p in trainer.model.parameters())


# two processes ----------------------------------------------------------------------------------
# One launch per setting (a module-scoped fixture); the tests below read its reports.


@pytest.mark.slow
def test_ddp_and_accelerate_refuse_every_foreign_path(tmp_path):
    expected = {f"ddp {label}" for label in OPTIMIZER_PATHS | {"the ranks hold the same parameters"}}
    expected |= {f"accelerate {label}" for label in ACCELERATE_PATHS | {"the ranks hold the same parameters"}}
    for rank, results in enumerate(launch("ddp", tmp_path, timeout=120.0)):
        assert_all_ok(results, expected, f"DDP rank {rank}")


STAGES = [2, 3]
# DeepSpeed's own gradient hook runs before the engine's: a gradient reaching a parameter outside an
# accumulation block is taken into DeepSpeed's reduction bucket before it is refused.
DEEPSPEED_OUTSIDE = {"param_hook outside the accumulation block",
                     "param_hook outside: later backward refused, outside a block",
                     "param_hook outside: later backward refused, in a block"}


@pytest.fixture(scope="module")
def deepspeed_reports(tmp_path_factory) -> list[dict[str, str]]:
    pytest.importorskip("deepspeed")
    return launch("deepspeed", tmp_path_factory.mktemp("deepspeed"), timeout=180.0, stages=STAGES)


@pytest.mark.slow
def test_deepspeed_zero2_and_zero3_refuse_every_foreign_path(deepspeed_reports):
    outside = {f"zero{stage} {label}" for stage in STAGES for label in DEEPSPEED_OUTSIDE}
    expected = {f"zero{stage} {label}" for stage in STAGES for label in DEEPSPEED_PATHS} - outside
    for rank, results in enumerate(deepspeed_reports):  # every result but the next test's
        assert_all_ok({k: v for k, v in results.items() if k not in outside}, expected, f"DeepSpeed rank {rank}")


@pytest.mark.slow
def test_deepspeed_refusals_after_a_parameter_gradient_outside_a_block_stay_foreign_gradient_errors(deepspeed_reports):
    """The engine refuses the gradient at the parameter and every later backward (it may be in
    DeepSpeed's buckets); leaving an accumulation block with that refusal must not end in an error of
    DeepSpeed's own (its reduction on the block's exit finds the refused parameter without a
    gradient) that hides the ForeignGradientError."""
    expected = {f"zero{stage} {label}" for stage in STAGES for label in DEEPSPEED_OUTSIDE}
    for rank, results in enumerate(deepspeed_reports):
        assert_all_ok({k: v for k, v in results.items() if k in expected}, expected, f"DeepSpeed rank {rank}")


FSDP2_PARAMETER = {"param_hook", "param_hook: later backward refused", "param_hook: later step refused"}


@pytest.fixture(scope="module")
def fsdp2_reports(tmp_path_factory) -> list[dict[str, str]]:
    return launch("fsdp2", tmp_path_factory.mktemp("fsdp2"), timeout=150.0)


@pytest.mark.slow
def test_fsdp2_refuses_every_foreign_path(fsdp2_reports):
    parameter = {f"fsdp2 {label}" for label in FSDP2_PARAMETER}
    expected = {f"fsdp2 {label}" for label in OPTIMIZER_PATHS | {"the ranks hold the same parameters"}} - parameter
    for rank, results in enumerate(fsdp2_reports):  # every result but the next test's
        assert_all_ok({k: v for k, v in results.items() if k not in parameter}, expected, f"FSDP2 rank {rank}")


@pytest.mark.slow
def test_fsdp2_refuses_a_gradient_reaching_a_parameter_after_refused_backwards(fsdp2_reports):
    """FSDP2 runs the forward on unsharded parameters of its own, so autograd accumulates there,
    not into the sharded parameters the engine's hooks are on; FSDP2 calls those hooks itself when
    its post-backward reduces the gradient, which it no longer does once an earlier refusal stopped
    a backward midway. The embedding called after an evaluation forward and back-propagated plainly
    is then refused at the step (a gradient the engine did not write), before anything moves, and
    the engine takes no further step."""
    expected = {f"fsdp2 {label}" for label in FSDP2_PARAMETER}
    for rank, results in enumerate(fsdp2_reports):
        assert_all_ok({k: v for k, v in results.items() if k in expected}, expected, f"FSDP2 rank {rank}")
