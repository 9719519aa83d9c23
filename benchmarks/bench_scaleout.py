"""Two-process scale-out benchmark: DP-SGD (dpscale) against non-private training of the same
engine and model, under plain DDP, DeepSpeed ZeRO-2, DeepSpeed ZeRO-3 and PyTorch FSDP2 (fp32, gloo on
CPU), and Opacus 1.6's ``ghost_fsdp`` against the same FSDP2 non-private run, on the tiny Llama of
bench_step.py; and the bytes a bias-only and a LoRA subset communicate against
full fine-tuning under DDP with dpscale.

The script launches itself with torchrun (``--world`` processes, ``--threads`` threads each) and
rank 0 prints a markdown table ready for BENCHMARKS.md.

Time: per engine, the non-private and the DP model live side by side in every process (two DDP
wrappers, or two DeepSpeed engines, built from the same seed). Paired rounds run each mode for
``--steps-per-round`` steps on the same global batch (split evenly over the ranks), mode order
alternating every round; a round's time is the slowest rank's (a barrier before, the max over ranks
after). Reported: medians over rounds, and the median over rounds of the per-round ratio DP /
non-private.

Bytes: measured, per rank and optimizer step, over ``--bytes-steps`` further steps per mode, two
ways. (1) torch.profiler (record_shapes) records the collectives gloo executes on its worker threads
(``gloo:all_reduce``, ``gloo:all_gather``, ``gloo:broadcast``, ...) with their shapes and dtypes,
whoever asked for them: DDP's reducer, DeepSpeed's ZeRO reductions and gathers, dpscale's own
all-reduces. Bytes of an op = its buffer (all-reduce, broadcast, reduce) or its gathered output
(all-gather), the logical message size in nccl-tests' sense. The ``c10d::*`` dispatcher calls are
counted beside them as a cross-check. (2) At the wire, the loopback interface's transmitted bytes
over the same steps (all ranks' TCP traffic with headers, divided by the number of ranks);
machine-wide, so only meaningful on an otherwise quiet machine.

    python benchmarks/bench_scaleout.py                      # the benchmark model, all engines
    python benchmarks/bench_scaleout.py --small --rounds 2   # 2 layers, vocab 4096: a quick look

See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_step import (  # noqa: E402  (bench_step.py lives beside this file)
    LLAMA_CONFIG,
    cpu_model,
    fmt,
    make_optimizer,
    mib,
    per_example_losses,
)
from bench_step import library_versions as base_versions  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINES = ("ddp", "zero2", "zero3", "fsdp2", "opacus_fsdp")
SUBSETS = ("full", "bias", "lora")
# --small: the same architecture, halved in depth and vocabulary, for a quick run.
SMALL_OVERRIDES = dict(num_hidden_layers=2, vocab_size=4096)
# Llama has no biases by default; the subset comparison enables them so that bias-only (BiTFiT)
# has something to train. Full, bias and LoRA rows all use this variant.
BIAS_OVERRIDES = dict(attention_bias=True, mlp_bias=True)
LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
RESULT_ENV = "BENCH_SCALEOUT_RESULT"


# ----------------------------------------------------------------------------- models and modes


def model_config(args: argparse.Namespace, biased: bool = False) -> dict:
    config = dict(LLAMA_CONFIG)
    if args.small:
        config.update(SMALL_OVERRIDES)
    if biased:
        config.update(BIAS_OVERRIDES)
    return config


def build_llama(args: argparse.Namespace, subset: str = "full", *, biased: bool = False) -> nn.Module:
    """bench_step.build_model's model (same config, seed and init), with the --small and bias
    overrides; then the trainable subset."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(LlamaConfig(**model_config(args, biased), use_cache=False)).float()
    if subset == "bias":
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith(".bias"))
    elif subset == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(**LORA))
    return model.train()


def dp_config(args: argparse.Namespace):
    from dpscale import DPConfig

    return DPConfig(max_grad_norm=args.max_grad_norm, expected_batch_size=args.batch,
                    noise_multiplier=args.noise_multiplier, clipping="flat", clip_fn="abadi")


