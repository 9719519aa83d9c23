"""What the job shows and leaves behind, apart from the model and the privacy report (which the
engine writes): the progress bar and tracker values of every step, ``metrics.json``,
``training.png`` (loss and epsilon against steps) and the summary printed at the end. Both
training loops hand their steps here in one shape, so the private run and its non-private
baseline are reported alike."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Trained", "log_step", "progress", "write_report"]


@dataclass(frozen=True)
class Trained:
    """What a training loop ran: every step's record (those of earlier runs of a resumed job
    first), the steps taken in all, why it stopped, and what was spent (``epsilon`` None for the
    non-private baseline)."""

    history: list[dict]
    steps_total: int
    stopped: str
    privacy: dict


def progress(accelerator, total, initial):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, disable=not accelerator.is_main_process, unit="step", desc="dpscale train"
    )


def log_step(accelerator, bar, record: dict) -> None:
    shown = {"loss": record.get("loss"), "eps": record.get("epsilon"), "s/step": record.get("step_seconds")}
    bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items() if v is not None})
    bar.update(1)
    values = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
    if accelerator.trackers:
        accelerator.log(values, step=record["step"])


def write_report(accelerator, output: Path, metrics: dict, history: list[dict]) -> None:
    """``metrics.json`` and ``training.png`` in ``output``, and the summary; the main process only."""
    if not accelerator.is_main_process:
        return
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _plot_training(history, output / "training.png")
    _print_summary(accelerator, metrics)


def _plot_training(history: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=110)
    axes = figure.add_subplot()
    steps = [r["step"] for r in history if r.get("loss") is not None]
    axes.plot(steps, [r["loss"] for r in history if r.get("loss") is not None], color="#1f4e79", label="train loss")
    axes.set_xlabel("step")
    axes.set_ylabel("train loss (sampled examples)")
    lines = axes.get_lines()
    if any(r.get("epsilon") is not None for r in history):
        right = axes.twinx()
        right.plot([r["step"] for r in history], [r["epsilon"] for r in history], color="#b03a2e", label="epsilon")
        right.set_ylabel("epsilon spent")
        lines = lines + right.get_lines()
    axes.legend(lines, [line.get_label() for line in lines], loc="center right")
    axes.set_title("dpscale train: loss of the sampled examples, and epsilon, per step")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)


def _print_summary(accelerator, metrics: dict) -> None:
    privacy = metrics["privacy"]
    if privacy.get("epsilon") is not None:
        unit = "per user" if privacy.get("privacy_unit") == "user" else "per example"
        accelerator.print(f"epsilon {privacy['epsilon']:.3f} {unit} at delta {privacy['delta']:.2e} "
                          f"(sigma {privacy['noise_multiplier']:.3f}, q {privacy['sample_rate']:.4g}, "
                          f"{privacy['steps']} steps)")
    else:
        accelerator.print("non-private run: no privacy guarantee")
    for key in ("loss", "accuracy", "bleu"):
        if key in metrics["after"]:
            accelerator.print(
                f"eval {key}: {metrics['before'].get(key, float('nan')):.4f} -> {metrics['after'][key]:.4f}"
            )
    for sample in metrics["after"].get("samples", []):
        accelerator.print(
            f"  {sample['prompt']!r}\n    generated: {sample['generated']!r}\n"
            f"    reference: {sample['reference']!r}"
        )
