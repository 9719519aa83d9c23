"""Every bad input dpscale refuses before (or instead of) a training step, as data: what is tried,
the dpscale error it must raise and a fragment of its message. tests/test_bad_inputs.py runs every
case and checks that the table in docs/RELIABILITY.md is the one rendered here from the errors the
cases really raise. After adding a case or changing a message, regenerate the table:

    PYTHONPATH=. python -m tests.bad_inputs --write
"""

from __future__ import annotations

import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

import dpscale
from dpscale import (
    CheckpointError,
    ConfigError,
    DataError,
    DPConfig,
    DPScaleError,
    ForeignGradientError,
    LossShapeError,
    NoTrainableParametersError,
    PrivacyBudgetError,
    PrivacyEngine,
    SamplingError,
    StepBoundaryError,
    TapeError,
    UnsupportedModuleError,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "RELIABILITY.md"
START, END = "<!-- bad-inputs:start -->", "<!-- bad-inputs:end -->"


@dataclass(frozen=True)
class Case:
    id: str
    area: str
    input: str  # what the user gives, as the table shows it
    perform: Callable[[], object]
    error: type
    fragment: str  # a piece of the message that says what is wrong or what to change


# building blocks --------------------------------------------------------------------------------

BASE = {"max_grad_norm": 1.0, "expected_batch_size": 4, "noise_multiplier": 1.0}


def config(**changes) -> DPConfig:
    return DPConfig(**{**BASE, **changes})


def engine_with(**changes) -> PrivacyEngine:
    return PrivacyEngine(mlp(), config(**changes))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def bound(model: nn.Module, **changes) -> PrivacyEngine:
    trainable = [p for p in model.parameters() if p.requires_grad]
    return PrivacyEngine(model, config(**changes), optimizer=torch.optim.SGD(trainable, lr=0.1))


def x(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 4)


def backward_of(losses: Callable[[nn.Module], torch.Tensor], model: nn.Module | None = None) -> None:
    model = model if model is not None else mlp()
    engine = bound(model)
    engine.backward(losses(model))


def changed_model(change: Callable[[nn.Sequential], None]) -> None:
    """Build the engine, change the model, then take a step."""
    model = mlp()
    model.add_module("head", nn.Linear(2, 2))
    engine = bound(model)
    change(model)
    engine.backward(model(x()).sum(1))


def unfrozen_after_build() -> None:
    model = mlp()
    model[0].requires_grad_(False)
    engine = bound(model)
    model[0].requires_grad_(True)
    engine.backward(model(x()).sum(1))


def tied_after_build() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    engine = bound(model)
    model[2].weight = model[0].weight
    engine.backward(model(x()).sum(1))


def adambc_unattached() -> None:
    model = mlp()
    optimizer = dpscale.DPAdamBC(model.parameters(), lr=1e-3)
    model(x()).sum().backward()
    optimizer.step()


def run_steps_on_plain_loader(**changes) -> None:
    """``dpscale.run_steps`` given a plain DataLoader instead of the engine's loader."""
    model = mlp()
    engine = bound(model, dataset_size=16, **changes)
    plain = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 4)), batch_size=4)
    dpscale.run_steps(engine, plain, lambda micro: model(micro[0]).sum(1), progress=False)


def loader(**changes):
    from dpscale import DPDataLoader

    kwargs = {"sample_rate": 0.5, "max_physical_batch_size": 2, **changes}
    dataset = kwargs.pop("dataset", list(range(10)))
    return DPDataLoader(dataset, **kwargs)


class TwoBranches(nn.Module):
    """A parent that reads a child's weight without calling the child."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, inputs):
        return self.head(inputs @ self.proj.weight.T)


class NoisyScale(nn.Module):
    """A module without a rule (the torch.func fallback) that draws random numbers."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, inputs):
        return nn.functional.dropout(inputs * self.scale, p=0.5, training=True)


def batch_norm_switched_to_training() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    PrivacyEngine(model, config())
    model.train()
    model(x())


def stale_losses() -> None:
    model = mlp()
    engine = bound(model)
    stale = model(x()).sum(1)
    model(x())
    engine.backward(stale)


def two_forwards() -> None:
    model = mlp()
    engine = bound(model)
    engine.backward(model(x()).sum(1) + model(x()).sum(1))


def foreign_after_attach() -> None:
    model = mlp()
    engine = bound(model)
    engine._boundary.optimizer.add_param_group({"params": [nn.Parameter(torch.ones(2))]})
    engine.backward(model(x()).sum(1))


def unseen_step() -> None:
    model = mlp()
    engine = bound(model)
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    engine.backward(model(x()).sum(1))
    other.step()  # would consume the clipped sums without noise (it finds none, and is refused)


def plain_backward() -> None:
    model = mlp()
    bound(model)
    model(x()).sum().backward()


def auxiliary_backward() -> None:
    model = mlp()
    engine = bound(model)
    engine.backward(model(x()).sum(1))
    model(x()).pow(2).mean().backward()  # an auxiliary loss back-propagated on its own


