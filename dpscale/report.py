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
