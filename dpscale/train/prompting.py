"""Prompt-based classification with a causal LM: no fresh head, the label words through the LM head.

Li et al. 2022 ("Large language models can be strong differentially private learners") classify
sentences with the pretrained LM head instead of a randomly initialised classifier: the sentence is
rendered with a template ending where a label word would follow ("<sentence> It was"), and the
class is the label word (" terrible", " great") the LM finds most likely next. Under DP this wastes
no budget on learning a head from scratch: the model starts from what it already knows.

    data = PromptClassificationData(rows, tokenizer, label_words=["terrible", "great"],
                                    template="{text} It was", labels=[0, 1])
    losses = label_word_losses(model(**inputs).logits, labels, attention_mask, data.label_word_ids)

Each label word is scored as the single token of " <word>" (a space, then the word: it follows the
template's last word), so a word the tokenizer splits in several tokens is refused, naming it.
Label words are in the order of the labels (sorted values of the label column: SST-2's 0 then 1).
Long sentences are cut so that the template's end always survives: the example ends where the
label word would come.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor, nn

from dpscale.errors import ConfigError
from dpscale.losses import label_word_logits, label_word_losses
from dpscale.train.data import Row, TokenizedDataset, _texts, pad_batch, padding_id, require_columns, start_ids

__all__ = ["DEFAULT_TEMPLATE", "PROMPT_RECORD", "PromptClassificationData", "check_template",
           "evaluate_prompt_classification", "label_word_ids", "write_prompt_record"]

DEFAULT_TEMPLATE = "{text} It was"
PLACEHOLDER = "{text}"
# written beside a saved prompt-classification model: how to classify with it again
PROMPT_RECORD = "dpscale_prompt.json"


def check_template(template: str) -> None:
    if not isinstance(template, str) or template.count(PLACEHOLDER) != 1:
        raise ConfigError(f"prompt_template must hold {PLACEHOLDER} exactly once (where the sentence goes), got "
                          f"{template!r}; e.g. {DEFAULT_TEMPLATE!r}.")
    if template != template.rstrip():
        raise ConfigError(f"prompt_template {template!r} ends with whitespace; end it with the word the label word "
                          "follows (each label word is scored with its own leading space).")


def label_word_ids(tokenizer, words: Sequence[str]) -> list[int]:
    """The token id of " <word>" for each label word; refused unless each is one token and all are
    distinct."""
    if len(words) < 2:
        raise ConfigError(f"Give at least two label words (one per label), got {list(words)}.")
    ids = []
    for word in words:
        tokens = tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise ConfigError(f"Label word {word!r} is {len(tokens)} tokens (' {word.strip()}' -> {tokens}) for this "
                              "tokenizer; choose label words that are one token each (--label-words).")
        ids.append(int(tokens[0]))
    if len(set(ids)) != len(ids):
        raise ConfigError(f"Label words {list(words)} map to repeated tokens {ids}: give distinct words.")
    return ids


class PromptClassificationData:
    """Tokenised prompt-classification examples: BOS (if the tokenizer uses one) + the template
    with the text in it; the label is a scalar, the index of its label word. Items are unpadded;
    ``collate`` pads on the right (which ``label_word_losses`` needs)."""

    def __init__(self, rows: Sequence[Row], tokenizer, *, label_words: Sequence[str], template: str = DEFAULT_TEMPLATE,
                 text_column: str = "sentence", label_column: str = "label", max_length: int = 128,
                 labels: Sequence | None = None):
        check_template(template)
        require_columns(rows, [text_column, label_column])
        values = [row[label_column] for row in rows]
        self.labels = list(labels) if labels is not None else sorted(set(values))
        if len(label_words) != len(self.labels):
            raise ConfigError(f"{len(label_words)} label words {list(label_words)} for {len(self.labels)} labels "
                              f"{self.labels}: give one word per label, in the labels' order.")
        index = {label: k for k, label in enumerate(self.labels)}
        unknown = sorted({repr(v) for v in values if v not in index})
        if unknown:
            raise ConfigError(f"Column {label_column!r} holds labels {', '.join(unknown)} outside {self.labels}.")
        self.label_words = [word.strip() for word in label_words]
        self.label_word_ids = label_word_ids(tokenizer, self.label_words)
        self.template = template
        before, after = template.split(PLACEHOLDER)
        start = start_ids(tokenizer)
        head = start + (list(tokenizer(before, add_special_tokens=False)["input_ids"]) if before else [])
        tail = list(tokenizer(after, add_special_tokens=False)["input_ids"]) if after else []
        room = max_length - len(head) - len(tail)
        if room < 1:
            raise ConfigError(f"The template {template!r} takes {len(head) + len(tail)} tokens, leaving no room for "
                              f"the text within max_length {max_length}: raise max_length.")
        texts = [text.strip() for text in _texts(rows, text_column, "classification data")]
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        input_ids = [head + list(tokens)[:room] + tail for tokens in encoded]
        self.pad_token_id = padding_id(tokenizer)
        masks = [[1] * len(ids) for ids in input_ids]
        self.dataset = TokenizedDataset({"input_ids": input_ids, "attention_mask": masks,
                                         "labels": [index[v] for v in values]})

    def __len__(self) -> int:
        return len(self.dataset)

    def collate(self, items: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        return pad_batch(items, self.pad_token_id)

    def losses(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """[B] per-example losses of a collated batch (on the model's device)."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return label_word_losses(logits, batch["labels"], batch["attention_mask"], self.label_word_ids)


def evaluate_prompt_classification(model: nn.Module, data: PromptClassificationData,
                                   batch_size: int = 32) -> dict[str, float]:
    """{"loss": mean label-word cross-entropy, "accuracy": fraction where the most likely label
    word is the label's}."""
    from dpscale.train.evaluate import _batches, _device, evaluating

    if len(data.dataset) == 0:
        raise ConfigError("The eval data has no examples.")
    total, correct, count = 0.0, 0, 0
    with evaluating(model):
        for batch in _batches(data.dataset, data.collate, batch_size, _device(model)):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            scores = label_word_logits(logits, batch["attention_mask"], data.label_word_ids)
            losses = label_word_losses(logits, batch["labels"], batch["attention_mask"], data.label_word_ids)
            total += float(losses.sum())
            correct += int((scores.argmax(-1) == batch["labels"]).sum())
            count += batch["labels"].shape[0]
    return {"loss": total / count, "accuracy": correct / count}


def write_prompt_record(folder: str | Path, data: PromptClassificationData) -> Path:
    """``dpscale_prompt.json`` beside the saved model: the template, label words, their token ids
    and the labels, so the model classifies again as it was trained to."""
    path = Path(folder) / PROMPT_RECORD
    path.write_text(json.dumps({"template": data.template, "label_words": data.label_words,
                                "label_word_ids": data.label_word_ids, "labels": [str(v) for v in data.labels]},
                               indent=2) + "\n")
    return path
