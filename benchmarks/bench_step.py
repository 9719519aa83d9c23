"""Step time and peak memory of DP-SGD training: dpscale against non-private training and
Opacus 1.6 (ghost clipping and per-sample-gradient hooks), on the same model, the same trainable
subset and the same batches.

Models (``--model``): ``llama`` and ``gpt2`` (4 layers, hidden 512, vocab 8192, random init),
``minilm`` (the packaged MiniLM-L6, sequence classification, 2 labels) and ``smollm2`` (the
packaged SmolLM2-135M). Subsets (``--trainable``): ``all``, ``bias`` (DP-BiTFiT: every bias, and
for a classifier its head) or ``lora`` (PEFT LoRA r=8 on every linear layer). ``--checkpointing``
turns on the model's non-reentrant gradient checkpointing in every mode; ``--device cuda`` moves
everything to the accelerator (memory then reads the allocator's peak instead of RSS).
Mode ``nonprivate_full`` trains every parameter whatever ``--trainable`` says: the reference the
subset tables in BENCHMARKS.md divide by.

Time: every mode's model lives in this process; paired rounds run each mode for
``--steps-per-round`` steps (mode order rotated every round), and the report gives the median
per-step time over rounds and the median over rounds of the per-round ratio mode / nonprivate.

Memory: each mode runs in a fresh subprocess (this script with ``--child-mode MODE``), one after
another; peak RSS (the kernel's high-water mark, VmHWM: see ``peak_rss_bytes``) minus the RSS once
the model, optimizer, DP wrapper and first batch are built, so activations, gradients, optimizer
state and per-example buffers count; whole-process peak RSS is reported too.

    python benchmarks/bench_step.py --batch 8 --seq 128
    python benchmarks/bench_step.py --batch 4 --seq 512 --json runs/bench_4x512.json

See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

MODES = ("nonprivate", "dpscale", "opacus_ghost", "opacus_hooks", "nonprivate_full")
MODELS = ("llama", "gpt2", "minilm", "smollm2")
SUBSETS = ("all", "bias", "lora")

# The model under test: a tiny Llama, random init from this config, fp32.
LLAMA_CONFIG = dict(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=1024,
)
GPT2_CONFIG = dict(vocab_size=8192, n_embd=512, n_layer=4, n_head=8, n_positions=1024,
                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)

CHILD_MARKER = "BENCH_CHILD_RESULT "
IGNORE_INDEX = -100

# Opacus warns on every make_private (secure RNG off) and on every backward (the embedding's
# input is integer ids, so its full backward hook fires on outputs only): expected, silenced.
warnings.filterwarnings("ignore", message=r"Secure RNG turned off")
warnings.filterwarnings("ignore", message=r"Full backward hook is firing")


class ModeUnavailable(Exception):
    """The mode's library or API is not there (e.g. the dpscale engine has not landed yet)."""


@dataclass
class Runner:
    """One mode ready to train: ``backward(batch)`` runs forward and the mode's backward, leaving
    the (clipped) gradients where ``optimizer`` reads them."""

    backward: Callable[[torch.Tensor], None]
    optimizer: torch.optim.Optimizer
    notes: list[str] = field(default_factory=list)

    def step(self, batch: dict) -> None:
        self.backward(batch)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- shared pieces


def is_classifier(args: argparse.Namespace) -> bool:
    return args.model == "minilm"


def vocab_size(args: argparse.Namespace) -> int:
    return {"llama": LLAMA_CONFIG["vocab_size"], "gpt2": GPT2_CONFIG["vocab_size"]}.get(args.model, 1000)