def llama_rmsnorm_direct_rule():
    """--rmsnorm-rule direct: LlamaRMSNorm's per-example weight gradient in closed form,
    sum over tokens of G * (x / rms(x)), without calling the module (dpscale's built-in rule for
    Hugging Face RMS norms calls it through torch.func.functional_call, which ZeRO-3's
    parameter-fetch hooks on that module cannot handle). Registered through dpscale's public rule
    registry, for this engine only."""
    from dpscale import Rule
    from dpscale.per_example import Dense

    def grads(module, inputs, output_grad, names):
        x = inputs[0].detach()
        hidden = x.to(torch.float32)
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
        normed = hidden.to(x.dtype).to(torch.float32)
        per_example = (output_grad.to(torch.float32) * normed).reshape(x.shape[0], -1, x.shape[-1]).sum(1)
        return {"weight": Dense(per_example)}

    return Rule("llama_rmsnorm_direct", grads)


def dp_rules(args: argparse.Namespace):
    if args.rmsnorm_rule == "builtin":
        return None
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    import dpscale

    registry = dpscale.default_registry()
    registry.register(LlamaRMSNorm, llama_rmsnorm_direct_rule())
    return registry


def noise_key():
    from dpscale.noise import NoiseKey

    return NoiseKey(bytes(range(32)))  # fixed: runs are reproducible; the key is not secret here


def noise_ahead(args: argparse.Namespace):
    """--noise-ahead k: the next step's noise drawn by k threads while the step runs; 0: at the step."""
    from dpscale.noise import NoiseAheadOptions

    return NoiseAheadOptions(threads=args.noise_ahead) if args.noise_ahead else None


@dataclass
class Mode:
    """One way of training, ready to step: ``step(ids)`` runs one optimizer step on this rank's
    part of the global batch."""

    step: Callable[[torch.Tensor], None]
    close: Callable[[], None] = lambda: None
    trainable: int = 0
    notes: list[str] = field(default_factory=list)


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def ddp_mode(args: argparse.Namespace, private: bool, subset: str = "full", biased: bool = False) -> Mode:
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(build_llama(args, subset, biased=biased))
    optimizer = make_optimizer(ddp.module, args)
    if not private:

        def step(ids: torch.Tensor) -> None:
            per_example_losses(ddp(input_ids=ids).logits, ids).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return Mode(step, trainable=trainable_count(ddp.module))

    from dpscale import PrivacyEngine
    from dpscale.backends import DataParallelBackend
    from dpscale.losses import causal_lm_losses

    engine = PrivacyEngine(ddp, dp_config(args), backend=DataParallelBackend.for_ddp(ddp),
                           noise_key=noise_key(), rules=dp_rules(args), noise_ahead=noise_ahead(args))
    engine.attach_optimizer(optimizer)

    def dp_step(ids: torch.Tensor) -> None:
        engine.backward(causal_lm_losses(ddp(input_ids=ids).logits, ids))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Mode(dp_step, engine.detach, trainable=trainable_count(ddp.module))


def ds_config(args: argparse.Namespace, stage: int) -> dict:
    """ds_configs/zero{stage}.json as shipped, with this run's micro-batch and quiet logging."""
    with open(os.path.join(ROOT, "ds_configs", f"zero{stage}.json")) as f:
        config = json.load(f)
    if config.get("gradient_clipping") != 0.0:
        raise SystemExit(f"ds_configs/zero{stage}.json must set gradient_clipping 0.0 for DP")
    config["train_micro_batch_size_per_gpu"] = args.batch // args.world
    config["steps_per_print"] = 10**9
    return config


