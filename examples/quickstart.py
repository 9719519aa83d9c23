"""Train a tiny GPT-2 privately on a few embedded sentences and print each step's clipping
statistics. Runs anywhere in seconds: no hub, no data files.

The loop every dpscale run has: an engine with its optimizer attached, the engine's own Poisson
loader, one ``engine.backward`` per micro-batch with one loss per example, one ``engine.step()`` per
logical batch. (``dpscale.run_steps`` runs this loop for you and stops at a privacy budget.)"""

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


def encode(texts: list[str], length: int) -> list[dict[str, torch.Tensor]]:
    """Bytes as token ids (0 pads and is ignored by the loss): one dict per example."""
    examples = []
    for text in texts:
        row = list(text.encode()[: length - 1]) + [10]
        ids = torch.tensor(row + [0] * (length - len(row)))
        examples.append(
            {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": ids.masked_fill(ids == 0, -100)}
        )
    return examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sigma", type=float, default=0.8, help="noise multiplier")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=256, n_positions=96, n_embd=64, n_layer=2, n_head=4, bos_token_id=10, eos_token_id=10
    )
    model = transformers.GPT2LMHeadModel(config)
    dataset = encode(SENTENCES, 80)
    engine = dpscale.PrivacyEngine(
        model,
        dpscale.DPConfig(max_grad_norm=args.max_grad_norm, noise_multiplier=args.sigma, expected_batch_size=4,
                         dataset_size=len(dataset), steps=args.steps),
        optimizer=torch.optim.AdamW(model.parameters(), lr=args.lr),  # attached: its step adds the noise
    )
    loader = engine.make_data_loader(dataset, max_physical_batch_size=2)  # Poisson batches, bound to the engine
    print(f"{'step':>4} {'examples':>8} {'loss':>7} {'median norm':>12} {'clipped':>8}")
    for logical_batch in loader:  # one logical batch per step; sizes vary, some are empty
        losses = []
        for micro in logical_batch.micro_batches:  # memory bounded by max_physical_batch_size
            logits = model(input_ids=micro["input_ids"], attention_mask=micro["attention_mask"]).logits
            micro_losses = causal_lm_losses(logits, micro["labels"])  # one loss per example
            engine.backward(micro_losses)
            losses.append(micro_losses.detach())
        engine.step()  # noise once, the update, zero_grad; an empty batch still steps
        if losses:
            norms = engine.last_norms
            clipped = (norms > args.max_grad_norm).float().mean()
            print(f"{engine.steps_taken:>4} {logical_batch.size:>8} {torch.cat(losses).mean().item():7.3f} "
                  f"{norms.median().item():12.3f} {clipped.item():8.0%}")
        else:
            print(f"{engine.steps_taken:>4} {0:>8} {'(empty draw: noise only)':>30}")
    print(f"epsilon {engine.epsilon():.2f} at delta {engine.delta:.2g} after {engine.steps_taken} steps "
          f"(sigma {engine.noise_multiplier}, q {engine.sample_rate})")


if __name__ == "__main__":
    main()
