"""``dpscale train --audit``: canaries planted in the job itself, scored on the model it ships.

The library part (a fixed dataset of N + m rows, the keyed coins, the weights, the score, the bound)
is ``dpscale.audit_run.CanaryAudit``; this module is what the job adds to it:

* **The canaries** are rows of the job's own table, tokenised by the job's own dataset class (same
  special tokens, truncation and loss mask), made of random tokens from the model's vocabulary
  (special tokens left out) drawn from the run's key, each canary with tokens of its own, those
  the real data never uses first (``canary_rows``):
  - causal LM with prompt and target columns: a random prompt of 8 tokens and a random target of
    8 tokens (the loss is on the target, as for every row); with a text column: 16 random tokens;
  - classification: 12 random tokens with a label drawn uniformly from the training labels (a
    mislabelled input: nothing in the real data teaches it).
  Random sequences of tokens no other row uses are what a model can only learn by memorising
  them, so their loss moves where they were trained on.
* **The dataset.** The training set becomes the N rows plus all m canaries (N + m rows, q = B /
  (N + m), delta by default (N + m)^-1.1); an excluded canary is drawn like any row but its loss is
  multiplied by 0. ``metrics.json``'s ``train_examples`` counts the canary rows too.
* **The record.** ``output_dir/audit.json`` holds the canaries, their coins and their losses before
  training (written before the first step; a resumed run reads them back, since the losses before
  training cannot be recomputed from a trained model) and, at the end, their losses after, the
  guesses and the result. It stays beside the model, never in ``model/`` (the coins are the
  auditor's secret while the audit matters).
* **The report.** ``privacy_report.json`` and ``metrics.json`` get an ``audit`` entry: the bound,
  the counts, and what the canaries cost (their share of the rows and of the tokens, which is their
  share of the training compute in expectation, and the seconds spent scoring them after training).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from dpscale.audit_run import CanaryAudit
from dpscale.errors import CheckpointError, ConfigError
from dpscale.noise import load_noise_key

__all__ = ["JobCanaries", "canary_rows", "plant_canaries"]

PROMPT_TOKENS, TARGET_TOKENS, TEXT_TOKENS, CLASSIFICATION_TOKENS = 8, 8, 16, 12
_CONTENT_PURPOSE = "canary-audit canaries v1"
RECORD = "audit.json"


def canary_rows(config, tokenizer, labels, key, used_tokens=()) -> list[dict]:
    """``config.audit_canaries`` rows in the job's table format, random tokens decoded to text.

    Each canary gets tokens of its own: the ordinary tokens (no special ones) the training data
    never uses, shuffled by the run's key and dealt out in turn, then the used ones, and round
    again only when the vocabulary runs out. What a member canary teaches the model (its tokens
    after its prompt, its label for its tokens) then helps no other canary, so its loss moves where
    it was trained on and barely elsewhere: the audit's power, never its validity, rests on this."""
    seed = load_noise_key(key).derive_seed(_CONTENT_PURPOSE)
    rng = np.random.default_rng(int.from_bytes(seed, "big"))
    special = set(tokenizer.all_special_ids)
    ordinary = [i for i in range(len(tokenizer)) if i not in special]
    if len(ordinary) < 2:
        raise ConfigError("The tokenizer has fewer than two ordinary tokens to build canaries from.")
    used = set(used_tokens)
    pool = np.concatenate([rng.permutation([i for i in ordinary if i not in used]).astype(np.int64),
                           rng.permutation([i for i in ordinary if i in used]).astype(np.int64)])
    if config.task == "classification":
        lengths = (CLASSIFICATION_TOKENS,)
    elif config.text_column:
        lengths = (TEXT_TOKENS,)
    else:
        lengths = (PROMPT_TOKENS, TARGET_TOKENS)
    dealt = np.resize(pool, config.audit_canaries * sum(lengths)).reshape(config.audit_canaries, sum(lengths))

    def text(ids) -> str:
        return tokenizer.decode(ids.tolist(), skip_special_tokens=True)

    rows = []
    for tokens in dealt:
        if config.task == "classification":
            rows.append({config.text_column: text(tokens), config.label_column: labels[int(rng.integers(len(labels)))]})
        elif config.text_column:
            rows.append({config.text_column: text(tokens)})
        else:
            rows.append({config.prompt_column: text(tokens[:PROMPT_TOKENS]),
                         config.target_column: text(tokens[PROMPT_TOKENS:])})
    return rows