def zero_mode(args: argparse.Namespace, stage: int, private: bool) -> Mode:
    import deepspeed

    model = build_llama(args)
    trainable = trainable_count(model)
    ds_engine, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer(model, args),
                                         config=ds_config(args, stage))
    if not private:

        def step(ids: torch.Tensor) -> None:
            loss = per_example_losses(ds_engine(input_ids=ids).logits, ids).mean()
            ds_engine.backward(loss)
            ds_engine.step()

        return Mode(step, ds_engine.destroy, trainable=trainable)

    from dpscale import PrivacyEngine
    from dpscale.backends.deepspeed import DeepSpeedBackend
    from dpscale.losses import causal_lm_losses

    backend = DeepSpeedBackend(ds_engine)
    engine = PrivacyEngine(ds_engine.module, dp_config(args), backend=backend, noise_key=noise_key(),
                           rules=dp_rules(args), noise_ahead=noise_ahead(args))
    module = ds_engine.module

    def dp_step(ids: torch.Tensor) -> None:
        with backend.accumulation():
            # Under ZeRO-3 every rank runs as many micro-batches as the busiest (one all-reduce of
            # an int64): a real Poisson run needs it, so it is part of the measured DP step.
            for _ in range(backend.micro_batch_count(1)):
                engine.backward(causal_lm_losses(module(input_ids=ids).logits, ids))
        ds_engine.step()

    def close() -> None:
        engine.detach()
        ds_engine.destroy()

    return Mode(dp_step, close, trainable=trainable)


