"""Where the main job's memory and time go: `dpscale train` (any of its flags) run in this
process, with the peak resident memory and the wall time of each phase printed as a table.

    python benchmarks/main_job_memory.py                         # the default job
    python benchmarks/main_job_memory.py --non-private           # its baseline
    python benchmarks/main_job_memory.py --max-steps 2 --generations 4   # a quick look

The phases are the job's own functions (model load, trainable subset, eval loss, generation,
training, saving), wrapped from outside by this script only. After each phase the script reads
the process's peak resident set (VmHWM) and current one (VmRSS) from /proc/self/status, then
resets the peak (writing 5 to /proc/self/clear_refs), so that each row's peak is that phase's
own. Linux only. The last line is the whole process's peak, as `/usr/bin/time -v` reports it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

_GIB = 1024**3


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


class Phases:
    """Rows of (phase, seconds, peak bytes during it, resident bytes after it)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, int, int]] = []
        self.process_peak = 0
        self._depth = 0

    def wrap(self, owner, attribute: str, label) -> None:
        inner = getattr(owner, attribute)

        def wrapper(*args, **kwargs):
            if self._depth:  # nested in a wrapped phase: counted in that phase
                return inner(*args, **kwargs)
            self.close("(between phases)")
            self._depth += 1
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self._depth -= 1
                name = label(args, kwargs) if callable(label) else label
                self.close(name, time.perf_counter() - start)

        setattr(owner, attribute, wrapper)

    def close(self, name: str, seconds: float | None = None) -> None:
        peak, now = _status("VmHWM"), _status("VmRSS")
        self.process_peak = max(self.process_peak, peak)
        if seconds is not None or peak > now + 64 * 1024**2:
            self.rows.append((name, seconds or 0.0, peak, now))
            print(f"[phase] {name}: {seconds or 0.0:.1f} s, peak {peak / _GIB:.2f} GiB, after {now / _GIB:.2f} GiB",
                  file=sys.stderr, flush=True)
        _reset_peak()

    def table(self) -> str:
        lines = ["| phase | seconds | peak RSS GiB | RSS after GiB |", "|---|---:|---:|---:|"]
        for name, seconds, peak, now in self.rows:
            lines.append(f"| {name} | {seconds:.1f} | {peak / _GIB:.2f} | {now / _GIB:.2f} |")
        lines.append(f"| whole process (VmHWM) | | **{self.process_peak / _GIB:.2f}** | |")
        return "\n".join(lines)


def main(argv: list[str]) -> None:
    import dpscale.train.baseline as baseline
    import dpscale.train.evaluate as evaluate
    import dpscale.train.job as job
    import dpscale.train.models as models
    from dpscale.cli import main as cli_main

    phases = Phases()
    _reset_peak()
    calls = {"eval": 0}

    def eval_label(args, kwargs):
        calls["eval"] += 1
        return "eval loss (before)" if calls["eval"] == 1 else "eval loss (after)"

    gen_calls = {"n": 0}

    def gen_label(args, kwargs):
        gen_calls["n"] += 1
        prompts = args[2] if len(args) > 2 else kwargs["prompts"]
        return f"generation of {len(prompts)} ({'before' if gen_calls['n'] == 1 else 'after'})"

    phases.wrap(models, "load_model", "model load")
    phases.wrap(models, "select_trainable", "trainable subset")
    phases.wrap(evaluate, "evaluate_causal_lm", eval_label)
    phases.wrap(evaluate, "evaluate_classification", eval_label)
    phases.wrap(evaluate, "generate", gen_label)
    phases.wrap(job, "_train_private", "training (DP)")
    phases.wrap(baseline, "train_non_private", "training (non-private)")
    phases.wrap(models, "save_model", "save")
    started = time.perf_counter()
    status = cli_main(["train", *argv])
    if status:
        raise SystemExit(status)
    phases.close("(to the end)")
    print(f"\n{' '.join(['dpscale train', *argv])}: {time.perf_counter() - started:.0f} s in this process\n")
    print(phases.table())


if __name__ == "__main__":
    main(sys.argv[1:])
