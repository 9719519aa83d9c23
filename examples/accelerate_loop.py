"""DP fine-tuning in a plain Accelerate loop: the README's loop with flags (model, data, steps).

    python examples/accelerate_loop.py --model minilm-l6 --data ../shared/data/sst2/train.tsv
    accelerate launch --config_file launch/accelerate_cpu_2proc.yaml examples/accelerate_loop.py ...

The loop is the one a user already has; dpscale changes three lines: the engine wraps the prepared
model and optimizer, the loader is the engine's (Poisson batches, this rank's part), and the step
is the step driver's (one loss per example, noise once per global step, stop at the budget).
"""

from __future__ import annotations

import argparse
import csv
import os

import torch
from accelerate import Accelerator
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import dpscale
from dpscale import make_data_loader, make_private, resolve_model_name, sequence_classification_losses
from dpscale.train.data import padding_id


def read_sst2(path: str, tokenizer, max_length: int, limit: int | None) -> list[dict[str, torch.Tensor]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:limit]
    return [{**{k: torch.tensor(v)
                for k, v in tokenizer(row["sentence"], truncation=True, max_length=max_length).items()},
             "labels": torch.tensor(int(row["label"]))} for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm-l6", help="a packaged name, a local folder or a hub id")
    parser.add_argument("--data", default="../shared/data/sst2/train.tsv", help="a TSV with sentence and label")
    parser.add_argument("--noise-key", default="runs/accelerate_loop.key", help="one key file for every rank")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--limit", type=int, default=None, help="use the first n rows only")
    args = parser.parse_args()

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if accelerator.is_main_process and not os.path.exists(args.noise_key):
        os.makedirs(os.path.dirname(args.noise_key) or ".", exist_ok=True)
        dpscale.NoiseKey.write_new(args.noise_key)
    accelerator.wait_for_everyone()
    path = resolve_model_name(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    train = read_sst2(args.data, tokenizer, max_length=64, limit=args.limit)
    pad = padding_id(tokenizer)

    def collate(items):
        ids = torch.nn.utils.rnn.pad_sequence([i["input_ids"] for i in items], batch_first=True, padding_value=pad)
        return {"input_ids": ids, "attention_mask": (ids != pad).long(),
                "labels": torch.stack([i["labels"] for i in items])}

    # --- the loop (README, "Use it in your loop") ---
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    config = dpscale.DPConfig(max_grad_norm=1.0, expected_batch_size=min(256, len(train) // 4),
                              dataset_size=len(train), target_epsilon=8.0, target_delta=1 / (2 * len(train)),
                              steps=args.max_steps)
    engine = make_private(accelerator, model, optimizer, config, noise_key=args.noise_key)
    loader = make_data_loader(accelerator, engine, train, max_physical_batch_size=32, collate_fn=collate)

    def losses(micro):  # one loss per example, never a batch mean
        micro = {k: v.to(accelerator.device) for k, v in micro.items()}
        return sequence_classification_losses(model(**micro).logits, micro["labels"])

    outcome = dpscale.run_steps(engine, loader, losses, max_steps=args.max_steps)
    # --- end of the loop ---
    if accelerator.is_main_process:
        print(f"{outcome.steps} steps, epsilon {engine.epsilon():.2f} at delta {engine.delta:.1e}")


if __name__ == "__main__":
    main()
