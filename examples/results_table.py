"""Print the results table (markdown) from the runs' own metrics.json, so that no figure in the
README or docs/RESULTS.md is typed by hand.

    python examples/results_table.py "runs/sst2-lora-eps8::dpscale train --config ..." ...

Each argument is the --output-dir of one `dpscale train` run, optionally followed by `::` and the
command that made it (printed in the last column); the figures are read from its metrics.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MODELS = {"minilm-l6": "MiniLM-L6", "smollm2-135m": "SmolLM2-135M"}
METHODS = {"all": "full", "bias": "BiTFiT", "lora": "LoRA"}


def figure(metrics: dict) -> str:
    before, after = metrics["before"], metrics["after"]
    if metrics["task"] == "classification":
        return (f"dev accuracy {before['accuracy']:.1%} -> **{after['accuracy']:.1%}** "
                f"(eval loss {before['loss']:.3f} -> {after['loss']:.3f})")
    return (f"eval loss {before['loss']:.3f} -> **{after['loss']:.3f}**, "
            f"BLEU {before['bleu']:.1f} -> **{after['bleu']:.1f}** "
            f"({after['bleu_prompts']} held-out MRs)")


def privacy(metrics: dict) -> str:
    p = metrics["privacy"]
    if metrics["non_private"]:
        return "none (baseline)"
    unit = f" per user (k {p['examples_per_user']})" if p.get("privacy_unit") == "user" else ""
    return (f"epsilon {p['epsilon']:.2f}{unit}, delta {p['delta']:.1e} (sigma {p['noise_multiplier']:.3f}, "
            f"q {p['sample_rate']:.4f})")


def recipe(config: dict) -> str:
    if config["non_private"]:
        return f"lr {config['lr']:g}"
    return f"{config['clip_fn']} R {config['max_grad_norm']:g}, lr {config['lr']:g}"


def row(argument: str) -> str:
    folder, _, command = argument.partition("::")
    folder = Path(folder)
    metrics = json.loads((folder / "metrics.json").read_text())
    config = metrics["command_config"]
    method = (
        "non-private " + METHODS[config["trainable"]] if metrics["non_private"]
        else "DP " + METHODS[config["trainable"]]
    )
    minutes, seconds = divmod(round(metrics["wall_seconds_this_run"]), 60)
    processes = metrics.get("processes", 1)
    where = (
        f"{processes} processes" + (f", DeepSpeed {Path(config['deepspeed']).stem}" if config.get("deepspeed") else "")
        if processes > 1 else "1 process"
    )
    users = " users" if config.get("privacy_unit") == "user" else ""
    steps = f"{metrics['steps']} x B {config['batch_size']:g}{users}"
    return (f"| {'SST-2' if metrics['task'] == 'classification' else 'E2E'} {method} ({recipe(config)}) "
            f"| {MODELS.get(metrics['model'], metrics['model'])} | {privacy(metrics)} | {figure(metrics)} | {steps} "
            f"| {minutes} min {seconds:02d} s, {where} | `{command or folder.as_posix()}` |")


def main(folders: list[str]) -> None:
    print("| run | model | privacy | figure (before -> after) | steps | training time | command |")
    print("|---|---|---|---|---|---|---|")
    for folder in folders:
        print(row(folder))


if __name__ == "__main__":
    main(sys.argv[1:])