def plain_backward_then_step() -> None:
    model = mlp()
    engine = bound(model)
    try:
        model(x()).sum().backward()
    except DPScaleError:
        pass
    engine.step()  # accepted, as an empty step: the refused gradient reached nothing
    model(x()).sum().backward()


def gradient_written_by_hand() -> None:
    model = mlp()
    engine = bound(model)
    engine.backward(model(x()).sum(1))
    model[0].weight.grad = torch.ones_like(model[0].weight)  # e.g. copied from a non-private run
    engine.step()


def parameter_read_directly() -> None:
    model = mlp()
    bound(model)
    (model(x()).sum() + model[0].weight.sum()).backward()


def unbound_backward() -> None:
    model = mlp()
    engine = PrivacyEngine(model, config())
    engine.backward(model(x()).sum(1))


def unstepped_draw() -> None:
    engine = bound(mlp(), dataset_size=16)
    batches = iter(engine.make_data_loader(list(range(16)), max_physical_batch_size=4))
    next(batches)
    next(batches)


def unsampled_backward() -> None:
    model = mlp()
    engine = bound(model, dataset_size=16)
    engine.backward(model(x()).sum(1))


def budget_spent() -> None:
    model = mlp()
    engine = bound(model, noise_multiplier=None, target_epsilon=3.0, dataset_size=16, steps=1)
    data = torch.randn(16, 4)
    for batch in engine.make_data_loader(list(range(16)), max_physical_batch_size=16, collate_fn=torch.tensor):
        for micro in batch.micro_batches:
            engine.backward(model(data[micro]).sum(1))
        engine.step()
    engine.make_data_loader(list(range(16)), max_physical_batch_size=16)
    next(iter(engine.data_loader))


def torchscript_module() -> None:
    PrivacyEngine(torch.jit.script(nn.Linear(4, 2)), config())


def trainer_arguments(**changes) -> None:
    from transformers import TrainingArguments

    from dpscale.integrations.trainer import check_training_arguments

    with tempfile.TemporaryDirectory() as folder:
        check_training_arguments(TrainingArguments(output_dir=folder, use_cpu=True, report_to="none", **changes))


def accelerator_settings(**changes) -> None:
    """Accelerate's settings as an Accelerator exposes them (a real Accelerator is process-wide
    state, which other tests in this process would inherit)."""
    from dpscale.integrations.accelerate import check_accelerator

    settings = {"distributed_type": "NO", "mixed_precision": "no", "scaler": None, "gradient_accumulation_steps": 1,
                "state": SimpleNamespace(dynamo_plugin=None), **changes}
    check_accelerator(SimpleNamespace(**settings))


def deepspeed_settings(**changes) -> None:
    """DeepSpeed's settings through the getters a DeepSpeedEngine answers them with (real engines:
    tests/test_deepspeed.py::test_deepspeed_settings_that_change_the_dp_step_are_refused)."""
    from dpscale.backends.deepspeed import check_deepspeed_config

    values = {"gradient_clipping": 0.0, "fp16_enabled": False, "gradient_accumulation_steps": 1,
              "managed_gradient_accumulation": True, **changes}
    check_deepspeed_config(SimpleNamespace(**{name: (lambda v=v: v) for name, v in values.items()}))


# dpscale train: data and reruns, in a temporary folder entered for the case, so that the messages
# name the same relative paths on every run; the model is never loaded (the refusals come first)


def in_folder(perform: Callable[[], object]) -> Callable[[], object]:
    def inside() -> object:
        import os

        here = os.getcwd()
        with tempfile.TemporaryDirectory() as folder:
            os.chdir(folder)
            try:
                return perform()
            finally:
                os.chdir(here)

    return inside


def train_run(**flags) -> None:
    from dpscale.train.config import load_config
    from dpscale.train.job import run

    run(load_config(None, {"model": "no-such-model", "output_dir": "out", **flags}))


def classification_data(values=("0", "1", "0", "1"), raw: bytes | None = None, **flags) -> None:
    Path("t.csv").write_bytes(raw or ("sentence,label\n" + "".join(f"text {i},{label}\n"
                                                                     for i, label in enumerate(values))).encode())
    train_run(task="classification", data="t.csv", **flags)


def with_eval_labels(labels) -> None:
    Path("e.csv").write_text("sentence,label\n" + "".join(f"text {i},{label}\n" for i, label in enumerate(labels)))
    classification_data(eval_data="e.csv")


def rerun(**flags) -> None:
    """A checkpoint at step 2 of the default job written with key run.key (a fixed key), then a rerun."""
    from dpscale.checkpoint import save_atomic
    from dpscale.noise import NoiseKey
    from dpscale.train.checks import check_data
    from dpscale.train.config import load_config
    from dpscale.train.rerun import job_record

    key = Path("run.key")
    key.write_text("ab" * 32 + "\n")
    key.chmod(0o600)
    first = load_config(None, {"model": "no-such-model", "output_dir": "out", "noise_key": "run.key"})
    privacy = {"steps_taken": 2, "key_fingerprint": NoiseKey.from_file(key).fingerprint}
    save_atomic({"params": {}, "optimizer": {}, "history": [], "before": {}, "step": 2, "rng": torch.get_rng_state(),
                 "privacy": privacy, "job": job_record(first, check_data(first))},
                Path("out/checkpoint/state.pt"), kind="train-state")
    train_run(**flags)