class JobCanaries:
    """The job's audit: the CanaryAudit, its rows, and where its record goes."""

    def __init__(self, config, task, audit: CanaryAudit, rows: list[dict], key_fingerprint: str,
                 canary_data, real_data) -> None:
        self.config = config
        self.task = task
        self.audit = audit
        self.rows = rows
        self.key_fingerprint = key_fingerprint
        self.output = Path(config.output_dir)
        m, n = len(rows), len(real_data)
        canary_tokens, real_tokens = _tokens(canary_data), _tokens(real_data)
        self.cost = {
            "canary_fraction_of_rows": m / (n + m),  # of the expected batch, so of the steps' examples
            "canary_fraction_of_tokens": None if canary_tokens is None or real_tokens is None
            else canary_tokens / (canary_tokens + real_tokens),
        }

    def weigh(self, losses_fn):
        return self.audit.weigh(losses_fn)

    def _losses(self, model, device):
        return lambda batch: self.task.losses(model, batch, device)

    def start(self, model, device, *, resumed: bool, main_process: bool = True) -> None:
        """The canaries' losses before training: computed now, or read back on resume."""
        path = self.output / RECORD
        if resumed:
            if not path.is_file():
                raise CheckpointError(
                    f"{self.output} holds a checkpoint of a run started without --audit (no {RECORD}): the canaries' "
                    "losses before training are lost. Rerun without --audit, or with --no-resume or another "
                    "--output-dir to start an audited run.")
            record = json.loads(path.read_text())
            if (record.get("key_fingerprint") != self.key_fingerprint or record.get("rows") != self.rows
                    or record.get("coins") != self.audit.coins.astype(int).tolist()):
                raise CheckpointError(f"{path} records other canaries (another key or --audit-canaries) than this "
                                      "run's: resume with the same options and key, or start over (--no-resume).")
            self.audit.before = np.asarray(record["loss_before"], dtype=np.float64)
            return
        self.audit.start(self._losses(model, device), model=model)
        if main_process:
            self.output.mkdir(parents=True, exist_ok=True)
            self._write({"key_fingerprint": self.key_fingerprint, "rows": self.rows,
                         "coins": self.audit.coins.astype(int).tolist(), "loss_before": self.audit.before.tolist()})

    def finish(self, model, device, privacy: dict, *, main_process: bool = True) -> dict:
        """Score the final model, bound epsilon, and add the result to the record and the privacy
        report; returns the ``audit`` entry of metrics.json."""
        start = time.perf_counter()
        result = self.audit.finish(self._losses(model, device), epsilon=privacy["epsilon"], delta=privacy["delta"],
                                   model=model)
        entry = {**result.as_dict(), **self.cost, "scoring_seconds": round(time.perf_counter() - start, 2),
                 "record": RECORD, "describe": result.describe()}
        if main_process:
            record = json.loads((self.output / RECORD).read_text())
            record.update({"loss_after": self.audit.after.tolist(), "result": entry})
            self._write(record)
            report_path = self.output / "privacy_report.json"
            if report_path.is_file():
                report = json.loads(report_path.read_text())
                report["audit"] = entry
                report_path.write_text(json.dumps(report, indent=2) + "\n")
        return entry

    def _write(self, record: dict) -> None:
        path = self.output / RECORD
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(record, indent=1) + "\n")
        temporary.replace(path)


def plant_canaries(config, task, tokenizer, *, key, build) -> JobCanaries:
    """Add the canaries to ``task.train`` (its dataset becomes N + m rows with weights) and return
    the job's audit. ``build(rows)`` tokenises rows as the job's training data (its dataset class)."""
    real = task.train.dataset
    used = {token for ids in getattr(real, "columns", {}).get("input_ids", ()) for token in ids}
    rows = canary_rows(config, tokenizer, task.labels, key, used)
    canary_data = build(rows)
    audit = CanaryAudit([canary_data.dataset[j] for j in range(len(canary_data.dataset))], key=key,
                        guesses=config.audit_guesses, confidence=config.audit_confidence,
                        collate=task.train.collate, batch_size=config.eval_batch_size)
    task.train.dataset = audit.wrap(real)
    return JobCanaries(config, task, audit, rows, load_noise_key(key).fingerprint, canary_data.dataset, real)


def _tokens(dataset) -> int | None:
    columns = getattr(dataset, "columns", None)
    if not columns or "input_ids" not in columns:
        return None
    return sum(len(ids) for ids in columns["input_ids"])