def fsdp2_mode(args: argparse.Namespace, private: bool) -> Mode:
    """PyTorch FSDP2: ``fully_shard`` on every decoder layer, then on the root (every parameter a
    DTensor sharded on dim 0). Non-private: FSDP2's own reduce-scatter of the mean loss's
    gradients. DP: dpscale's FSDP2 backend (selected from the model)."""
    from torch.distributed.fsdp import fully_shard

    model = build_llama(args)
    trainable = trainable_count(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = make_optimizer(model, args)
    if not private:

        def step(ids: torch.Tensor) -> None:
            per_example_losses(model(input_ids=ids).logits, ids).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return Mode(step, trainable=trainable)

    from dpscale import PrivacyEngine
    from dpscale.losses import causal_lm_losses

    engine = PrivacyEngine(model, dp_config(args), noise_key=noise_key(), rules=dp_rules(args),
                           noise_ahead=noise_ahead(args))
    engine.attach_optimizer(optimizer)

    def dp_step(ids: torch.Tensor) -> None:
        # As under ZeRO-3, every rank runs as many passes as the busiest (one int64 all-reduce).
        for _ in range(engine.backend.micro_batch_count(1)):
            engine.backward(causal_lm_losses(model(input_ids=ids).logits, ids))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Mode(dp_step, engine.detach, trainable=trainable)


def opacus_fsdp_mode(args: argparse.Namespace) -> Mode:
    """Opacus 1.6's FSDP2 path, as its documentation sets it up: ``FSDP2Wrapper`` (``fully_shard`` on
    every module that owns parameters, then the root: finer than the per-decoder-layer wrapping of
    the fsdp2 rows, which Opacus needs for its per-module hooks) and ``make_private(...,
    grad_sample_mode="ghost_fsdp")``: ghost clipping in two backward passes, its own noise. Same
    model, batches, optimizer, clipping norm and noise multiplier as dpscale's row."""
    import opacus
    from opacus.utils.fsdp_utils import FSDP2Wrapper
    from torch.utils.data import DataLoader, TensorDataset

    model = build_llama(args)
    trainable = trainable_count(model)
    wrapped = FSDP2Wrapper(model)
    optimizer = make_optimizer(model, args)
    local = args.batch // args.world
    # make_private derives the expected batch from the loader (N / len(loader)); batches themselves
    # come from local_batches, the same ones every mode sees.
    loader = DataLoader(TensorDataset(torch.zeros(local, dtype=torch.long)), local)
    gsm, dp_optimizer, criterion, _ = opacus.PrivacyEngine().make_private(
        module=wrapped, optimizer=optimizer, data_loader=loader, criterion=nn.CrossEntropyLoss(),
        noise_multiplier=args.noise_multiplier, max_grad_norm=args.max_grad_norm, grad_sample_mode="ghost_fsdp",
        poisson_sampling=False)

    def step(ids: torch.Tensor) -> None:
        logits = gsm(input_ids=ids).logits
        flat = logits[:, :-1].reshape(-1, logits.shape[-1])
        # the criterion averages each sequence's tokens (shape=...) and its backward runs both passes
        criterion(flat, ids[:, 1:].reshape(-1), shape=(ids.shape[0], ids.shape[1] - 1)).backward()
        dp_optimizer.step()
        dp_optimizer.zero_grad(set_to_none=True)

    return Mode(step, trainable=trainable)


def build_pair(args: argparse.Namespace, engine: str) -> dict[str, Mode]:
    if engine == "opacus_fsdp":
        return {"nonprivate": fsdp2_mode(args, False), "dp": opacus_fsdp_mode(args)}
    if engine == "ddp":
        return {"nonprivate": ddp_mode(args, False), "dp": ddp_mode(args, True)}
    if engine == "fsdp2":
        return {"nonprivate": fsdp2_mode(args, False), "dp": fsdp2_mode(args, True)}
    stage = int(engine[-1])
    return {"nonprivate": zero_mode(args, stage, False), "dp": zero_mode(args, stage, True)}


def local_batches(args: argparse.Namespace, count: int, rank: int) -> list[torch.Tensor]:
    """This rank's share of each global batch (rank r gets examples r, r + W, ...)."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    vocab = model_config(args)["vocab_size"]
    global_batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=gen) for _ in range(count)]
    return [b[rank :: args.world].contiguous() for b in global_batches]


# ----------------------------------------------------------------------------- bytes


_SIZES = {"float": 4, "double": 8, "c10::Half": 2, "c10::BFloat16": 2, "long int": 8, "int": 4,
          "short int": 2, "signed char": 1, "unsigned char": 1, "bool": 1}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _top_level(evt, prefix: str) -> bool:
    parent = evt.cpu_parent
    while parent is not None:
        if parent.name.startswith(prefix):
            return False
        parent = parent.cpu_parent
    return True


class CollectiveCounter:
    """Profiles a block; counts the collectives gloo executed and their bytes.

    Two layers of events carry the collectives. The ``c10d::*`` dispatcher ops are what the
    caller asked for (DDP's reducer, DeepSpeed, dpscale), but a tensor list's dtype is not
    recorded. The ``gloo:*`` events, recorded on gloo's worker threads, are what the backend
    executed, with shapes and dtypes (gloo runs a reduce-scatter as an all-reduce of the full
    input, for instance): their bytes are the measurement. Per op, bytes = the sum of its tensor
    arguments (all-reduce, broadcast, reduce: the buffer), times the world size for all-gather
    (the gathered output); barriers carry none. The c10d calls are kept as a cross-check.
    """

    def __init__(self, world: int) -> None:
        self.world = world
        self.executed: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # gloo op: [calls, bytes]
        self.requested: dict[str, int] = defaultdict(int)  # c10d op: calls
        self.unknown_dtype: set[str] = set()

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        self._prof.__exit__(*exc)
        if exc[0] is None:
            self._collect(self._prof.events())
        return False

    def _collect(self, events) -> None:
        for evt in events:
            if evt.name.startswith("c10d::") and _top_level(evt, "c10d::"):
                self.requested[evt.name] += 1
            elif evt.name.startswith("gloo:"):
                dtypes = list(getattr(evt, "input_dtypes", None) or [])
                total = 0
                for i, shape in enumerate(evt.input_shapes or []):
                    if not shape:
                        continue
                    dtype = dtypes[i] if i < len(dtypes) else ""
                    if dtype not in _SIZES:
                        self.unknown_dtype.add(f"{evt.name}:{dtype or '?'}")
                    total += _numel(shape) * _SIZES.get(dtype, 4)
                if evt.name == "gloo:all_gather":
                    total *= self.world
                entry = self.executed[evt.name]
                entry[0] += 1
                entry[1] += total

    @property
    def total_bytes(self) -> int:
        return sum(b for _, b in self.executed.values())


def loopback_tx_bytes() -> int | None:
    try:
        with open("/sys/class/net/lo/statistics/tx_bytes") as f:
            return int(f.read())
    except OSError:
        return None


def measure_bytes(args, mode: Mode, batches, rank: int) -> dict:
    """Per rank, per optimizer step: profiler-counted collective bytes (this rank's), and loopback
    wire bytes (all ranks' traffic / number of ranks, read on rank 0)."""
    dist.barrier()
    wire0 = loopback_tx_bytes()
    with CollectiveCounter(args.world) as counter:
        for i in range(args.bytes_steps):
            mode.step(batches[i % len(batches)])
    dist.barrier()
    wire1 = loopback_tx_bytes()
    steps = args.bytes_steps
    # Every rank's own count: report rank 0's, and whether the ranks agree.
    totals = torch.tensor([counter.total_bytes], dtype=torch.float64)
    gathered = [torch.zeros_like(totals) for _ in range(args.world)]
    dist.all_gather(gathered, totals)
    return {
        "bytes_per_step": counter.total_bytes / steps,
        "bytes_per_step_by_rank": [float(t) / steps for t in gathered],
        "ops_per_step": {name: {"calls": c / steps, "bytes": b / steps}
                         for name, (c, b) in sorted(counter.executed.items())},
        "requested_per_step": {name: c / steps for name, c in sorted(counter.requested.items())},
        "unknown_dtype": sorted(counter.unknown_dtype),
        "wire_bytes_per_step_per_rank": (
            None if wire0 is None or wire1 is None else (wire1 - wire0) / steps / args.world
        ),
    }


# ----------------------------------------------------------------------------- time


def timed(mode: Mode, batches) -> tuple[float, float]:
    """(wall seconds per step, the slowest rank's; CPU seconds per step, all ranks' processes
    together, gloo's threads included). CPU time is the steadier of the two on a shared machine."""
    dist.barrier()
    cpu, start = time.process_time(), time.perf_counter()
    for ids in batches:
        mode.step(ids)
    wall = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    cpu = torch.tensor([time.process_time() - cpu], dtype=torch.float64)
    dist.all_reduce(wall, op=dist.ReduceOp.MAX)
    dist.all_reduce(cpu, op=dist.ReduceOp.SUM)
    return float(wall) / len(batches), float(cpu) / len(batches)


def run_engine(args, engine: str, rank: int) -> dict:
    modes = build_pair(args, engine)
    batches = local_batches(args, args.steps_per_round, rank)
    for mode in modes.values():  # one untimed check step each (DeepSpeedBackend verifies its first)
        mode.step(batches[0])
    names = list(modes)
    per_step = {name: [] for name in names}
    cpu_step = {name: [] for name in names}
    for rnd in range(args.warmup + args.rounds):
        order = names if rnd % 2 == 0 else names[::-1]
        for name in order:
            wall, cpu = timed(modes[name], batches)
            if rnd >= args.warmup:
                per_step[name].append(wall)
                cpu_step[name].append(cpu)
    result = {"trainable": modes["dp"].trainable}
    for name in names:
        result[name] = {"step_s_rounds": per_step[name], "median_step_s": statistics.median(per_step[name]),
                        "cpu_s_rounds": cpu_step[name], "median_cpu_s": statistics.median(cpu_step[name])}
    ratios = [d / n for d, n in zip(per_step["dp"], per_step["nonprivate"])]
    result["time_ratio_rounds"] = ratios
    result["median_time_ratio"] = statistics.median(ratios)
    cpu_ratios = [d / n for d, n in zip(cpu_step["dp"], cpu_step["nonprivate"])]
    result["cpu_ratio_rounds"] = cpu_ratios
    result["median_cpu_ratio"] = statistics.median(cpu_ratios)
    for name in names:
        result[name]["bytes"] = measure_bytes(args, modes[name], batches, rank)
    for mode in modes.values():
        mode.close()
    return result


def run_subsets(args, rank: int) -> dict:
    batches = local_batches(args, max(2, args.bytes_steps), rank)
    out = {}
    for subset in SUBSETS:
        out[subset] = {}
        for private in (True, False):
            mode = ddp_mode(args, private, subset, biased=True)
            for ids in batches[:2] if len(batches) > 1 else batches * 2:
                mode.step(ids)  # DDP rebuilds its buckets (and broadcasts their order) after step 1
            entry = measure_bytes(args, mode, batches, rank)
            entry["trainable"] = mode.trainable
            out[subset]["dp" if private else "nonprivate"] = entry
            mode.close()
    return out


def worker(args) -> int:
    torch.set_num_threads(args.threads)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != args.world:
        raise SystemExit(f"expected {args.world} processes, got {world}")
    timeout = datetime.timedelta(seconds=args.timeout_s)
    if any(e.startswith("zero") for e in args.engine_list):
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        deepspeed.utils.logger.setLevel(logging.WARNING)
        deepspeed.init_distributed(dist_backend="gloo", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    assert dist.get_backend() == "gloo" and dist.get_world_size() == args.world
    results: dict = {"engines": {}, "subsets": None, "errors": {}}
    for engine in args.engine_list:
        try:
            results["engines"][engine] = run_engine(args, engine, rank)
        except Exception as exc:  # reported in the table and by the exit status; both ranks fail alike
            traceback.print_exc()
            results["errors"][engine] = f"{type(exc).__name__}: {exc}"
            gc.collect()
            dist.barrier()
        if rank == 0:
            print(f"[bench_scaleout] {engine} {'failed' if engine in results['errors'] else 'done'}", flush=True)
    if not args.no_subsets:
        results["subsets"] = run_subsets(args, rank)
    if rank == 0:
        results["threads"] = torch.get_num_threads()
        with open(os.environ[RESULT_ENV], "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()
    return 0


# ----------------------------------------------------------------------------- report


def library_versions() -> dict[str, str]:
    versions = dict(base_versions())
    for name in ("deepspeed", "accelerate", "peft"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = "not installed"
    return versions


def model_facts(args) -> dict:
    model = build_llama(args)
    return {"n_params": sum(p.numel() for p in model.parameters()),
            "attn_implementation": model.config._attn_implementation}  # fmt: skip


def _ops_line(bytes_entry: dict) -> str:
    parts = [f"{name} x{v['calls']:g} {mib(v['bytes']):.2f} MiB" for name, v in bytes_entry["ops_per_step"].items()]
    asked = [f"{name.removeprefix('c10d::')} x{c:g}" for name, c in bytes_entry["requested_per_step"].items()]
    return f"{', '.join(parts) or 'none'} (dispatched: {', '.join(asked) or 'none'})"


def _ratio(a, b):
    return None if a is None or not b else a / b


def render(args, meta, results) -> str:
    engines = results["engines"]
    config = model_config(args)
    lines = [
        f"### {args.world} processes (gloo, CPU), tiny Llama{' (--small)' if args.small else ''}, "
        f"global batch {args.batch} x seq {args.seq}, fp32, {meta['threads']} thread(s) per process",
        "",
        "| engine | non-private step s | DP step s | DP / non-private time | per-round ratio range "
        "| DP / non-private CPU time | non-private MiB/step/rank | DP MiB/step/rank | DP / non-private bytes "
        "| wire MiB/step/rank non-private | wire DP |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    labels = {"ddp": "DDP (DataParallelBackend)", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3",
              "fsdp2": "PyTorch FSDP2 (fully_shard)",
              "opacus_fsdp": "Opacus 1.6 `ghost_fsdp` (its FSDP2Wrapper), against the same FSDP2 non-private"}
    errors = results.get("errors", {})
    for name in ENGINES:
        if name in errors:
            lines.append(f"| {labels[name]} | error | error | – | – | – | – | – | – | – | – |")
            continue
        if name not in engines:
            continue
        r = engines[name]
        nb, db = r["nonprivate"]["bytes"], r["dp"]["bytes"]
        rr = r["time_ratio_rounds"]
        wn, wd = nb["wire_bytes_per_step_per_rank"], db["wire_bytes_per_step_per_rank"]
        lines.append(
            f"| {labels[name]} | {r['nonprivate']['median_step_s']:.3f} | {r['dp']['median_step_s']:.3f} "
            f"| {r['median_time_ratio']:.2f} | {min(rr):.2f}–{max(rr):.2f} | {r['median_cpu_ratio']:.2f} "
            f"| {mib(nb['bytes_per_step']):.2f} | {mib(db['bytes_per_step']):.2f} "
            f"| {fmt(_ratio(db['bytes_per_step'], nb['bytes_per_step']), '.4f')} "
            f"| {fmt(None if wn is None else mib(wn), '.2f')} | {fmt(None if wd is None else mib(wd), '.2f')} |"
        )
    subsets = results.get("subsets")
    if subsets:
        full_dp = subsets["full"]["dp"]["bytes_per_step"]
        full_np = subsets["full"]["nonprivate"]["bytes_per_step"]
        lines += [
            "",
            "Trainable subsets under DDP (Llama variant with attention and MLP biases), per rank and step:",
            "",
            "| subset | trainable params | DP MiB/step | DP vs full DP | non-private MiB/step | non-private vs full "
            "| DP / non-private bytes |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for subset in SUBSETS:
            d, n = subsets[subset]["dp"], subsets[subset]["nonprivate"]
            lines.append(
                f"| {subset} | {d['trainable']:,} | {mib(d['bytes_per_step']):.3f} "
                f"| {fmt(_ratio(d['bytes_per_step'], full_dp), '.4f')} | {mib(n['bytes_per_step']):.3f} "
                f"| {fmt(_ratio(n['bytes_per_step'], full_np), '.4f')} "
                f"| {fmt(_ratio(d['bytes_per_step'], n['bytes_per_step']), '.4f')} |"
            )
    rmsnorm_rule = (
        "dpscale built-in" if args.rmsnorm_rule == "builtin"
        else "closed form registered by this script (--rmsnorm-rule direct), not the built-in one"
    )
    lines += [
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}; CPU: {meta['cpu']} ({os.cpu_count()} cores); "
        f"{args.world} processes x {meta['threads']} thread(s), gloo",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- model: LlamaForCausalLM {config}, {meta['n_params']:,} parameters, attention "
        f"`{meta['attn_implementation']}`; optimizer {args.optimizer} lr {args.lr}; DP: flat Abadi clipping "
        f"max_grad_norm {args.max_grad_norm}, noise_multiplier {args.noise_multiplier} "
        f"(keyed noise on the coordinates each rank owns), expected batch {args.batch}",
        f"- DP rule for LlamaRMSNorm: {rmsnorm_rule}",
        f"- each rank trains on {args.batch // args.world} of the {args.batch} examples of every global batch, "
        "one micro-batch per step; non-private: mean of per-example losses, `loss.backward()` (DDP) or "
        "`ds_engine.backward(loss)` + `ds_engine.step()`; DeepSpeed configs: `ds_configs/zero{2,3}.json` "
        "(gradient_clipping 0, fp32) with the micro-batch set",
        f"- time: {args.rounds} paired rounds after {args.warmup} warmup round(s) and one check step per mode, "
        f"{args.steps_per_round} steps per mode per round, order alternating; a round's time is the slowest "
        "rank's; ratio = median over rounds of (DP / non-private in the same round); CPU time = process CPU "
        "seconds of all ranks (gloo threads included), the steadier measure on a shared machine",
        f"- bytes: {args.bytes_steps} profiled steps per mode after the timing; torch.profiler (record_shapes) "
        "over the `gloo:*` collectives gloo executed (shapes and dtypes recorded on its worker threads); bytes = "
        "the buffer (all-reduce, broadcast, reduce) or the gathered output (all-gather), rank 0's count (every "
        "rank's in the JSON); wire = loopback tx bytes over the same steps (TCP payload and headers of all ranks, "
        "/ ranks; machine-wide)",
    ]
    for name in ENGINES:
        if name not in engines:
            continue
        r = engines[name]
        for mode in ("nonprivate", "dp"):
            b = r[mode]["bytes"]
            ranks = ", ".join(f"{mib(x):.2f}" for x in b["bytes_per_step_by_rank"])
            lines.append(f"- {name} {mode}: collectives per step: {_ops_line(b)} (MiB per rank: {ranks})")
            if b["unknown_dtype"]:
                lines.append(f"- {name} {mode}: element size assumed 4 bytes for {b['unknown_dtype']}")
        st = {m: ", ".join(f"{t:.3f}" for t in r[m]["step_s_rounds"]) for m in ("nonprivate", "dp")}
        ct = {m: ", ".join(f"{t:.3f}" for t in r[m]["cpu_s_rounds"]) for m in ("nonprivate", "dp")}
        cr = r["cpu_ratio_rounds"]
        lines.append(f"- {name} wall s per step, per round: non-private [{st['nonprivate']}], DP [{st['dp']}]")
        lines.append(f"- {name} CPU s per step (all ranks), per round: non-private [{ct['nonprivate']}], "
                     f"DP [{ct['dp']}]; CPU ratio range {min(cr):.2f}–{max(cr):.2f}")
    for name, reason in errors.items():
        lines.append(f"- {name}: error: {reason}")
    if subsets:
        for subset in SUBSETS:
            for mode in ("dp", "nonprivate"):
                lines.append(f"- subset {subset} {mode}: {_ops_line(subsets[subset][mode])}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help=f"override the model with {SMALL_OVERRIDES}")
    p.add_argument("--batch", type=int, default=8, help="global batch, split evenly over the processes")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--world", type=int, default=2, help="number of processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones")
    p.add_argument("--steps-per-round", type=int, default=3)
    p.add_argument("--bytes-steps", type=int, default=2, help="profiled steps per mode for the bytes")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {ENGINES}")
    p.add_argument("--no-subsets", action="store_true", help="skip the bias-only / LoRA bytes")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--noise-multiplier", type=float, default=1.0)
    p.add_argument("--noise-ahead", type=int, default=1, metavar="THREADS",
                   help="threads drawing the next step's noise while it runs (the default); 0: at the step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rmsnorm-rule", choices=("builtin", "direct"), default="builtin",
                   help="direct: register a closed-form LlamaRMSNorm rule in every DP mode (a "
                        "work-around where the built-in rule fails under ZeRO-3)")
    p.add_argument("--timeout-s", type=int, default=600, help="collective timeout")
    p.add_argument("--json", metavar="PATH", help="also write the raw numbers here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.engine_list = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = sorted(set(args.engine_list) - set(ENGINES))
    if unknown:
        p.error(f"unknown engines {unknown}; choose from {ENGINES}")
    if args.batch % args.world:
        p.error("--batch must be a multiple of --world")
    if args.seq < 2 or args.rounds < 1 or args.steps_per_round < 1 or args.bytes_steps < 1:
        p.error("need --seq >= 2, --rounds >= 1, --steps-per-round >= 1, --bytes-steps >= 1")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    meta = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "versions": library_versions(),
        **model_facts(args),
    }
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "result.json")
        env = {**os.environ, RESULT_ENV: result_path, "OMP_NUM_THREADS": str(args.threads),
               "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "PYTHONPATH": ROOT}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node", str(args.world), os.path.abspath(__file__), *argv, "--worker"]
        proc = subprocess.run(command, env=env, cwd=ROOT)
        if proc.returncode != 0 or not os.path.exists(result_path):
            print(f"torchrun exited {proc.returncode}", file=sys.stderr)
            return 1
        with open(result_path) as f:
            results = json.load(f)
    meta["threads"] = results.pop("threads")
    print(render(args, meta, results))
    status = 1 if results.get("errors") else 0
    if args.json:
        raw = {"args": {k: v for k, v in vars(args).items() if k != "worker"}, "meta": meta, **results}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=2)
    return status


if __name__ == "__main__":
    sys.exit(main())
