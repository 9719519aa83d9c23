"""The privacy report: what was spent, under which mechanism, as a dict, a JSON file and a plot of
epsilon against steps."""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def write_report(report: dict, curve: list[tuple[int, float]], directory: str | Path) -> dict[str, Path]:
    """Write privacy_report.json and epsilon.png into ``directory``; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / "privacy_report.json"
    json_path.write_text(json.dumps({**report, "epsilon_curve": curve}, indent=2) + "\n")
    png_path = directory / "epsilon.png"
    plot_epsilon(curve, report, png_path)
    logger.info("Privacy report written to %s", directory)
    return {"json": json_path, "plot": png_path}


def plot_epsilon(curve: list[tuple[int, float]], report: dict, path: Path) -> None:
    from matplotlib.figure import Figure  # a bare Figure renders without pyplot's global state

    figure = Figure(figsize=(6, 4), dpi=110)
    axes = figure.add_subplot()
    if curve:
        steps, epsilons = zip(*curve)
        axes.plot(steps, epsilons, marker=".", color="#1f4e79")
    axes.set_xlabel("optimizer steps")
    axes.set_ylabel(f"epsilon at delta = {report.get('delta', float('nan')):.2g}")
    axes.set_title(
        f"sigma = {report['noise_multiplier']:.4g}, q = {report['sample_rate']:.3g}, "
        f"R = {report['max_grad_norm']:g}, {report['accountant'].upper()}"
    )
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)


def build_report(engine, directory: str | Path | None = None, points: int = 50) -> dict:
    """What was spent and how, read from the engine's execution plan and step counter; with
    ``directory``, also privacy_report.json and epsilon.png written there."""
    plan = engine.plan
    accounts, delta = plan.accounts, plan.accounting.delta
    sigma = plan.noise.noise_multiplier
    curve = []
    if accounts and sigma > 0:
        curve = [(int(t), float(e)) for t, e in engine.accountant.epsilon_curve(delta, points)]
    if not accounts:
        sampling_source = "none: no dataset_size, so no accounting"
    elif plan.sampling.declared_by_user:
        sampling_source = (f"declared by the user (DPConfig.sampling_declared_by_user): dpscale did not draw "
                           f"the batches and cannot check that they are {plan.sampling.kind} at q")
    else:
        sampling_source = "dpscale loader bound to the engine (checked at every step)"
    sampling, clipping = plan.sampling, plan.clipping
    report = {
        "epsilon": engine.epsilon() if accounts else None,
        "delta": delta,
        "noise_multiplier": sigma,
        "gradient_noise_multiplier": (sigma if plan.noise.gradient_noise_multiplier is None
                                      else plan.noise.gradient_noise_multiplier),
        "sample_rate": sampling.sample_rate,
        "steps": engine.steps_taken,
        "planned_steps": plan.accounting.planned_steps,
        "planned_epsilon": plan.planned_epsilon() if sigma > 0 else None,  # what the whole planned run spends
        "budget_steps": plan.accounting.budget_steps,
        "target_epsilon": plan.accounting.target_epsilon,
        "allow_budget_overrun": plan.accounting.allow_budget_overrun,
        "accountant": plan.accounting.accountant,
        "sampling": sampling.kind,
        "sampling_source": sampling_source,
        "clipping": clipping.mode,
        "clip_fn": clipping.clip_fn,
        "max_grad_norm": clipping.max_grad_norm,
        "group_max_grad_norms": list(clipping.thresholds),
        "expected_batch_size": plan.noise.expected_batch_size,
        "dataset_size": sampling.dataset_size,
        "privacy_unit": sampling.privacy_unit,
        "examples_per_user": sampling.examples_per_user,
        "protects": (f"each user (all their examples; dataset_size and expected_batch_size count users, at most "
                     f"{sampling.examples_per_user} example(s) per user per step)"
                     if sampling.privacy_unit == "user" else "each example (one sequence)"),
        "noise": {"scheme": plan.noise.scheme, "key_fingerprint": plan.noise.key_fingerprint,
                  "schemes_by_first_step": [list(entry) for entry in engine.noise_schemes]},
        "trainable_parameters": int(sum(p.numel() for p in engine.parameters.values())),
    }
    adaptive = engine.adaptive_clipping
    if adaptive is not None:  # R over time: the clipping norm each step used, and where it stands now
        report["adaptive_clipping"] = {
            **plan.adaptive.as_dict(), "thresholds_now": list(adaptive.thresholds),
            "clip_norm_by_step": [[t + 1, r] for t, r in enumerate(adaptive.history)],
            "last_unclipped_fractions": None if adaptive.last_fractions is None else list(adaptive.last_fractions),
        }
    if directory is not None:
        write_report(report, curve, directory)
    return report