def build_model(args: argparse.Namespace, trainable: str | None = None) -> torch.nn.Module:
    """Same seed, same init, same subset: every mode trains an identical copy."""
    import transformers

    torch.manual_seed(args.seed)
    if args.model == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_CONFIG, use_cache=False))
    elif args.model == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2_CONFIG, use_cache=False))
    else:
        from dpscale.train.models import load_model

        task = "classification" if is_classifier(args) else "causal-lm"
        model, _ = load_model({"minilm": "minilm-l6", "smollm2": "smollm2-135m"}[args.model], task)
    model = model.float().train()
    subset = args.trainable if trainable is None else trainable
    if subset != "all":
        import dpscale

        task = "classification" if is_classifier(args) else "causal-lm"
        if subset == "bias":
            model = dpscale.bitfit(model, include_head=is_classifier(args))
        else:
            model = dpscale.lora(model, r=8, alpha=16, task=task)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(args.device)


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr)
    return torch.optim.AdamW(params, lr=args.lr)


def shifted_logits_and_labels(logits: torch.Tensor, ids: torch.Tensor):
    """Next-token targets: position t predicts token t + 1. Returns [B*(T-1), V], [B*(T-1)]
    and the unflattened logits shape."""
    logits = logits[:, :-1]
    return logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), logits.shape


