"""Shared by the *_phases.py scripts: timers wrapped around library methods from outside, and the
side-by-side rounds of DP and non-private steps they are read against."""

from __future__ import annotations

import argparse
import time

import torch.distributed as dist


def add_noise_ahead_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--noise-ahead", type=int, default=1, metavar="THREADS",
                        help="threads drawing the next step's noise while it runs (the default); 0: at the step")


def wrap_methods(targets, spent: dict[str, list[float]], current: list[str] | None = None) -> list[str]:
    """Wrap each (class, method name) with a timer appending to ``spent[label]`` (label
    "Class.method", prefixed by ``current[0]`` and ": " when a running mode is given); returns the
    names missing from the installed version."""
    missing = []
    for owner, name in targets:
        fn = getattr(owner, name, None)
        if fn is None:
            missing.append(f"{owner.__name__}.{name}")
            continue

        def wrapper(*a, __fn=fn, __label=f"{owner.__name__}.{name}", **k):
            start = time.perf_counter()
            try:
                return __fn(*a, **k)
            finally:
                key = __label if current is None else f"{current[0]}: {__label}"
                spent.setdefault(key, []).append(time.perf_counter() - start)

        setattr(owner, name, wrapper)
    return missing


def time_rounds(modes: dict, batches, rounds: int, spent: dict,
                current: list[str] | None = None) -> dict[str, list[float]]:
    """One warm-up step per mode (its timings dropped), then ``rounds`` rounds of every mode over
    ``batches``, each step started together on all ranks: {mode: step seconds}."""
    for mode in modes.values():
        mode.step(batches[0])
    spent.clear()
    steps: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(rounds):
        for name, mode in modes.items():
            if current is not None:
                current[0] = name
            for ids in batches:
                dist.barrier()
                start = time.perf_counter()
                mode.step(ids)
                steps[name].append(time.perf_counter() - start)
    return steps