def canary_audit_without_key() -> None:
    from dpscale.audit_run import CanaryAudit

    CanaryAudit(list(range(4)), key=None)


def engine_for_steps(sigma: float) -> PrivacyEngine:
    return engine_with(noise_multiplier=sigma, dataset_size=1000, expected_batch_size=50, steps=300)


# the cases ----------------------------------------------------------------------------------

nan, inf = float("nan"), float("inf")

CASES: list[Case] = [
    # DPConfig: each field out of range, of the wrong type, or contradicting another
    Case("R_zero", "DPConfig", "`max_grad_norm=0`", lambda: config(max_grad_norm=0.0), ConfigError, "max_grad_norm"),
    Case("R_negative", "DPConfig", "`max_grad_norm=-1`", lambda: config(max_grad_norm=-1.0), ConfigError,
         "max_grad_norm"),
    Case("R_nan", "DPConfig", "`max_grad_norm=nan`", lambda: config(max_grad_norm=nan), ConfigError, "max_grad_norm"),
    Case("R_inf", "DPConfig", "`max_grad_norm=inf`", lambda: config(max_grad_norm=inf), ConfigError, "max_grad_norm"),
    Case("R_string", "DPConfig", "`max_grad_norm=\"1\"`", lambda: config(max_grad_norm="1"), ConfigError,
         "max_grad_norm"),
    Case("B_zero", "DPConfig", "`expected_batch_size=0`", lambda: config(expected_batch_size=0), ConfigError,
         "expected_batch_size"),
    Case("B_string", "DPConfig", "`expected_batch_size=\"4\"` with `dataset_size`",
         lambda: config(expected_batch_size="4", dataset_size=100), ConfigError, "expected_batch_size"),
    Case("sigma_negative", "DPConfig", "`noise_multiplier=-1`", lambda: config(noise_multiplier=-1.0), ConfigError,
         "noise_multiplier"),
    Case("sigma_nan", "DPConfig", "`noise_multiplier=nan`", lambda: config(noise_multiplier=nan), ConfigError,
         "noise_multiplier"),
    Case("sigma_bool", "DPConfig", "`noise_multiplier=True`", lambda: config(noise_multiplier=True), ConfigError,
         "noise_multiplier"),
    Case("neither", "DPConfig", "neither `noise_multiplier` nor `target_epsilon`",
         lambda: config(noise_multiplier=None), ConfigError, "exactly one"),
    Case("both", "DPConfig", "both `noise_multiplier` and `target_epsilon`",
         lambda: config(target_epsilon=3.0, dataset_size=100, steps=10), ConfigError, "exactly one"),
    Case("delta_1_over_N", "DPConfig", "`target_delta=1/N` (0.01 with `dataset_size=100`)",
         lambda: config(dataset_size=100, target_delta=0.01), ConfigError, "1/N"),
    Case("delta_one", "DPConfig", "`target_delta=1`", lambda: config(target_delta=1.0), ConfigError, "target_delta"),
    Case("delta_string", "DPConfig", "`target_delta=\"1e-5\"`", lambda: config(dataset_size=100, target_delta="1e-5"),
         ConfigError, "target_delta"),
    Case("q_above_one", "DPConfig", "sample rate above 1 (`expected_batch_size=4`, `dataset_size=2`)",
         lambda: config(dataset_size=2), ConfigError, "at most 1"),
    Case("N_zero", "DPConfig", "`dataset_size=0`", lambda: config(dataset_size=0), ConfigError, "dataset_size"),
    Case("N_float", "DPConfig", "`dataset_size=100.0`", lambda: config(dataset_size=100.0), ConfigError,
         "dataset_size"),
    Case("epsilon_negative", "DPConfig", "`target_epsilon=-3`",
         lambda: config(noise_multiplier=None, target_epsilon=-3.0, dataset_size=100, steps=5), ConfigError,
         "target_epsilon"),
    Case("epsilon_without_N", "DPConfig", "`target_epsilon` without `dataset_size`",
         lambda: config(noise_multiplier=None, target_epsilon=3.0, steps=5), ConfigError, "dataset_size"),
    Case("epsilon_without_length", "DPConfig", "`target_epsilon` without `steps` or `epochs`",
         lambda: config(noise_multiplier=None, target_epsilon=3.0, dataset_size=100), ConfigError, "steps or epochs"),
    Case("epsilon_unreachable", "DPConfig", "`target_epsilon=0.001` over 1000 full-batch steps (needs sigma > 1e4)",
         lambda: engine_with(noise_multiplier=None, target_epsilon=1e-3, expected_batch_size=1000, dataset_size=1000,
                             steps=1000, accountant="rdp"), PrivacyBudgetError, "No noise multiplier"),
    Case("epsilon_vacuous", "DPConfig", "`target_epsilon=1e6` (met at the least noise calibrated)",
         lambda: engine_with(noise_multiplier=None, target_epsilon=1e6, dataset_size=100, steps=10),
         PrivacyBudgetError, "met already"),
    Case("steps_and_epochs", "DPConfig", "both `steps` and `epochs`",
         lambda: config(dataset_size=100, steps=3, epochs=1.0), ConfigError, "give one of them"),
    Case("steps_zero", "DPConfig", "`steps=0`", lambda: config(steps=0), ConfigError, "steps"),
    Case("steps_fraction", "DPConfig", "`steps=2.5`", lambda: config(steps=2.5), ConfigError, "steps"),
    Case("epochs_zero", "DPConfig", "`epochs=0`", lambda: config(epochs=0), ConfigError, "epochs"),
    Case("epochs_nan", "DPConfig", "`epochs=nan`", lambda: config(epochs=nan), ConfigError, "epochs"),
    Case("accountant", "DPConfig", "`accountant=\"moments\"`", lambda: config(accountant="moments"), ConfigError,
         "accountant"),
    Case("sampling", "DPConfig", "`sampling=\"fixed\"`", lambda: config(sampling="fixed"), ConfigError, "sampling"),
    Case("shuffle_pld", "DPConfig", "`sampling=\"shuffle\"` with the PLD accountant",
         lambda: engine_with(sampling="shuffle", dataset_size=100), ConfigError, "rdp"),
    Case("clip_fn", "DPConfig", "`clip_fn=\"tanh\"`", lambda: config(clip_fn="tanh"), ConfigError, "clip_fn"),
    Case("gamma_zero", "DPConfig", "`clip_fn=\"automatic\"`, `automatic_gamma=0`",
         lambda: config(clip_fn="automatic", automatic_gamma=0.0), ConfigError, "gamma"),
    Case("clipping_none", "DPConfig", "`clipping=None`", lambda: config(clipping=None), ConfigError, "clipping"),
    Case("clipping_names", "DPConfig", "`clipping=[\"0.*\", \"2.*\"]` (names, not groups)",
         lambda: config(clipping=["0.*", "2.*"]), ConfigError, "parameter groups"),
    Case("groups_uncovered", "DPConfig", "clipping groups that leave a trainable parameter out",
         lambda: engine_with(clipping=[["0.*"]]), ConfigError, "not covered"),
    Case("group_norms_sum", "DPConfig", "group thresholds whose squares do not add to `max_grad_norm`^2",
         lambda: config(clipping=[["0.*"], ["2.*"]], group_max_grad_norms=[1.0, 1.0]), ConfigError, "add up"),
    Case("group_norms_strings", "DPConfig", "`group_max_grad_norms=[\"a\", \"b\"]`",
         lambda: config(clipping=[["0.*"], ["2.*"]], group_max_grad_norms=["a", "b"]), ConfigError,
         "group_max_grad_norms"),
    # adaptive clipping and DP-AdamBC
    Case("adaptive_automatic", "DPConfig", "`clip_quantile=0.5` with `clip_fn=\"automatic\"`",
         lambda: config(clip_quantile=0.5, clip_fn="automatic"), ConfigError, "clip_fn='abadi'"),
    Case("adaptive_shuffle", "DPConfig", "`clip_quantile=0.5` with `sampling=\"shuffle\"`",
         lambda: config(clip_quantile=0.5, sampling="shuffle"), ConfigError, "sampling='poisson'"),
    Case("adaptive_quantile", "DPConfig", "`clip_quantile=1.5`", lambda: config(clip_quantile=1.5), ConfigError,
         "clip_quantile"),
    Case("adaptive_knob_alone", "DPConfig", "`clip_count_std=3` without `clip_quantile`",
         lambda: config(clip_count_std=3.0), ConfigError, "clip_quantile"),
    Case("adaptive_count_noise", "PrivacyEngine", "`clip_quantile=0.5, clip_count_std=0.1` (too little count noise "
         "for sigma)", lambda: engine_with(clip_quantile=0.5, clip_count_std=0.1), ConfigError,
         "clip_count_std must exceed"),
    Case("adambc_unattached", "optimizer", "`DPAdamBC` stepped without an engine", adambc_unattached, ConfigError,
         "attach_optimizer"),
    Case("unit", "DPConfig", "`privacy_unit=\"token\"`", lambda: config(privacy_unit="token"), ConfigError,
         "privacy_unit"),
    Case("k_without_user", "DPConfig", "`examples_per_user=2` with `privacy_unit=\"example\"`",
         lambda: config(examples_per_user=2), ConfigError, "privacy_unit='user'"),
    Case("declared_not_bool", "DPConfig", "`sampling_declared_by_user=\"yes\"`",
         lambda: config(sampling_declared_by_user="yes"), ConfigError, "True or False"),
    # the engine and the model
    Case("config_dict", "Model", "a dict instead of a `DPConfig`", lambda: PrivacyEngine(mlp(), dict(BASE)),
         ConfigError, "DPConfig"),
    Case("model_function", "Model", "a function instead of an `nn.Module`", lambda: PrivacyEngine(torch.tanh, config()),
         ConfigError, "nn.Module"),
    Case("nothing_trainable", "Model", "a model with every parameter frozen",
         lambda: PrivacyEngine(mlp().requires_grad_(False), config()), NoTrainableParametersError, "requires_grad"),
    Case("batch_norm", "Model", "BatchNorm in training mode",
         lambda: PrivacyEngine(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), config()), UnsupportedModuleError,
         "BatchNorm"),
    Case("batch_norm_later", "Model", "BatchNorm switched to training mode after the engine was built",
         batch_norm_switched_to_training, UnsupportedModuleError, "training mode"),
    Case("sparse_embedding", "Model", "an unsupported trainable layer: `nn.Embedding(sparse=True)`",
         lambda: PrivacyEngine(nn.Embedding(10, 4, sparse=True), config()), UnsupportedModuleError, "sparse"),
    Case("max_norm_embedding", "Model", "an unsupported trainable layer: `nn.Embedding(max_norm=1)`",
         lambda: PrivacyEngine(nn.Embedding(10, 4, max_norm=1.0), config()), UnsupportedModuleError, "max_norm"),
    Case("torchscript", "Model", "a trainable TorchScript module", torchscript_module, UnsupportedModuleError,
         "TorchScript"),
    Case("data_parallel", "Model", "an `nn.DataParallel` model",
         lambda: PrivacyEngine(nn.DataParallel(mlp()), config()), ConfigError, "DistributedDataParallel"),
    Case("hidden_use", "Model", "a parameter read outside its module's forward",
         lambda: backward_of(lambda m: m(x()).sum(1), TwoBranches()), UnsupportedModuleError, "outside the forward"),
    Case("random_fallback", "Model", "random ops in a module without a rule (torch.func fallback)",
         lambda: backward_of(lambda m: m(x()).sum(1), NoisyScale()), UnsupportedModuleError, "random"),
    # the losses given to engine.backward
    Case("loss_scalar", "Losses", "a scalar loss (`losses.mean()`)", lambda: backward_of(lambda m: m(x()).sum()),
         LossShapeError, "one loss per example"),
    Case("loss_matrix", "Losses", "losses of shape [B, C]", lambda: backward_of(lambda m: m(x())), LossShapeError,
         "one loss per example"),
    Case("loss_short", "Losses", "B - 1 losses for B examples", lambda: backward_of(lambda m: m(x()).sum(1)[:3]),
         LossShapeError, "3 losses"),
    Case("loss_list", "Losses", "a list of floats", lambda: backward_of(lambda m: [1.0, 2.0]), LossShapeError, "list"),
    Case("loss_no_grad", "Losses", "losses computed under `torch.no_grad()`",
         lambda: backward_of(lambda m: (m(x()), torch.zeros(4))[1]), LossShapeError, "require grad"),
    Case("loss_unrelated", "Losses", "per-example losses that do not depend on the model",
         lambda: backward_of(lambda m: (m(x()), torch.randn(4, requires_grad=True) * 2)[1]), TapeError,
         "do not depend"),
    Case("loss_batch_mean", "Losses", "a batch-mean term added to each loss (`losses + losses.mean()`)",
         lambda: backward_of(lambda m: (lambda out: out + out.mean())(m(x()).sum(1))), LossShapeError,
         "computed from the model's outputs over the whole batch"),
    Case("loss_batch_norm", "Losses", "losses normalised by a batch statistic (`out / out.norm()`)",
         lambda: backward_of(lambda m: (lambda out: (out / out.norm()).sum(1))(m(x()))), LossShapeError, "scalar"),
    Case("loss_stale", "Losses", "losses of an earlier forward pass", stale_losses, TapeError, "earlier forward"),
    Case("loss_no_forward", "Losses", "`engine.backward` before any forward pass",
         lambda: bound(mlp()).backward(torch.zeros(4, requires_grad=True)), TapeError, "No forward pass"),
    Case("two_forwards", "Losses", "the model called twice before one backward (`model(a) + model(b)`)",
         two_forwards, TapeError, "two forward passes"),
    # optimizer and the step boundary
    Case("optimizer_foreign", "Optimizer", "an optimizer holding a parameter the engine does not clip",
         lambda: PrivacyEngine(mlp(), config(), optimizer=torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)),
         ConfigError, "does not clip"),
    Case("optimizer_missing", "Optimizer", "an optimizer that leaves out a trainable parameter",
         lambda: PrivacyEngine(mlp(), config(), optimizer=lambda params: torch.optim.SGD(params[1:], lr=0.1)),
         ConfigError, "leaves out"),
    Case("optimizer_added_later", "Optimizer", "a parameter group added to the optimizer after it was attached",
         foreign_after_attach, ConfigError, "add_param_group"),
    Case("optimizer_second", "Optimizer", "a second optimizer attached",
         lambda: bound(mlp()).attach_optimizer(torch.optim.SGD(mlp().parameters(), lr=0.1)), ConfigError,
         "already attached"),
    Case("optimizer_none", "Optimizer", "`engine.backward` with no optimizer attached", unbound_backward,
         StepBoundaryError, "No optimizer"),
    Case("optimizer_unseen_step", "Optimizer", "another optimizer (not attached) stepped after `engine.backward`",
         unseen_step, ForeignGradientError, "not attached"),
    Case("backward_plain", "Backward",
         "`loss.backward()` (or `accelerator.backward(loss)`) instead of `engine.backward`",
         plain_backward, ForeignGradientError, "other than engine.backward"),
    Case("backward_auxiliary", "Backward",
         "`engine.backward(losses)` plus an auxiliary loss back-propagated on its own",
         auxiliary_backward, ForeignGradientError, "auxiliary term"),
    Case("backward_then_step", "Backward", "`loss.backward(); engine.step()`", plain_backward_then_step,
         ForeignGradientError, "other than engine.backward"),
    Case("backward_stray_grad", "Backward", "a gradient written into `p.grad` by other code before the step",
         gradient_written_by_hand, ForeignGradientError, "did not write"),
    Case("backward_direct_parameter", "Backward", "a plain backward through a parameter read outside its module",
         parameter_read_directly, ForeignGradientError, "other than engine.backward"),
    # the model changed after the engine was built
    Case("changed_added", "Model changed", "a parameter added to the model",
         lambda: changed_model(lambda m: m[2].register_parameter("extra", nn.Parameter(torch.ones(2)))), ConfigError,
         "added or unfrozen"),
    Case("changed_frozen", "Model changed", "a parameter frozen",
         lambda: changed_model(lambda m: m[0].weight.requires_grad_(False)), ConfigError, "frozen"),
    Case("changed_unfrozen", "Model changed", "a frozen parameter unfrozen", unfrozen_after_build, ConfigError,
         "added or unfrozen"),
    Case("changed_replaced", "Model changed", "a parameter replaced by a new `nn.Parameter`",
         lambda: changed_model(lambda m: setattr(m[0], "weight", nn.Parameter(torch.randn(8, 4)))), ConfigError,
         "replaced"),
    Case("changed_tied", "Model changed", "two weights tied after the engine was built", tied_after_build,
         ConfigError, "tied to another"),
    # data loading
    Case("loader_rate_zero", "Data loader", "`sample_rate=0`", lambda: loader(sample_rate=0.0), ConfigError, "(0, 1]"),
    Case("loader_rate_above_one", "Data loader", "`sample_rate=1.5`", lambda: loader(sample_rate=1.5), ConfigError,
         "(0, 1]"),
    Case("loader_rate_nan", "Data loader", "`sample_rate=nan`", lambda: loader(sample_rate=nan), ConfigError, "(0, 1]"),
    Case("loader_micro_zero", "Data loader", "`max_physical_batch_size=0`", lambda: loader(max_physical_batch_size=0),
         ConfigError, "max_physical_batch_size"),
    Case("loader_iterable", "Data loader", "an iterable (not map-style) dataset",
         lambda: loader(dataset=iter(range(10))), ConfigError, "map-style"),
    Case("loader_empty", "Data loader", "an empty dataset", lambda: loader(dataset=[]), ConfigError, "dataset_size"),
    Case("loader_rank", "Data loader", "`rank=2` of `world_size=2`", lambda: loader(rank=2, world_size=2), ConfigError,
         "rank"),
    Case("loader_size", "Data loader", "a dataset of another size than `dataset_size`",
         lambda: bound(mlp(), dataset_size=100).make_data_loader(list(range(10)), max_physical_batch_size=2),
         ConfigError, "dataset_size=100"),
    Case("loader_without_N", "Data loader", "`make_data_loader` without `dataset_size`",
         lambda: bound(mlp()).make_data_loader(list(range(10)), max_physical_batch_size=2), ConfigError,
         "dataset_size"),
    Case("loader_unstepped", "Data loader", "a new batch drawn before the last one was stepped", unstepped_draw,
         SamplingError, "never stepped"),
    Case("loader_bypassed", "Data loader", "`engine.backward` on a batch no bound loader drew", unsampled_backward,
         SamplingError, "make_data_loader"),
    Case("run_steps_plain_loader", "Data loader", "`dpscale.run_steps(engine, DataLoader(dataset), ...)`",
         run_steps_on_plain_loader, SamplingError, "make_data_loader("),
    Case("run_steps_plain_declared", "Data loader",
         "`dpscale.run_steps` on a plain `DataLoader` with `sampling_declared_by_user=True`",
         lambda: run_steps_on_plain_loader(sampling_declared_by_user=True), SamplingError, "logical batch"),
    Case("budget_spent", "Data loader", "a step past `target_epsilon`", budget_spent, PrivacyBudgetError,
         "budget is spent"),
    # training-engine settings that change the DP step
    Case("trainer_clipping", "Training engine", "Trainer `max_grad_norm=1.0` (its default)",
         lambda: trainer_arguments(), ConfigError, "max_grad_norm=0"),
    Case("trainer_accumulation", "Training engine", "Trainer `gradient_accumulation_steps=2`",
         lambda: trainer_arguments(max_grad_norm=0.0, gradient_accumulation_steps=2), ConfigError,
         "gradient_accumulation_steps"),
    Case("trainer_reentrant", "Training engine", "Trainer reentrant gradient checkpointing",
         lambda: trainer_arguments(max_grad_norm=0.0, gradient_checkpointing=True,
                                   gradient_checkpointing_kwargs={"use_reentrant": True}), ConfigError, "reentrant"),
    Case("trainer_restarts", "Training engine", "Trainer `auto_find_batch_size=True`",
         lambda: trainer_arguments(max_grad_norm=0.0, auto_find_batch_size=True), ConfigError, "restarts"),
    Case("accelerate_fp16", "Training engine", "Accelerate `mixed_precision=\"fp16\"`",
         lambda: accelerator_settings(mixed_precision="fp16"), ConfigError, "GradScaler"),
    Case("accelerate_accumulation", "Training engine", "Accelerate `gradient_accumulation_steps=2`",
         lambda: accelerator_settings(gradient_accumulation_steps=2), ConfigError, "gradient_accumulation_steps"),
    Case("accelerate_fsdp1", "Training engine", "Accelerate FSDP with `fsdp_version: 1`",
         lambda: accelerator_settings(distributed_type="FSDP", state=SimpleNamespace(
             dynamo_plugin=None, fsdp_plugin=SimpleNamespace(fsdp_version=1))), ConfigError, "fsdp_version: 2"),
    Case("accelerate_megatron", "Training engine", "Accelerate `distributed_type=MEGATRON_LM`",
         lambda: accelerator_settings(distributed_type="MEGATRON_LM"), ConfigError, "distributed_type=MEGATRON_LM"),
    Case("deepspeed_clipping", "Training engine", "DeepSpeed `\"gradient_clipping\": 1.0` (its default)",
         lambda: deepspeed_settings(gradient_clipping=1.0), ConfigError, "gradient_clipping"),
    Case("deepspeed_fp16", "Training engine", "DeepSpeed `\"fp16\": {\"enabled\": true}`",
         lambda: deepspeed_settings(fp16_enabled=True), ConfigError, "fp16"),
    Case("deepspeed_accumulation", "Training engine", "DeepSpeed `\"gradient_accumulation_steps\": 2`",
         lambda: deepspeed_settings(gradient_accumulation_steps=2), ConfigError, "gradient_accumulation_steps"),
    # dpscale train: its data, checked before the model loads
    Case("train_label_nan", "Train data", "a classification label `nan` in the training CSV",
         in_folder(lambda: classification_data(values=("0", "1", "nan"))), DataError, "line 4"),
    Case("train_label_empty", "Train data", "an empty classification label",
         in_folder(lambda: classification_data(values=("0", "", "1"))), DataError, "is empty"),
    Case("train_label_stray", "Train data", "a label `2` with `--labels 0,1`",
         in_folder(lambda: classification_data(values=("0", "1", "2"), labels="0,1")),
         DataError, "not among --labels"),
    Case("train_not_utf8", "Train data", "a byte that is not UTF-8 (Latin-1 `\\xe9`) in the data file",
         in_folder(lambda: classification_data(raw=b"sentence,label\ncaf\xe9,1\n")), DataError, "iconv"),
    Case("train_no_column", "Train data", "a text column the file lacks (`--text-column text`)",
         in_folder(lambda: classification_data(text_column="text")), DataError, "--text-column"),
    Case("train_eval_label", "Train data", "an eval label the training data lacks",
         in_folder(lambda: with_eval_labels(("0", "3"))), DataError, "not among the training labels"),
    # dpscale train: a rerun in a folder with a checkpoint, refused before anything is written or loaded
    Case("rerun_no_key", "Train rerun", "a rerun without the `--noise-key` the checkpoint was written with",
         in_folder(lambda: rerun()), ConfigError, "--noise-key PATH"),
    Case("rerun_epsilon", "Train rerun", "a rerun with `--epsilon 3` (the run had 8)",
         in_folder(lambda: rerun(noise_key="run.key", epsilon=3.0)), CheckpointError, "--epsilon 8 -> 3"),
    Case("rerun_batch", "Train rerun", "a rerun with `--batch-size 32` (the run had 64)",
         in_folder(lambda: rerun(noise_key="run.key", batch_size=32.0)), CheckpointError, "--batch-size 64 -> 32"),
    Case("rerun_steps", "Train rerun", "a rerun with `--max-steps 20` (the run had 12)",
         in_folder(lambda: rerun(noise_key="run.key", max_steps=20)), CheckpointError, "--max-steps 12 -> 20"),
    Case("rerun_reused_key", "Train rerun", "`--no-resume` with the key the checkpoint was written with",
         in_folder(lambda: rerun(noise_key="run.key", resume=False)), ConfigError, "--fresh-key"),
    Case("rerun_fresh_with_key", "Train rerun", "`--fresh-key` with `--noise-key`",
         in_folder(lambda: rerun(noise_key="run.key", fresh_key=True)), ConfigError, "drop --noise-key"),
    # dpscale train --audit and --mixed-precision: refused when the config is built, before any data or model
    Case("audit_non_private", "Train options", "`--audit --non-private`",
         in_folder(lambda: train_run(audit=True, non_private=True)), ConfigError, "drop --non-private"),
    Case("audit_user_level", "Train options", "`--audit --privacy-unit user`",
         in_folder(lambda: train_run(audit=True, privacy_unit="user", user_column="mr")), ConfigError,
         "--privacy-unit user"),
    Case("audit_canaries_zero", "Train options", "`--audit --audit-canaries 0`",
         in_folder(lambda: train_run(audit=True, audit_canaries=0)), ConfigError, "--audit-canaries"),
    Case("audit_guesses_too_many", "Train options", "`--audit --audit-canaries 100 --audit-guesses 200`",
         in_folder(lambda: train_run(audit=True, audit_canaries=100, audit_guesses=200)), ConfigError,
         "--audit-guesses"),
    Case("audit_confidence_one", "Train options", "`--audit --audit-confidence 1`",
         in_folder(lambda: train_run(audit=True, audit_confidence=1.0)), ConfigError, "(0, 1)"),
    Case("canary_audit_without_key", "Train options", "`CanaryAudit(...)` without the run's key",
         lambda: canary_audit_without_key(), ConfigError, "secret key"),
    Case("precision_fp16", "Train options", "`--mixed-precision fp16`",
         in_folder(lambda: train_run(mixed_precision="fp16")), ConfigError, "--mixed-precision bf16"),
    Case("precision_unknown", "Train options", "`--mixed-precision fp8`",
         in_folder(lambda: train_run(mixed_precision="fp8")), ConfigError, "mixed_precision must be one of"),
    # the accountant's range
    Case("sigma_1e-6_epsilon", "Accounting", "`dpscale epsilon --sigma 1e-6` (PLD; q = 0.05, 300 steps)",
         lambda: dpscale.compute_epsilon(1e-6, 0.05, 300, 1e-5), PrivacyBudgetError, "noise_multiplier >="),
    Case("sigma_1e-6_engine", "Accounting", "an engine with `noise_multiplier=1e-6` (PLD; 300 steps at q = 0.05)",
         lambda: engine_for_steps(1e-6), PrivacyBudgetError, "noise_multiplier >="),
    Case("sigma_out_of_range", "Accounting", "`noise_multiplier=1e-9` (either accountant)",
         lambda: dpscale.compute_epsilon(1e-9, 0.05, 300, 1e-5, accountant="rdp"), PrivacyBudgetError, "outside"),
    Case("epsilon_vanishing_noise", "Accounting", "`dpscale calibrate --epsilon 1e12`",
         lambda: dpscale.calibrate_noise_multiplier(1e12, 1e-5, 0.05, 300), PrivacyBudgetError,
         "promises next to nothing"),
]


