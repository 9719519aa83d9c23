"""Tokenised datasets for ``dpscale train`` (the tables they are built from: ``tables.py``, whose
names this module re-exports).

    ClassificationData        one text (or text pair) -> one label; items are unpadded
    CausalLMData              prompt + separator + target + EOS, loss on the target only

Every item is one example (one sequence), one row: the privacy unit, unless a user column makes
all the rows of one user the unit (``user_ids``; the datasets keep one item per row). Items are unpadded; ``collate``
pads a batch on the right to its longest item. The datasets are plain map-style datasets, so
any sampler (Poisson sampling included) can draw from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from dpscale.errors import ConfigError
from dpscale.train.tables import (  # noqa: F401 - the tables' names, where they were first published
    FORMATS,
    Table,
    default_e2e,
    read_located,
    read_table,
    require_columns,
    split_by_column,
    user_ids,
)

Row = dict[str, Any]

IGNORE_INDEX = -100
DEFAULT_SEPARATOR = "\n"

# ---------------------------------------------------------------------------------------------
# Tokenised datasets


class TokenizedDataset(torch.utils.data.Dataset):
    """Map-style dataset of unpadded examples: item i is a dict of 1-D LongTensors (and a
    scalar LongTensor "labels" for classification). Token lists are kept as Python lists and
    turned into tensors when an item is read."""

    def __init__(self, columns: dict[str, list]):
        lengths = {len(values) for values in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"Columns of unequal lengths: { {k: len(v) for k, v in columns.items()} }")
        self.columns = columns
        self._length = lengths.pop()

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {key: torch.tensor(values[index], dtype=torch.long) for key, values in self.columns.items()}


def pad_batch(items: Sequence[dict[str, Tensor]], pad_token_id: int) -> dict[str, Tensor]:
    """Stack items into a batch, padded on the right to the longest item: input_ids with
    ``pad_token_id``, attention_mask and token_type_ids with 0, token labels with -100;
    scalar labels are stacked."""
    if not items:
        raise ValueError("Cannot collate an empty list of items.")
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if values[0].dim() == 0:
            batch[key] = torch.stack(values)
            continue
        fill = pad_token_id if key == "input_ids" else IGNORE_INDEX if key == "labels" else 0
        length = max(value.shape[0] for value in values)
        out = torch.full((len(values), length), fill, dtype=values[0].dtype)
        for row, value in enumerate(values):
            out[row, : value.shape[0]] = value
        batch[key] = out
    return batch


def padding_id(tokenizer) -> int:
    """The id that pads input_ids: the tokenizer's pad token, else its EOS token (GPT-2 has no
    pad token; the padded positions are masked out of attention and of the loss)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ConfigError(f"The tokenizer {type(tokenizer).__name__} has neither a pad token nor an EOS token to pad with.")


def end_id(tokenizer) -> int:
    """The token that ends a target: EOS, else SEP (BERT-style tokenizers)."""
    for token_id in (tokenizer.eos_token_id, getattr(tokenizer, "sep_token_id", None)):
        if token_id is not None:
            return int(token_id)
    raise ConfigError(f"The tokenizer {type(tokenizer).__name__} has no EOS (or SEP) token to end each target with.")


def start_ids(tokenizer) -> list[int]:
    """The ids the tokenizer itself puts before a text (a BOS token, [CLS]; none for GPT-2 or
    SmolLM2), found by tokenising a probe with and without special tokens."""
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    raise ConfigError(f"Cannot tell which special tokens {type(tokenizer).__name__} adds before a text.")


def prompt_ids(tokenizer, text: str) -> list[int]:
    """A prompt as the model sees it in training and generation: BOS (if the tokenizer uses
    one), then the text's tokens."""
    return start_ids(tokenizer) + list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _texts(rows: Sequence[Row], column: str, what: str) -> list[str]:
    texts = []
    for index, row in enumerate(rows):
        value = row[column]
        if not isinstance(value, str):
            raise ConfigError(f"{what}: column {column!r} of row {index} is {value!r}, not a text.")
        texts.append(value)
    return texts


