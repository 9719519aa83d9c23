"""The paper plan of docs/SCALING.md: what a DP step costs beyond non-private training for 7B and
70B Llama models under ZeRO-3 and FSDP2 on 8 to 512 GPUs, derived from the model shapes, the
engine's rule for choosing ghost or dense per-example norms, and stated rates.

Nothing here is measured on a GPU: every rate is an argument (``--gpu-tflops``,
``--noise-rate``) printed with the table, so the plan can be re-derived once a GPU measures them
(``benchmarks/bench_noise.py --device cuda`` gives the noise rate).

    python benchmarks/scaling_plan.py
    python benchmarks/scaling_plan.py --seq 4096 --noise-rate 2e9
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Llama:
    name: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int

    def linears(self) -> list[tuple[str, int, int, int]]:
        """(what, out, in, how many in the model) for every linear map, the tied-off head included."""
        head_dim = self.hidden // self.heads
        kv = self.kv_heads * head_dim
        return [
            ("q_proj, o_proj", self.hidden, self.hidden, 2 * self.layers),
            ("k_proj, v_proj", kv, self.hidden, 2 * self.layers),
            ("gate_proj, up_proj", self.intermediate, self.hidden, 2 * self.layers),
            ("down_proj", self.hidden, self.intermediate, self.layers),
            ("lm_head", self.vocab, self.hidden, 1),
        ]

    def parameters(self) -> int:
        linear = sum(m * n * count for _, m, n, count in self.linears())
        return linear + self.vocab * self.hidden + (2 * self.layers + 1) * self.hidden


MODELS = (
    Llama("Llama-2 7B", hidden=4096, layers=32, intermediate=11008, heads=32, kv_heads=32, vocab=32000),
    Llama("Llama-2 70B", hidden=8192, layers=80, intermediate=28672, heads=64, kv_heads=8, vocab=32000),
)


def norm_flops_per_token(m: int, n: int, seq: int) -> tuple[str, float]:
    """Extra flops per token for one example's gradient norm of an [m, n] weight, as the engine
    chooses (dpscale/per_example.py, ``Outer.cheapest``): per-example gradients when they take no
    more memory than the activations they come from (m n <= T (m + n)); the clipped sum is then a
    weighted reduction of them and replaces the weight-gradient matmul, so the extra is about
    2 m n / T per token (the norm and the weighted sum). Otherwise ghost norms: the two T x T
    Gram matrices, 2 T (m + n) per token."""
    if m * n <= seq * (m + n):
        return "dense", 2.0 * m * n / seq
    return "ghost", 2.0 * seq * (m + n)


def training_flops_per_token(model: Llama, seq: int) -> float:
    """6 flops per parameter per token (forward 2, backward 4), plus causal attention scores and
    their product with the values: 6 L T d per token over forward and backward (half of 12 L T d,
    the causal mask)."""
    return 6.0 * model.parameters() + 6.0 * model.layers * seq * model.hidden


def plan(model: Llama, seq: int) -> dict:
    rows, extra = [], 0.0
    for what, m, n, count in model.linears():
        method, flops = norm_flops_per_token(m, n, seq)
        rows.append((what, m, n, count, method, flops / (6.0 * m * n)))
        extra += flops * count
    return {"rows": rows, "extra": extra, "base": training_flops_per_token(model, seq)}


def render(args) -> str:
    out = [f"Sequence length T = {args.seq}; global batch {args.global_tokens / 1e6:.1f} M tokens per step; "
           f"{args.gpu_tflops:.0f} TFLOP/s per GPU sustained; keyed noise {args.noise_rate / 1e9:.2f} G "
           "coordinates/s per GPU (an assumption until measured).", ""]
    for model in MODELS:
        p = plan(model, args.seq)
        out += [f"### {model.name} ({model.parameters() / 1e9:.2f} B parameters)", "",
                "| weights | shape | per model | per-example norms | norm flops / the layer's training flops |",
                "|---|---|---:|---|---:|"]
        for what, m, n, count, method, ratio in p["rows"]:
            out.append(f"| {what} | {m} x {n} | {count} | {method} | {ratio:.3f} |")
        compute = p["extra"] / p["base"]
        out += ["", f"Norm computation, full fine-tuning: **{100 * compute:.1f}%** of the step's flops "
                f"({p['extra'] / 1e9:.2f} of {p['base'] / 1e9:.1f} GFLOP per token).", "",
                "| GPUs | non-private step s | norms s | noise s (own shard) | extra communication "
                "| DP / non-private |",
                "|---:|---:|---:|---:|---:|---:|"]
        for gpus in (8, 64, 512):
            step = p["base"] * args.global_tokens / (gpus * args.gpu_tflops * 1e12)
            norms = step * compute
            noise = model.parameters() / gpus / args.noise_rate
            ratio = (step + norms + noise) / step
            out.append(f"| {gpus} | {step:.2f} | {norms:.2f} | {noise:.3f} | 0 B | {ratio:.3f} |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--global-tokens", type=float, default=4 * 2**20, help="tokens per optimizer step")
    p.add_argument("--gpu-tflops", type=float, default=400.0, help="sustained bf16 TFLOP/s per GPU")
    p.add_argument("--noise-rate", type=float, default=1e9, help="keyed Gaussians per second per GPU")
    args = p.parse_args(argv)
    if not (args.seq > 0 and args.gpu_tflops > 0 and args.noise_rate > 0 and math.isfinite(args.global_tokens)):
        p.error("every rate and size must be positive")
    print(render(args))


if __name__ == "__main__":
    main()
