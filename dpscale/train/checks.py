"""The data of a ``dpscale train`` job, checked before anything expensive or lasting (the model, the
key, the checkpoint folder): every file read and decoded; every column the job uses present; no
empty row and no empty text; every classification label a real one (not empty, not NaN) and, with
``--labels``, one of those; every eval label one the model has a class for; at user level every
row's user named and enough users for the batch. Each refusal is a DataError naming the file, the
line and the fix: a label column holding "nan" would otherwise train a class "nan" in silence.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections import Counter
from dataclasses import dataclass

from dpscale.errors import ConfigError, DataError
from dpscale.train.config import TrainConfig
from dpscale.train.tables import Row, Table, default_e2e, read_located, user_ids

__all__ = ["JobData", "check_data", "describe_labels"]

logger = logging.getLogger(__name__)

# what spreadsheets and pandas write for a missing value (pandas' default na_values), compared lower-case
_MISSING = frozenset({"nan", "-nan", "na", "n/a", "null", "none", "<na>", "#n/a", "nil"})


@dataclass(frozen=True)
class JobData:
    """The job's checked tables; at classification its labels in id order with the training rows of
    each (by the label's text); at user level the user of every training row."""

    train: Table
    eval: Table | None
    labels: list | None = None
    label_counts: dict[str, int] | None = None
    users: list | None = None


def check_data(config: TrainConfig) -> JobData:
    """Read and check every data file of the job (see the module docstring); raise DataError at the
    first problem, naming its file and line."""
    train, evaluation = _tables(config)
    _check_rows(train, _columns(config, evaluation=False), "training")
    if evaluation is not None:
        _check_rows(evaluation, _columns(config, evaluation=True), "eval")
    labels = counts = None
    if config.task == "classification":
        train, evaluation, labels, counts = _labels(config, train, evaluation)
    return JobData(train, evaluation, labels, counts, _users(config, train))


def describe_labels(data: JobData) -> str:
    """'2 classes, in id order: "neg" (30 rows), "pos" (34 rows)' for the log and the console."""
    shown = ", ".join(f"{text!r} ({count} row{'s' if count != 1 else ''})" for text, count in data.label_counts.items())
    return f"{len(data.labels)} classes, in id order: {shown}"


# tables and columns ------------------------------------------------------------------------------


def _tables(config: TrainConfig) -> tuple[Table, Table | None]:
    if config.data is None:
        train_rows, eval_rows = default_e2e()
        train = Table("the packaged E2E split (train part)", train_rows)
        evaluation: Table | None = Table("the packaged E2E split (eval part)", eval_rows)
    else:
        train = read_located(config.data)
        evaluation = read_located(config.eval_data) if config.eval_data else None
    train = train.head(config.max_train_examples)  # every eval row is checked: BLEU may read beyond max_eval_examples
    if not train.rows:
        raise DataError(f"{train.source} has no rows: give training data with one example per row.")
    if evaluation is not None and not evaluation.rows:
        raise DataError(f"{evaluation.source} has no rows: give eval data with one example per row, or drop "
                        "--eval-data.")
    return train, evaluation


def _columns(config: TrainConfig, evaluation: bool) -> list[tuple[str, str]]:
    """(column, the flag that names it) for every column the job reads from each row."""
    if config.task == "classification":
        if evaluation and config.eval_text_column:
            return [(config.eval_text_column, "--eval-text-column"), (config.label_column, "--label-column")]
        return [(config.text_column, "--text-column"), (config.label_column, "--label-column")]
    if config.text_column:
        return [(config.text_column, "--text-column")]
    return [(config.prompt_column, "--prompt-column"), (config.target_column, "--target-column")]


def _check_rows(table: Table, columns: list[tuple[str, str]], what: str) -> None:
    texts = [(column, flag) for column, flag in columns if flag != "--label-column"]
    for index, row in enumerate(table.rows):
        for column, flag in columns:
            if column not in row:
                yaml_key = flag[2:].replace("-", "_")
                raise DataError(
                    f"{table.where(index)}: the {what} data has no column {column!r} ({flag}); its columns are "
                    f"{', '.join(repr(c) for c in row)}. Name the right one with {flag} ({yaml_key}: in the YAML)."
                )
        if row and all(_blank(value) for value in row.values()):
            raise DataError(f"{table.where(index)} is an empty row (every field blank): remove it.")
        for column, flag in texts:
            value = row[column]
            if not isinstance(value, str):
                raise DataError(f"{table.where(index)}: column {column!r} ({flag}) holds {value!r}, not a text.")
            if not value.strip():
                raise DataError(
                    f"{table.where(index)}: column {column!r} ({flag}) is empty: fill it in or remove the row."
                )


def _blank(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


# labels --------------------------------------------------------------------------------------------


def _missing(value) -> str | None:
    """Why ``value`` is no label: empty, a missing-value marker, not finite; None for a real one."""
    if _blank(value):
        return "empty"
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isfinite(value):
        return "not a finite number"
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _MISSING:
            return "a missing-value marker"
        try:
            if not math.isfinite(float(text)):
                return "not a finite number"
        except ValueError:
            pass
    return None


def _labels(config: TrainConfig, train: Table, evaluation: Table | None):
    """(train, eval, labels in id order, training rows per label), every label value replaced by the
    training data's value of the same text, so that the eval file's "1" is the training file's 1."""
    column, stated = config.label_column, config.labels
    canonical: dict[str, object] = {}
    counts: Counter = Counter()
    first: dict[str, int] = {}
    for index, row in enumerate(train.rows):
        text = _check_label(train, index, row[column], column, stated)
        canonical.setdefault(text, row[column])
        first.setdefault(text, index)
        counts[text] += 1
    if stated:
        labels = [canonical[text] if text in canonical else _typed(text, canonical.values()) for text in stated]
        canonical.update({str(label): label for label in labels})
        for text in stated:
            if text not in counts:
                logger.warning("Label %r (--labels) has no training row: the model gets its class, never trained on.",
                               text)
    else:
        labels = sorted(canonical.values(), key=str)
        if len(labels) < 2:
            raise DataError(
                f"Every training row of {train.source} has the label {labels[0]!r} (column {column!r}): a classifier "
                "needs at least two. Check --label-column, or state the labels with --labels."
            )
        for text, count in counts.items():
            if count == 1:
                logger.warning("Label %r has a single training row (%s): if it is a typo, fix it; --labels states the "
                               "expected labels and refuses any other.", text, train.where(first[text]))
    if evaluation is not None:
        for index, row in enumerate(evaluation.rows):
            text = _check_label(evaluation, index, row[column], column, stated)
            if text not in canonical:
                shown = ", ".join(repr(str(label)) for label in labels)
                raise DataError(
                    f"{evaluation.where(index)}: label {row[column]!r} is not among the training labels [{shown}]: the "
                    "model has no class for it. Fix the row or remove it" + (", or add it to --labels." if stated
                                                                            else ".")
                )
    order = [str(label) for label in labels]
    train = _with_canonical(train, column, canonical)
    evaluation = None if evaluation is None else _with_canonical(evaluation, column, canonical)
    return train, evaluation, labels, {text: counts.get(text, 0) for text in order}


def _check_label(table: Table, index: int, value, column: str, stated: list[str] | None) -> str:
    text = str(value)
    if stated and text in stated:
        return text  # a stated label is a label, whatever it looks like ("NA" may be one)
    why = _missing(value)
    if why:
        raise DataError(
            f"{table.where(index)}: the label {value!r} (column {column!r}) is {why}: a classifier would learn it as "
            f"a class of its own. Fill in the row's label or remove the row"
            + (f" (or add {text!r} to --labels if it is a real label)." if stated else
               "; if it is a real label, state the labels with --labels.")
        )
    if stated:
        raise DataError(
            f"{table.where(index)}: the label {value!r} (column {column!r}) is not among --labels {','.join(stated)}: "
            "fix the row, or add the label to --labels."
        )
    return text


def _typed(text: str, values) -> object:
    """A stated label no training row has, typed like the column's labels (ints stay ints)."""
    values = list(values)
    for kind in (int, float):
        if values and all(type(value) is kind for value in values):
            try:
                return kind(text)
            except ValueError:
                return text
    return text


def _with_canonical(table: Table, column: str, canonical: dict[str, object]) -> Table:
    if all(type(row[column]) is type(canonical[str(row[column])]) for row in table.rows):
        return table
    rows: list[Row] = [{**row, column: canonical[str(row[column])]} for row in table.rows]
    return Table(table.source, rows, table.lines)


# users ----------------------------------------------------------------------------------------------


def _users(config: TrainConfig, train: Table) -> list | None:
    """At user level the user of every training row, and a batch size no larger than the users."""
    if config.privacy_unit != "user":
        return None
    users = user_ids(train.rows, config.user_column, train.where)
    count = len(set(users))
    if config.batch_size > count:
        raise ConfigError(
            f"--batch-size {config.batch_size:g} is the expected number of users per step at user level, but the "
            f"training data has {count} users (distinct values of {config.user_column!r}); lower --batch-size to at "
            f"most {count}."
        )
    return users