class ClassificationData:
    """Tokenised classification examples (a text, or a text pair, and a label).

    ``labels`` are the label names in id order: the distinct values of ``label_column`` sorted,
    or the given list (pass the training data's labels to the eval data; a label outside them
    is refused)."""

    def __init__(
        self,
        rows: Sequence[Row],
        tokenizer,
        text_column: str = "sentence",
        label_column: str = "label",
        max_length: int = 128,
        labels: Sequence | None = None,
        *,
        text_pair_column: str | None = None,
    ):
        if max_length < 2:
            raise ConfigError(f"max_length {max_length} must be at least 2.")
        require_columns(rows, [text_column, text_pair_column, label_column])
        values = [row[label_column] for row in rows]
        if labels is None:
            try:
                labels = sorted(set(values))
            except TypeError:
                raise ConfigError(
                    f"The labels in column {label_column!r} mix types ({sorted({type(v).__name__ for v in values})}); "
                    f"give labels=[...] in id order."
                ) from None
        self.labels = list(labels)
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"labels {self.labels} repeats a label.")
        ids = {label: index for index, label in enumerate(self.labels)}
        unknown = sorted({repr(v) for v in values if v not in ids})
        if unknown:
            raise ConfigError(
                f"Column {label_column!r} holds labels {', '.join(unknown)} outside the labels {self.labels} "
                f"(eval data must use the training data's labels)."
            )
        texts = _texts(rows, text_column, "classification data")
        pairs = _texts(rows, text_pair_column, "classification data") if text_pair_column else None
        encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length)
        keep = [key for key in ("input_ids", "attention_mask", "token_type_ids") if key in encoded]
        columns = {key: [list(x) for x in encoded[key]] for key in keep}
        columns["labels"] = [ids[v] for v in values]
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_token_id = padding_id(tokenizer)
        self.dataset = TokenizedDataset(columns)

    def __len__(self) -> int:
        return len(self.dataset)

    def collate(self, items: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        return pad_batch(items, self.pad_token_id)


class CausalLMData:
    """Tokenised causal-LM examples.

    With ``prompt_column`` and ``target_column`` (the default, E2E's "mr" and "ref"), example
    = BOS (if the tokenizer uses one) + prompt + separator + target + EOS, with labels -100 on
    the BOS, prompt and separator, so the loss is on the target and its EOS only. With
    ``text_column``, example = BOS + text + EOS and the loss is on the whole text.

    Sequences longer than ``max_length`` are cut on the right (the EOS is then lost); an example
    whose prompt leaves no room for a target token is refused.

    ``prompts`` and ``references`` serve generation: each distinct prompt once, in first-seen
    order, as the model sees it (prompt + separator), with the list of its targets (E2E has
    several references per meaning representation). Both are empty with ``text_column``."""

    def __init__(
        self,
        rows: Sequence[Row],
        tokenizer,
        max_length: int = 128,
        text_column: str | None = None,
        prompt_column: str = "mr",
        target_column: str = "ref",
        separator: str = DEFAULT_SEPARATOR,
    ):
        if max_length < 2:
            raise ConfigError(f"max_length {max_length} must be at least 2.")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.separator = separator
        self.pad_token_id = padding_id(tokenizer)
        self.eos_token_id = end_id(tokenizer)
        start = start_ids(tokenizer)
        input_ids, labels = [], []
        self.prompts: list[str] = []
        self.references: list[list[str]] = []
        if text_column is not None:
            require_columns(rows, [text_column])
            texts = _texts(rows, text_column, "causal-LM data")
            for tokens in tokenizer(texts, add_special_tokens=False)["input_ids"]:
                ids = (start + list(tokens) + [self.eos_token_id])[:max_length]
                input_ids.append(ids)
                labels.append(list(ids))
        else:
            require_columns(rows, [prompt_column, target_column])
            prompts = [p + separator for p in _texts(rows, prompt_column, "causal-LM data")]
            targets = _texts(rows, target_column, "causal-LM data")
            prompt_tokens = tokenizer(prompts, add_special_tokens=False)["input_ids"]
            target_tokens = tokenizer(targets, add_special_tokens=False)["input_ids"]
            too_long = 0
            for head, tail in zip(prompt_tokens, target_tokens):
                head = start + list(head)
                tail = list(tail) + [self.eos_token_id]
                if len(head) >= max_length:
                    too_long += 1
                ids = (head + tail)[:max_length]
                input_ids.append(ids)
                labels.append(([IGNORE_INDEX] * len(head) + tail)[:max_length])
            if too_long:
                raise ConfigError(
                    f"{too_long} of {len(rows)} prompts fill max_length {max_length} tokens, leaving no target token "
                    f"to learn: raise max_length."
                )
            index: dict[str, int] = {}
            for prompt, target in zip(prompts, targets):
                if prompt not in index:
                    index[prompt] = len(self.prompts)
                    self.prompts.append(prompt)
                    self.references.append([])
                self.references[index[prompt]].append(target)
        attention = [[1] * len(ids) for ids in input_ids]
        self.dataset = TokenizedDataset({"input_ids": input_ids, "attention_mask": attention, "labels": labels})

    def __len__(self) -> int:
        return len(self.dataset)

    def collate(self, items: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        return pad_batch(items, self.pad_token_id)
