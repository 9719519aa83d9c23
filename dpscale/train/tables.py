"""Tables for ``dpscale train``: rows read from a file, and where each row came from.

    read_table(path)          rows from CSV, TSV, JSON lines or a folder saved with datasets
    read_located(path)        the same rows as a Table, which knows each row's line in the file
    default_e2e()             the packaged E2E development split, divided by meaning representation
    split_by_column(rows, c)  a deterministic train / eval split with no value of c in both parts
    user_ids(rows, c)         the user of every row (user-level privacy), checked

A file is read whole and decoded as UTF-8 first, so that a byte of another encoding is reported
with its line (and the fix), never as Python's UnicodeDecodeError from inside the csv module.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import importlib.resources
import io
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpscale.errors import ConfigError, DataError

__all__ = ["FORMATS", "Table", "default_e2e", "read_located", "read_table", "require_columns", "split_by_column",
           "user_ids"]

Row = dict[str, Any]

FORMATS = "CSV (.csv), TSV (.tsv), JSON lines (.jsonl or .json) or a folder saved with datasets' save_to_disk"

_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?")


@dataclass(frozen=True)
class Table:
    """The rows of one data source, and the line each row starts on where the format has lines
    (CSV, TSV, JSON lines; None for a JSON array or a saved datasets folder), so that a message can
    name the line to fix."""

    source: str
    rows: list[Row]
    lines: list[int] | None = None

    def where(self, index: int) -> str:
        """"path, line n" (or "path, row i" where the format has no lines)."""
        if self.lines is not None:
            return f"{self.source}, line {self.lines[index]}"
        return f"{self.source}, row {index}"

    def head(self, count: int | None) -> Table:
        """The first ``count`` rows (all with None)."""
        if not count:
            return self
        return Table(self.source, self.rows[:count], None if self.lines is None else self.lines[:count])


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
    and a record with the wrong number of fields are refused. A file that is not UTF-8 is refused
    naming the line of its first foreign byte."""
    return read_located(path, split=split, quotes=quotes).rows


def read_located(path: str | Path, *, split: str | None = None, quotes: bool = True) -> Table:
    """``read_table``'s rows as a Table that knows each row's line."""
    path = Path(path)
    if path.is_dir():
        return Table(str(path), _read_saved_dataset(path, split))
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


def _decode(path: Path) -> str:
    """The file's text (a UTF-8 BOM dropped), or a DataError naming the line and column of the first
    byte that is not UTF-8 and how to convert the file."""
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise DataError(
            f"{path}, line {line}, column {column}: byte 0x{data[error.start]:02x} is not UTF-8 (the file seems to be "
            f"in another encoding, such as Latin-1 or Windows-1252). Save it as UTF-8, e.g. "
            f"`iconv -f cp1252 -t utf-8 {path} > {path.stem}.utf8{path.suffix}`, and give that file."
        ) from None


def _read_delimited(path: Path, delimiter: str, quotes: bool) -> Table:
    reader = csv.reader(io.StringIO(_decode(path), newline=""), delimiter=delimiter,
                        quoting=csv.QUOTE_MINIMAL if quotes else csv.QUOTE_NONE)
    header = next(reader, None)
    if not header:
        raise ConfigError(f"{path} is empty: a CSV or TSV file needs a header line naming its columns.")
    if len(set(header)) != len(header):
        raise ConfigError(f"{path} repeats a column name in its header {header}.")
    records, lines = [], []
    last = reader.line_num  # the line the previous record ended on
    for record in reader:
        start, last = last + 1, reader.line_num
        if not record:
            continue  # a blank line
        where = f"{path}, record {len(records) + 1} (line {start})"
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
        lines.append(start)
    columns = [_infer_column([record[j] for record in records]) for j in range(len(header))]
    rows = [{name: columns[j][i] for j, name in enumerate(header)} for i in range(len(records))]
    return Table(str(path), rows, lines)


def _infer_column(values: list[str]) -> list[str] | list[int] | list[float]:
    if values and all(_INT.fullmatch(value) for value in values):
        return [int(value) for value in values]
    if values and all(_FLOAT.fullmatch(value) for value in values):
        return [float(value) for value in values]
    return values


def _read_json(path: Path) -> Table:
    text = _decode(path)
    lines: list[int] | None = []
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path} is not valid JSON: {error}.") from None
        lines = None
    else:
        rows = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ConfigError(f"{path}, line {line_number} is not one JSON object: {error}.") from None
            lines.append(line_number)
    table = Table(str(path), rows, lines)
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ConfigError(f"{table.where(index)} is {type(row).__name__}, not a JSON object of column: value.")
    return table


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


def user_ids(rows: Sequence[Row], column: str, where: Callable[[int], str] | None = None) -> list:
    """The value of ``column`` in every row, in row order: the user each row belongs to, for
    user-level privacy. Refused, naming the row (``where(index)``, e.g. ``Table.where``: the file and
    line): a missing column, an empty value (a row without a user would be its own user, an
    unprotected person), a value that cannot key a table (a list)."""
    where = where or (lambda index: f"Training row {index}")
    try:
        require_columns(rows, [column], "The training data")
    except ConfigError as error:
        raise ConfigError(f"{error} The user column (--user-column, user_column:) must be one of them.") from None
    users = [row[column] for row in rows]
    for index, user in enumerate(users):
        if user is None or user == "":
            raise DataError(
                f"{where(index)} has no user in column {column!r}: at user level every row must name its "
                "user; fill it in or drop the row."
            )
        try:
            hash(user)
        except TypeError:
            raise DataError(
                f"{where(index)} names its user with a {type(user).__name__} ({user!r}) in column {column!r}; "
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
