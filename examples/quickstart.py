"""Train a tiny GPT-2 privately on a few embedded sentences and print each step's clipping
statistics. Runs anywhere in seconds: no hub, no data files."""

from __future__ import annotations

import argparse

import torch
import transformers

import dpscale
from dpscale.losses import causal_lm_losses

SENTENCES = [
    "The Golden Fork is a family friendly Italian place near the river.",
    "Blue Spice serves cheap French food in the city centre.",
    "The Mill is a coffee shop with a high customer rating.",
    "Near the museum there is a pub called The Eagle.",
    "Aromi is an adult only restaurant serving Japanese food.",
    "The Wrestlers offers English breakfast at moderate prices.",
    "Zizzi is a kid friendly pizza place by the station.",
    "Cotto serves Indian food and has an average rating.",
]


def encode(texts: list[str], length: int) -> torch.Tensor:
    """Bytes as token ids (0 pads and is ignored by the loss)."""
    rows = [list(t.encode()[: length - 1]) + [10] for t in texts]
    return torch.tensor([row + [0] * (length - len(row)) for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=256, n_positions=96, n_embd=64, n_layer=2, n_head=4, bos_token_id=10, eos_token_id=10)
    model = transformers.GPT2LMHeadModel(config)
    ids = encode(SENTENCES, 80)
    labels = ids.masked_fill(ids == 0, -100)
    engine = dpscale.PrivacyEngine(
        model, dpscale.DPConfig(max_grad_norm=args.max_grad_norm, noise_multiplier=0.0, expected_batch_size=len(ids))
    )
    optimizer = torch.optim.AdamW(engine.parameters.values(), lr=args.lr)
    print(f"{'step':>4} {'loss':>7} {'median norm':>12} {'max norm':>9} {'clipped':>8}")
    for step in range(args.steps):
        logits = model(input_ids=ids, attention_mask=(ids != 0).long()).logits
        losses = causal_lm_losses(logits, labels)
        engine.backward(losses)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        norms = engine.last_norms
        clipped = (norms > args.max_grad_norm).float().mean()
        print(f"{step:>4} {losses.mean().item():7.3f} {norms.median().item():12.3f} {norms.max().item():9.3f} {clipped.item():8.0%}")


if __name__ == "__main__":
    main()