# running and rendering ------------------------------------------------------------------------


def run(case: Case) -> BaseException | None:
    """The exception the case raises (None if it raises nothing)."""
    try:
        case.perform()
    except Exception as error:  # noqa: BLE001 - what escapes is the point of the case
        return error
    return None


def public_name(error: BaseException) -> str:
    """The class a user catches: the first of dpscale's exported errors in the error's MRO."""
    for cls in type(error).__mro__:
        if getattr(dpscale, cls.__name__, None) is cls:
            return cls.__name__
    return type(error).__name__


def shorten(message: str, limit: int = 150) -> str:
    """The first sentence, cut at ``limit`` characters, safe inside a Markdown table cell."""
    first = re.split(r"(?<=[a-z0-9)\]'\"])\.\s+(?=[A-Z])", message.strip(), maxsplit=1)[0].rstrip(".")
    if len(first) > limit:
        first = first[: limit - 1].rstrip() + "…"
    return first.replace("|", "\\|").replace("\n", " ")


def render(results: dict[str, BaseException | None]) -> str:
    rows = ["| Area | Input | Error | Message (shortened) |", "|---|---|---|---|"]
    for case in CASES:
        error = results[case.id]
        shown = "(nothing raised)" if error is None else shorten(str(error))
        name = "-" if error is None else f"`{public_name(error)}`"
        rows.append(f"| {case.area} | {case.input} | {name} | {shown} |")
    return "\n".join(rows)


def documented() -> str:
    text = DOC.read_text()
    return text[text.index(START) + len(START) : text.index(END)].strip()


def write(table: str) -> None:
    text = DOC.read_text()
    head, tail = text[: text.index(START) + len(START)], text[text.index(END) :]
    DOC.write_text(f"{head}\n{table}\n{tail}")


if __name__ == "__main__":
    import logging

    logging.disable(logging.WARNING)
    table = render({case.id: run(case) for case in CASES})
    if "--write" in sys.argv:
        write(table)
    else:
        print(table)