def model_losses(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """[B] per-example losses of ``model`` on ``batch``: the mean shifted token loss of a causal
    LM, the cross entropy of a classifier."""
    logits = model(input_ids=batch["input_ids"]).logits
    if "labels" in batch:
        return F.cross_entropy(logits, batch["labels"], reduction="none")
    return per_example_losses(logits, batch["input_ids"])


def per_example_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[B] per-example mean token loss, shifted, -100 ignored (the loss every mode trains on)."""
    flat_logits, flat_labels, shape = shifted_logits_and_labels(logits, ids)
    token_loss = F.cross_entropy(
        flat_logits, flat_labels, reduction="none", ignore_index=IGNORE_INDEX
    ).view(shape[0], shape[1])
    counts = (ids[:, 1:] != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return token_loss.sum(dim=1) / counts


def make_batches(args: argparse.Namespace, count: int) -> list[dict]:
    gen = torch.Generator().manual_seed(args.seed + 1)
    batches = []
    for _ in range(count):
        batch = {"input_ids": torch.randint(0, vocab_size(args), (args.batch, args.seq), generator=gen)}
        if is_classifier(args):
            batch["labels"] = torch.randint(0, 2, (args.batch,), generator=gen)
        batches.append({k: v.to(args.device) for k, v in batch.items()})
    return batches


# ----------------------------------------------------------------------------- the modes


def build_nonprivate(args: argparse.Namespace, trainable: str | None = None) -> Runner:
    model = build_model(args, trainable)

    def backward(batch: dict) -> None:
        model_losses(model, batch).mean().backward()

    return Runner(backward, make_optimizer(model, args))


def build_dpscale(args: argparse.Namespace) -> Runner:
    try:
        import dpscale

        engine_cls, config_cls = dpscale.PrivacyEngine, dpscale.DPConfig
    except (ImportError, AttributeError) as exc:
        raise ModeUnavailable(f"{type(exc).__name__}: {exc}") from exc

    model = build_model(args)
    optimizer = make_optimizer(model, args)
    engine = engine_cls(
        model,
        config_cls(
            max_grad_norm=args.max_grad_norm,
            noise_multiplier=0.0,
            clipping=args.clipping,
            clip_fn="abadi",
            expected_batch_size=args.batch,
        ),
        optimizer=optimizer,  # attached: its step closes the DP step (noise 0 here)
    )

    def backward(batch: dict) -> None:
        engine.backward(model_losses(model, batch))

    return Runner(backward, optimizer)


def build_opacus(args: argparse.Namespace, grad_sample_mode: str) -> Runner:
    try:
        import opacus
    except ImportError as exc:
        raise ModeUnavailable(f"ImportError: {exc}") from exc
    from torch.utils.data import DataLoader, TensorDataset

    model = build_model(args)
    optimizer = make_optimizer(model, args)
    # make_private needs a loader to derive the expected batch size (N / len(loader) = batch);
    # batches themselves come from make_batches, the same ones every mode sees.
    loader = DataLoader(TensorDataset(torch.zeros(args.batch, dtype=torch.long)), args.batch)
    if args.trainable == "lora":  # Opacus wraps the PEFT model's inner module, which it can hook
        model = model.base_model.model
    made = opacus.PrivacyEngine().make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        criterion=torch.nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX),
        noise_multiplier=0.0,
        max_grad_norm=args.max_grad_norm,
        grad_sample_mode=grad_sample_mode,
        poisson_sampling=False,
    )
    gsm, dp_optimizer = made[0], made[1]

    if grad_sample_mode == "ghost":
        dp_criterion = made[2]

        def backward(batch: dict) -> None:
            # The wrapper evaluates the criterion with reduction="none" on [B*(T-1)] tokens,
            # averages per sequence (shape=...), and its .backward() runs Opacus' two passes.
            logits = gsm(input_ids=batch["input_ids"]).logits
            if "labels" in batch:
                dp_criterion(logits, batch["labels"]).backward()
                return
            flat_logits, flat_labels, shape = shifted_logits_and_labels(logits, batch["input_ids"])
            dp_criterion(flat_logits, flat_labels, shape=shape).backward()

    else:

        def backward(batch: dict) -> None:
            model_losses(gsm, batch).mean().backward()

    return Runner(backward, dp_optimizer, opacus_layer_report(model, gsm, grad_sample_mode))


def opacus_layer_report(model: torch.nn.Module, gsm, grad_sample_mode: str) -> list[str]:
    """How Opacus treats each module that owns trainable parameters, following its own
    dispatch (GradSampleHooks.add_hooks / capture_backprops_hook): ghost norm where a norm
    sampler is registered (ghost mode), its per-sample-gradient sampler where one is
    registered, else its torch.func per-layer fallback."""
    norm_samplers = getattr(gsm, "NORM_SAMPLERS", {}) if grad_sample_mode == "ghost" else {}
    paths: Counter[tuple[str, str]] = Counter()
    for _, module in model.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        kind = type(module)
        if kind in norm_samplers:
            path = "ghost norm"
        elif kind in gsm.GRAD_SAMPLERS:
            path = "per-sample grads, registered sampler"
        else:
            path = "per-sample grads, torch.func fallback (no registered sampler)"
        paths[(kind.__name__, path)] += 1
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    lines = [f"{name} x{n}: {path}" for (name, path), n in sorted(paths.items())]
    lines.append(f"frozen parameters: {frozen}")
    return lines


BUILDERS: dict[str, Callable[[argparse.Namespace], Runner]] = {
    "nonprivate": build_nonprivate,
    "dpscale": build_dpscale,
    "opacus_ghost": lambda args: build_opacus(args, "ghost"),
    "opacus_hooks": lambda args: build_opacus(args, "hooks"),
    "nonprivate_full": lambda args: build_nonprivate(args, trainable="all"),
}


# ----------------------------------------------------------------------------- time


def prepare_modes(args, modes):
    """Build each mode and take one untimed check step. Returns ({mode: Runner}, {mode:
    status}) where status is {"status": "unavailable" | "error", "reason": ...} for the rest."""
    runners, failed = {}, {}
    check_batch = make_batches(args, 1)[0]
    for mode in modes:
        try:
            runner = BUILDERS[mode](args)
            runner.step(check_batch)
        except ModeUnavailable as exc:
            failed[mode] = {"status": "unavailable", "reason": str(exc)}
            continue
        except Exception as exc:  # reported in the table and by the exit status
            traceback.print_exc()
            failed[mode] = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
            continue
        runners[mode] = runner
    return runners, failed


def time_modes(args, runners: dict[str, Runner]) -> dict[str, dict]:
    modes = list(runners)
    batches = make_batches(args, args.steps_per_round)
    per_step = {mode: [] for mode in modes}
    for rnd in range(args.warmup + args.rounds):
        order = modes[rnd % len(modes):] + modes[: rnd % len(modes)]
        for mode in order:
            runner = runners[mode]
            start = time.perf_counter()
            for batch in batches:
                runner.step(batch)
            elapsed = time.perf_counter() - start
            if rnd >= args.warmup:
                per_step[mode].append(elapsed / len(batches))
    results = {}
    for mode in modes:
        steps = per_step[mode]
        entry = {"step_s_rounds": steps, "median_step_s": statistics.median(steps)}
        for base, key in (("nonprivate", ""), ("nonprivate_full", "_to_full")):
            if base in per_step:
                ratios = [t / b for t, b in zip(per_step[mode], per_step[base])]
                entry[f"time_ratio{key}_rounds"] = ratios
                entry[f"median_time_ratio{key}"] = statistics.median(ratios)
        results[mode] = entry
    return results


# ----------------------------------------------------------------------------- memory


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's own peak RSS: VmHWM, the high-water mark ``getrusage().ru_maxrss`` reads.
    ru_maxrss itself also keeps the peak of the process image replaced by exec (Linux saves the
    old mm's high-water mark in signal->maxrss), so a child started from this large parent
    would report the parent's RSS; VmHWM belongs to the child's own address space."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def getrusage_maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def child_main(args) -> int:
    """One mode, fresh process: peak RSS over a few steps above the RSS once all is built."""
    mode = args.child_mode
    try:
        runner = BUILDERS[mode](args)
    except ModeUnavailable as exc:
        print(CHILD_MARKER + json.dumps({"status": "unavailable", "reason": str(exc)}), flush=True)
        return 0
    batches = make_batches(args, args.mem_steps)
    gc.collect()
    on_device = torch.device(args.device).type != "cpu"
    if on_device:  # the allocator's own counters: RSS does not see device memory
        accelerator = getattr(torch, torch.device(args.device).type)
        accelerator.synchronize()
        accelerator.reset_peak_memory_stats()
        read_now, read_peak = accelerator.memory_allocated, accelerator.max_memory_allocated
    else:
        read_now, read_peak = current_rss_bytes, peak_rss_bytes
    baseline = read_now()
    peak_at_baseline = read_peak()
    for batch in batches:
        runner.step(batch)
    if on_device:
        accelerator.synchronize()
    peak = read_peak()
    result = {
        "status": "ok",
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "peak_above_baseline_bytes": peak - baseline,
        "ru_maxrss_bytes": getrusage_maxrss_bytes(),
        # If the peak never rose while training, ru_maxrss still holds a build-time peak and
        # the number above is only an upper bound on what training needed.
        "peak_set_before_training": peak == peak_at_baseline,
    }
    print(CHILD_MARKER + json.dumps(result), flush=True)
    return 0


def child_argv(args, mode: str) -> list[str]:
    return [
        sys.executable, os.path.abspath(__file__), "--child-mode", mode,
        "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads),
        "--optimizer", args.optimizer, "--lr", repr(args.lr), "--seed", str(args.seed),
        "--max-grad-norm", repr(args.max_grad_norm), "--mem-steps", str(args.mem_steps),
        "--model", args.model, "--trainable", args.trainable, "--device", args.device, "--clipping", args.clipping,
        *(["--checkpointing"] if args.checkpointing else []),
    ]  # fmt: skip


# Every allocation above 64 KiB gets its own mapping, returned to the OS when freed: the child's RSS
# then follows its live tensors. With glibc's default (a threshold that grows, and freed memory kept
# in the heap) the high-water mark depends on allocation order and varied by +-10% between identical
# runs here; with this setting identical runs agree to 1 MiB.
CHILD_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def measure_memory(args, modes) -> dict[str, dict]:
    """Children run one after another, never concurrently; with ``--mem-rounds`` N, N rounds of
    one child per mode (mode order rotated), and each mode reports the child of median work memory
    (``peak_above_baseline_rounds``: every round's)."""
    env = dict(os.environ) if args.glibc_default else {**os.environ, **CHILD_MALLOC}
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    for rnd in range(args.mem_rounds):
        for mode in modes[rnd % len(modes):] + modes[: rnd % len(modes)]:
            proc = subprocess.run(child_argv(args, mode), stdout=subprocess.PIPE, text=True, env=env)
            lines = [line for line in proc.stdout.splitlines() if line.startswith(CHILD_MARKER)]
            if proc.returncode != 0 or not lines:
                runs[mode].append({"status": "error", "reason": f"child exited {proc.returncode}"})
                continue
            runs[mode].append(json.loads(lines[-1][len(CHILD_MARKER):]))
    results = {}
    for mode, entries in runs.items():
        failed = [entry for entry in entries if entry.get("status") != "ok"]
        if failed or not entries:
            results[mode] = failed[0] if failed else {"status": "error", "reason": "no child ran"}
            continue
        ordered = sorted(entries, key=lambda entry: entry.get("peak_above_baseline_bytes", 0))
        results[mode] = {**ordered[(len(ordered) - 1) // 2],
                         "peak_above_baseline_rounds": [entry.get("peak_above_baseline_bytes") for entry in entries]}
    return results


# ----------------------------------------------------------------------------- report


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def library_versions() -> dict[str, str]:
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__}  # fmt: skip
    try:
        import opacus

        versions["opacus"] = opacus.__version__
    except ImportError:
        versions["opacus"] = "not installed"
    return versions


def model_facts(args) -> dict:
    model = build_model(args)
    return {"n_params": sum(p.numel() for p in model.parameters()),
            "n_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "model_class": type(model).__name__,
            "attn_implementation": model.config._attn_implementation}  # fmt: skip


def mib(n_bytes: float) -> float:
    return n_bytes / 2**20


def fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def render(args, meta, modes, status, timing, memory) -> str:
    base_mem = memory.get("nonprivate", {}).get("peak_above_baseline_bytes")
    full_mem = memory.get("nonprivate_full", {}).get("peak_above_baseline_bytes")
    with_full = "nonprivate_full" in modes
    rows = [
        "| mode | median step s | time ratio | peak MiB above baseline | mem ratio | "
        + ("time / full | mem / full | " if with_full else "") + "whole-process peak MiB |",
        "|---|---:|---:|---:|---:|" + ("---:|---:|" if with_full else "") + "---:|",
    ]
    for mode in modes:
        if mode in status:
            rows.append(
                f"| {mode} | {status[mode]['status']} | – | – | – | " + ("– | – | " if with_full else "") + "– |"
            )
            continue
        t = timing.get(mode, {})
        m = memory.get(mode, {})
        above = m.get("peak_above_baseline_bytes")
        mem_ratio = above / base_mem if above is not None and base_mem else None
        flag = " (upper bound)" if m.get("peak_set_before_training") else ""
        to_full = ""
        if with_full:
            mem_full = above / full_mem if above is not None and full_mem else None
            to_full = f"| {fmt(t.get('median_time_ratio_to_full'), '.2f')} | {fmt(mem_full, '.2f')} "
        rows.append(
            f"| {mode} | {fmt(t.get('median_step_s'), '.3f')} "
            f"| {fmt(t.get('median_time_ratio'), '.2f')} "
            f"| {fmt(None if above is None else mib(above), '.0f')}{flag} "
            f"| {fmt(mem_ratio, '.2f')} {to_full}"
            f"| {fmt(None if 'peak_rss_bytes' not in m else mib(m['peak_rss_bytes']), '.0f')} |"
        )

    where = "fp32" if args.device == "cpu" else f"fp32 on {args.device}"
    lines = [
        f"### {meta['model_class']}, trainable {args.trainable}"
        f"{', gradient checkpointing' if args.checkpointing else ''}, batch {args.batch} x seq {args.seq}, "
        f"{where}, {args.threads} threads",
        "",
        *rows,
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}; CPU: {meta['cpu']}; threads: {meta['threads']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- model: {meta['model_class']} ({args.model}), {meta['n_params']:,} parameters, "
        f"{meta['n_trainable']:,} trainable ({args.trainable}), "
        f"attention `{meta['attn_implementation']}`; optimizer {args.optimizer} lr {args.lr}; "
        f"DP modes: max_grad_norm {args.max_grad_norm}, noise 0, {args.clipping.replace('_', '-')} clipping",
        f"- time: {args.rounds} paired rounds after {args.warmup} warmup rounds, "
        f"{args.steps_per_round} steps per mode per round, mode order rotated each round; "
        "time ratio = median over rounds of (mode / nonprivate in the same round)",
        f"- memory: fresh process per mode, {args.mem_steps} steps"
        + (f", median of {args.mem_rounds} rounds" if args.mem_rounds > 1 else "") + "; baseline = RSS once model, "
        "optimizer, DP wrapper and first batch are built; peak = the child's VmHWM (its own "
        "ru_maxrss; getrusage would also carry the parent's peak across exec)"
        + ("" if args.glibc_default
           else "; children run with MALLOC_MMAP_THRESHOLD_=65536, so RSS follows live tensors"),
    ]
    for mode in modes:
        t = timing.get(mode, {})
        if "time_ratio_rounds" in t and mode != "nonprivate":
            r = t["time_ratio_rounds"]
            lines.append(f"- {mode}: per-round time ratio range {min(r):.2f}–{max(r):.2f}")
        if mode in status:
            lines.append(f"- {mode}: {status[mode]['status']}: {status[mode]['reason']}")
        elif memory.get(mode, {}).get("status") not in (None, "ok"):
            lines.append(f"- {mode} memory: {memory[mode]['status']}: {memory[mode]['reason']}")
        for note in meta["notes"].get(mode, []):
            lines.append(f"- {mode}: {note}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds before the timed ones")
    p.add_argument("--steps-per-round", type=int, default=3)
    p.add_argument("--mem-steps", type=int, default=3, help="steps per memory child")
    p.add_argument("--mem-rounds", type=int, default=1,
                   help="memory children per mode (rounds, mode order rotated); the median is reported")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    p.add_argument("--no-time", action="store_true", help="skip the timing rounds")
    p.add_argument("--no-memory", action="store_true", help="skip the memory children")
    p.add_argument("--json", metavar="PATH", help="also write the raw numbers here")
    p.add_argument("--model", choices=MODELS, default="llama")
    p.add_argument("--trainable", choices=SUBSETS, default="all")
    p.add_argument("--checkpointing", action="store_true", help="non-reentrant gradient checkpointing, every mode")
    p.add_argument("--clipping", choices=("flat", "per_layer"), default="flat",
                   help="dpscale's clipping (Abadi, R = --max-grad-norm over all groups); Opacus modes clip flat")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--glibc-default", action="store_true",
                   help="memory children keep glibc's default malloc (see CHILD_MALLOC)")
    p.add_argument("--child-mode", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(args.mode_list) - set(MODES))
    if unknown:
        p.error(f"unknown modes {unknown}; choose from {MODES}")
    if args.seq < 2 or args.batch < 1 or args.rounds < 1 or args.steps_per_round < 1 or args.mem_rounds < 1:
        p.error("need --seq >= 2, --batch >= 1, --rounds >= 1, --steps-per-round >= 1, --mem-rounds >= 1")
    if args.mode_list and "nonprivate" not in args.mode_list:
        p.error("the ratios divide by mode nonprivate: keep it in --modes")
    if args.seq > LLAMA_CONFIG["max_position_embeddings"]:
        p.error(f"--seq exceeds max_position_embeddings {LLAMA_CONFIG['max_position_embeddings']}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child_mode:
        return child_main(args)

    modes = args.mode_list
    # Building every mode also tells which are unavailable before any child is started.
    runners, status = prepare_modes(args, modes)
    meta = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "versions": library_versions(),
        **model_facts(args),
        "notes": {mode: r.notes for mode, r in runners.items()},
    }
    timing = {} if args.no_time else time_modes(args, runners)
    del runners
    gc.collect()
    memory = {} if args.no_memory else measure_memory(
        args, [m for m in modes if m not in status]
    )

    print(render(args, meta, modes, status, timing, memory))
    if args.json:
        raw = {"args": {k: v for k, v in vars(args).items() if k != "child_mode"},
               "meta": meta, "status": status, "timing": timing, "memory": memory}  # fmt: skip
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=2)
    failed = [m for m in modes if status.get(m, {}).get("status") == "error"]
    failed += [m for m, r in memory.items() if r.get("status") == "error"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
