"""Noise time as a share of one logical DP step on the benchmark model.

One logical step: expected batch size 256 at T=128 processed in physical micro-batches of 8
(32 forward/backward passes through the engine), then ``optimizer.step()``, whose pre-hook adds
the keyed noise to all 21 M coordinates. Prints the medians and the share.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

import dpscale
from dpscale.losses import causal_lm_losses
from dpscale.noise import NoiseKey


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
                                   use_cache=False)
    model = transformers.LlamaForCausalLM(cfg)
    engine = dpscale.PrivacyEngine(model, dpscale.DPConfig(max_grad_norm=1.0, expected_batch_size=args.batch,
                                                           noise_multiplier=1.0, dataset_size=50_000,
                                                           sampling_declared_by_user=True),  # fixed benchmark batches
                                   noise_key=NoiseKey.generate())
    optimizer = engine.attach_optimizer(torch.optim.SGD(engine.parameters.values(), lr=1e-4))
    noise_times, step_times = [], []
    original = engine.backend.write_gradients

    def timed_finish(*a):
        start = time.perf_counter()
        original(*a)
        noise_times.append(time.perf_counter() - start)

    engine.backend.write_gradients = timed_finish
    ids = torch.randint(0, 8192, (args.micro, args.seq))
    for _ in range(args.steps):
        start = time.perf_counter()
        for _ in range(args.batch // args.micro):
            engine.backward(causal_lm_losses(model(input_ids=ids).logits, ids))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - start)
    noise, step = statistics.median(noise_times), statistics.median(step_times)
    params = sum(p.numel() for p in engine.parameters.values())
    print(f"| logical step (B={args.batch}, micro {args.micro}, T={args.seq}) | {step:.2f} s |")
    print(f"| noise for {params / 1e6:.1f} M coordinates | {noise:.3f} s |")
    print(f"| noise share of the step | {noise / step:.2%} |")


if __name__ == "__main__":
    main()
