"""DP steps per second in float32 and under bf16 autocast, at the main job's step shape:
SmolLM2-135M (packaged), LoRA r 8 on every linear layer, micro-batches of ``--micro-batch``
E2E training examples padded to their longest (the longest of the first 400 rows: the worst
case of max length 96), a logical step of ``--batch`` examples (expected batch 64).

    python benchmarks/bench_mixed_precision.py                       # CPU, 3 paired rounds
    python benchmarks/bench_mixed_precision.py --device cuda         # a GPU

Both precisions run in this process, alternating (the order flips every round), so that both see
the same machine load: each timed unit is one micro-batch's forward, ``engine.backward`` and the
engine's step. Steps per second = 1 / (micro-batch time x batch / micro-batch). bf16 is measured
even where ``dpscale train`` refuses it (a CPU without AVX512-BF16 / AMX), to show why.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from dpscale import DPConfig, PrivacyEngine
    from dpscale.losses import causal_lm_losses
    from dpscale.train.data import CausalLMData, default_e2e
    from dpscale.train.models import load_model, select_trainable
    from dpscale.train.precision import cpu_supports_bf16

    device = torch.device(args.device)
    model, tokenizer = load_model("smollm2-135m", task="causal-lm")
    model = select_trainable(model, "lora", task="causal-lm").to(device)
    data = CausalLMData(default_e2e()[0][:400], tokenizer, max_length=96)
    items = sorted((data.dataset[i] for i in range(len(data))), key=lambda x: -len(x["input_ids"]))
    batch = {k: v.to(device) for k, v in data.collate(items[: args.micro_batch]).items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    engine = PrivacyEngine(model, DPConfig(noise_multiplier=1.0, max_grad_norm=0.1, expected_batch_size=args.batch,
                                           clip_fn="automatic", sampling_declared_by_user=True), optimizer=optimizer)

    def micro_step(bf16: bool) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        engine.backward(causal_lm_losses(logits, batch["labels"]))
        engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    micro_step(False), micro_step(True)  # warm-up
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for r in range(args.rounds):
        for name in ("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32"):
            times[name].append(micro_step(name == "bf16"))
    per_step = args.batch / args.micro_batch
    hardware = (f"{device}" + (f" (AVX512-BF16/AMX: {cpu_supports_bf16()}, "
                               f"{torch.backends.cpu.get_cpu_capability()})" if device.type == "cpu" else ""))
    print(f"SmolLM2-135M LoRA, micro-batch {tuple(batch['input_ids'].shape)}, logical step {args.batch}, {hardware}, "
          f"torch threads {torch.get_num_threads()}")
    print("| precision | micro-batch s (median, rounds) | steps/s | vs fp32 |")
    print("|---|---:|---:|---:|")
    base = statistics.median(times["fp32"])
    for name, values in times.items():
        median = statistics.median(values)
        rounds = ", ".join(f"{v:.2f}" for v in values)
        print(f"| {name} | {median:.2f} ({rounds}) | {1 / (median * per_step):.4f} | {median / base:.2f}x time |")


if __name__ == "__main__":
    main()
