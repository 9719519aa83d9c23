"""Tables and tokenised datasets for ``dpscale train``.

    read_table(path)          rows from CSV, TSV, JSON lines or a folder saved with datasets
    default_e2e()             the packaged E2E development split, divided by meaning representation
    split_by_column(rows, c)  a deterministic train / eval split with no value of c in both parts
    user_ids(rows, c)         the user of every row (user-level privacy), checked
    ClassificationData        one text (or text pair) -> one label; items are unpadded
    CausalLMData              prompt + separator + target + EOS, loss on the target only

Every item is one example (one sequence), one row: the privacy unit, unless a user column makes
all the rows of one user the unit (``user_ids``; the datasets keep one item per row). Items are unpadded; ``collate``
pads a batch on the right to its longest item. The datasets are plain map-style datasets, so
any sampler (Poisson sampling included) can draw from them.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.resources
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dpscale.errors import ConfigError

Row = dict[str, Any]

FORMATS = "CSV (.csv), TSV (.tsv), JSON lines (.jsonl or .json) or a folder saved with datasets' save_to_disk"
IGNORE_INDEX = -100
DEFAULT_SEPARATOR = "\n"

_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?")


# ---------------------------------------------------------------------------------------------
# Tables


def read_table(path: str | Path, *, split: str | None = None, quotes: bool = True) -> list[Row]:
    """Rows of a table as a list of dicts, one per example.

    CSV and TSV files need a header line; a column whose every value is an integer (or a
    decimal number) is read as ints (floats), any other column as strings. JSON lines files
    hold one object per line (a ``.json`` file may also hold one array of objects); their
    values are kept as they are. A folder written by ``datasets.Dataset.save_to_disk`` is read
    with ``datasets.load_from_disk``; for a saved ``DatasetDict`` name the ``split`` unless
    there is only one.

    CSV and TSV fields may be quoted (as Python's csv module and pandas write them); with
    ``quotes=False`` every character is read literally, as GLUE-style TSV files need when a text
    holds an unbalanced quote. A TSV field holding a line break (the sign of an unclosed quote)
    and a record with the wrong number of fields are refused."""
    path = Path(path)
    if path.is_dir():
        return _read_saved_dataset(path, split)
    if not path.exists():
        raise ConfigError(f"No data at {path}: give a file or folder in one of these formats: {FORMATS}.")
    suffix = path.suffix.lower()
    if split is not None:
        raise ConfigError(f"split={split!r} applies only to a saved datasets folder, not to the file {path}.")
    if suffix in (".csv", ".tsv"):
        return _read_delimited(path, "\t" if suffix == ".tsv" else ",", quotes)
    if suffix in (".jsonl", ".json"):
        return _read_json(path)
    raise ConfigError(f"Cannot read {path}: unknown format {suffix or '(no suffix)'!r}; give {FORMATS}.")


def _read_delimited(path: Path, delimiter: str, quotes: bool) -> list[Row]:
    with path.open(newline="", encoding="utf-8-sig") as stream:  # -sig: drop a BOM
        reader = csv.reader(stream, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if quotes else csv.QUOTE_NONE)
        header = next(reader, None)
        if not header:
            raise ConfigError(f"{path} is empty: a CSV or TSV file needs a header line naming its columns.")
        if len(set(header)) != len(header):
            raise ConfigError(f"{path} repeats a column name in its header {header}.")
        records = []
        for record in reader:
            if not record:
                continue  # a blank line
            where = f"{path}, record {len(records) + 1} (ending on line {reader.line_num})"
            if len(record) != len(header):
                raise ConfigError(
                    f"{where}: {len(record)} fields where the header has {len(header)} ({header}); "
                    f"check the delimiter and the quoting of that record."
                )
            if delimiter == "\t" and any("\n" in field or "\r" in field for field in record):
                raise ConfigError(
                    f"{where}: a field holds a line break, the sign of an unclosed quote; "
                    f"read_table(..., quotes=False) takes quotes literally."
                )
            records.append(record)
    columns = [_infer_column([record[j] for record in records]) for j in range(len(header))]
    return [{name: columns[j][i] for j, name in enumerate(header)} for i in range(len(records))]


def _infer_column(values: list[str]) -> list[str] | list[int] | list[float]:
    if values and all(_INT.fullmatch(value) for value in values):
        return [int(value) for value in values]
    if values and all(_FLOAT.fullmatch(value) for value in values):
        return [float(value) for value in values]
    return values


def _read_json(path: Path) -> list[Row]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path} is not valid JSON: {error}.") from None
    else:
        rows = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ConfigError(f"{path}, line {line_number} is not one JSON object: {error}.") from None
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ConfigError(f"{path}: row {index} is {type(row).__name__}, not a JSON object of column: value.")
    return rows


def _read_saved_dataset(path: Path, split: str | None) -> list[Row]:
    if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        raise ConfigError(f"{path} is a folder but not one saved with datasets' save_to_disk; give {FORMATS}.")
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"{path} is a saved datasets folder: install the datasets package to read it.") from None
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            if len(loaded) != 1:
                raise ConfigError(f"{path} holds the splits {sorted(loaded)}: name one (split=...).")
            split = next(iter(loaded))
        if split not in loaded:
            raise ConfigError(f"{path} has no split {split!r}; it holds {sorted(loaded)}.")
        loaded = loaded[split]
    elif split is not None:
        raise ConfigError(f"{path} holds one dataset without splits; drop split={split!r}.")
    return loaded.to_list()


def require_columns(rows: Sequence[Row], columns: Iterable[str | None], what: str = "the data") -> None:
    """Raise ConfigError naming the columns present when a row lacks one of ``columns``."""
    wanted = [column for column in columns if column is not None]
    if not rows:
        raise ConfigError(f"{what} has no rows.")
    for index, row in enumerate(rows):
        missing = [column for column in wanted if column not in row]
        if missing:
            where = "" if index == 0 else f" (in row {index})"
            raise ConfigError(
                f"{what} has no column {', '.join(repr(c) for c in missing)}{where}; "
                f"its columns are {', '.join(repr(c) for c in row)}."
            )


def user_ids(rows: Sequence[Row], column: str) -> list:
    """The value of ``column`` in every row, in row order: the user each row belongs to, for
    user-level privacy. Refused, naming the row: a missing column, an empty value (a row without a
    user would be its own user, an unprotected person), a value that cannot key a table (a list)."""
    try:
        require_columns(rows, [column], "The training data")
    except ConfigError as error:
        raise ConfigError(f"{error} The user column (--user-column, user_column:) must be one of them.") from None
    users = [row[column] for row in rows]
    for index, user in enumerate(users):
        if user is None or user == "":
            raise ConfigError(
                f"Training row {index} has no user in column {column!r}: at user level every row must name its "
                "user; fill it in or drop the row."
            )
        try:
            hash(user)
        except TypeError:
            raise ConfigError(
                f"Training row {index} names its user with a {type(user).__name__} ({user!r}) in column {column!r}; "
                "user ids must be strings or numbers."
            ) from None
    return users


def split_by_column(rows: Sequence[Row], column: str, eval_fraction: float = 0.1) -> tuple[list[Row], list[Row]]:
    """(train, eval): every row whose ``column`` value is among the chosen eval values goes to
    eval, the rest to train, so that no value is in both parts. The eval values are the
    round(eval_fraction * n_values) values with the smallest SHA-256 of their text: the split
    depends on the values only, not on the order of the rows or on any random state."""
    if not 0.0 < eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction {eval_fraction!r} must lie strictly between 0 and 1.")
    require_columns(rows, [column])
    values = sorted({str(row[column]) for row in rows}, key=lambda v: hashlib.sha256(v.encode("utf-8")).hexdigest())
    n_eval = round(eval_fraction * len(values))
    if n_eval == 0 or n_eval == len(values):
        raise ConfigError(
            f"{len(values)} distinct values of {column!r} cannot be split with eval_fraction {eval_fraction}: "
            f"one part would be empty."
        )
    chosen = set(values[:n_eval])
    train = [row for row in rows if str(row[column]) not in chosen]
    held_out = [row for row in rows if str(row[column]) in chosen]
    return train, held_out


def default_e2e(eval_fraction: float = 0.2) -> tuple[list[Row], list[Row]]:
    """The packaged E2E development split (CC BY-SA 4.0, see default_data/ATTRIBUTION.md) as
    (train rows, eval rows), columns "mr" and "ref", split by meaning representation: no MR in
    both parts, about ``eval_fraction`` of the MRs in eval, the same split on every call. The
    default 0.2 holds out 109 of the 547 MRs, so that BLEU is read on at least 100 of them."""
    resource = importlib.resources.files("dpscale.train") / "default_data" / "e2e_dev.csv"
    with importlib.resources.as_file(resource) as path:
        rows = read_table(path)
    return split_by_column(rows, "mr", eval_fraction)


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
