"""A 200-step DP training run of a tiny BERT on real SST-2 sentences, read from ../shared/data:
the reported epsilon equals `dpscale epsilon` for the same (sigma, q, steps), and the update noise
measured with all gradients zeroed has std sigma * R / B."""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import pytest
import torch
import transformers

from dpscale import DPConfig, PrivacyEngine
from dpscale.cli import main as cli
from dpscale.losses import sequence_classification_losses
from dpscale.noise import NoiseKey

DATA = Path(os.environ.get("DPSCALE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SST2_TRAIN = DATA / "sst2" / "train.tsv"

pytestmark = pytest.mark.skipif(not SST2_TRAIN.is_file(), reason=f"SST-2 not found at {SST2_TRAIN} (set DPSCALE_DATA)")


class SST2(torch.utils.data.Dataset):
    def __init__(self, rows, vocab, length=24):
        self.rows, self.vocab, self.length = rows, vocab, length

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        label, words = self.rows[i]
        ids = [self.vocab.get(w, 1) for w in words][: self.length]
        return ids, label


def collate(items):
    length = max(1, max(len(ids) for ids, _ in items))
    ids = torch.zeros(len(items), length, dtype=torch.long)
    for row, (tokens, _) in enumerate(items):
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": (ids != 0).long(),
            "labels": torch.tensor([label for _, label in items])}


def load():
    rows = []
    with SST2_TRAIN.open() as stream:
        next(stream)
        for line in stream:
            label, sentence = line.rstrip("\n").split("\t")
            rows.append((int(label), sentence.split()))
    counts = collections.Counter(w for _, words in rows for w in words)
    vocab = {w: i + 2 for i, (w, _) in enumerate(counts.most_common(2000))}  # 0 pad, 1 unknown
    return SST2(rows, vocab)


def test_200_private_steps_on_sst2(tmp_path, capsys):
    torch.manual_seed(0)
    dataset = load()
    config = transformers.BertConfig(vocab_size=2002, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=2)
    model = transformers.BertForSequenceClassification(config)
    steps, batch, sigma, clip = 200, 64, 1.1, 0.5
    engine = PrivacyEngine(
        model,
        DPConfig(max_grad_norm=clip, expected_batch_size=batch, noise_multiplier=sigma, dataset_size=len(dataset),
                 steps=steps),
        noise_key=NoiseKey(bytes(range(7, 39))),
    )
    optimizer = engine.attach_optimizer(torch.optim.AdamW(engine.parameters.values(), lr=2e-3))
    loader = engine.make_data_loader(dataset, max_physical_batch_size=32, collate_fn=collate)
    losses_seen, sizes = [], []
    for _step, logical in zip(range(steps), loader):
        sizes.append(logical.size)
        for micro in logical.micro_batches:
            out = model(input_ids=micro["input_ids"], attention_mask=micro["attention_mask"])
            losses = sequence_classification_losses(out.logits, micro["labels"])
            losses_seen.append(losses.mean().item())
            engine.backward(losses)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert engine.steps_taken == steps and len(sizes) == steps
    assert 0.8 * batch < sum(sizes) / steps < 1.2 * batch  # Poisson sizes around B

    q = batch / len(dataset)
    assert cli(["epsilon", "--sigma", str(sigma), "--sample-rate", repr(q), "--steps", str(steps),
                "--delta", repr(engine.delta), "--json"]) == 0
    reported = json.loads(capsys.readouterr().out)["epsilon"]
    assert engine.epsilon() == pytest.approx(reported, rel=1e-6)
    assert engine.privacy_report(tmp_path)["epsilon"] == pytest.approx(reported, rel=1e-6)

    # Update noise with every gradient zeroed: plain SGD at lr 1 moves each weight by exactly its noise
    # (an engine of its own, one optimizer per engine; an empty step of the user's declared sampling).
    engine.detach()
    noise_only = PrivacyEngine(
        model, DPConfig(max_grad_norm=clip, expected_batch_size=batch, noise_multiplier=sigma,
                        dataset_size=len(dataset), steps=steps, sampling_declared_by_user=True),
        noise_key=NoiseKey(bytes(range(7, 39))), optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
    )
    before = torch.cat([p.detach().flatten().clone() for p in noise_only.parameters.values()])
    model.zero_grad(set_to_none=True)
    noise_only.step()
    update = before - torch.cat([p.detach().flatten() for p in noise_only.parameters.values()])
    expected = sigma * clip / batch
    assert update.numel() > 50_000
    assert abs(update.std().item() / expected - 1) < 0.05
    assert abs(update.mean().item()) < 5 * expected / update.numel() ** 0.5
