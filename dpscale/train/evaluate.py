"""Evaluation for ``dpscale train``: eval loss and accuracy, greedy generations and BLEU.

The eval losses are the per-example losses training uses (``dpscale.losses``), averaged over
examples: for a causal LM, each example's mean token loss on its target tokens, then the mean
over examples. Every function runs under ``torch.no_grad()`` with the model in eval mode and
gives each module back the training flag it had.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from dpscale.errors import ConfigError
from dpscale.losses import causal_lm_losses, sequence_classification_losses
from dpscale.train.data import (
    CausalLMData,
    ClassificationData,
    end_id,
    padding_id,
    prompt_ids,
)

_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` and ``torch.no_grad()`` for the block; afterwards every module has the
    training flag it had before (a frozen submodule left in eval mode stays so)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for module, training in modes:
            module.training = training


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _batches(dataset, collate, batch_size: int, device: torch.device):
    if batch_size < 1:
        raise ConfigError(f"batch_size {batch_size} must be at least 1.")
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        yield {key: value.to(device) for key, value in collate(items).items()}


def evaluate_classification(model: nn.Module, data: ClassificationData, batch_size: int = 64) -> dict[str, float]:
    """{"loss": mean cross-entropy over the examples, "accuracy": fraction of argmax hits}."""
    if len(data.dataset) == 0:
        raise ConfigError("The eval data has no examples.")
    total, correct, count = 0.0, 0, 0
    with evaluating(model):
        for batch in _batches(data.dataset, data.collate, batch_size, _device(model)):
            labels = batch.pop("labels")
            logits = model(**{k: v for k, v in batch.items() if k in _MODEL_INPUTS}).logits
            total += float(sequence_classification_losses(logits, labels).sum())
            correct += int((logits.argmax(-1) == labels).sum())
            count += labels.shape[0]
    return {"loss": total / count, "accuracy": correct / count}


def evaluate_causal_lm(model: nn.Module, data: CausalLMData, batch_size: int = 16) -> dict[str, float]:
    """{"loss": the mean over examples of each example's mean next-token loss on its target
    tokens} (the target's EOS included; the prompt and padding excluded)."""
    if len(data.dataset) == 0:
        raise ConfigError("The eval data has no examples.")
    total, count = 0.0, 0
    with evaluating(model):
        for batch in _batches(data.dataset, data.collate, batch_size, _device(model)):
            labels = batch.pop("labels")
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            total += float(causal_lm_losses(logits, labels).sum())
            count += labels.shape[0]
    return {"loss": total / count}


def generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    *,
    batch_size: int = 64,
) -> list[str]:
    """Greedy continuations of ``prompts`` (as ``CausalLMData.prompts`` gives them: the prompt
    and its separator), one string per prompt, in order. Prompts are tokenised as in training
    (BOS if the tokenizer uses one), batched by length with padding on the LEFT, and each
    continuation is decoded alone, cut at the first EOS and at the first newline after any leading
    blank lines, and stripped."""
    if max_new_tokens < 1 or batch_size < 1:
        raise ConfigError(f"max_new_tokens {max_new_tokens} and batch_size {batch_size} must be at least 1.")
    from transformers import GenerationConfig

    pad, eos = padding_id(tokenizer), end_id(tokenizer)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=eos,
        use_cache=True,  # training turns the model config's cache off; decoding needs it
    )
    encoded = [prompt_ids(tokenizer, prompt) for prompt in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(encoded)
    device = _device(model)
    with evaluating(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            length = max(len(encoded[i]) for i in chunk)
            input_ids = torch.full((len(chunk), length), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), length), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids = encoded[i]
                if ids:
                    input_ids[row, length - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                    attention_mask[row, length - len(ids) :] = 1
            generated = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config
            )
            for row, i in enumerate(chunk):
                tokens = generated[row, length:].tolist()
                if eos in tokens:
                    tokens = tokens[: tokens.index(eos)]
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                outputs[i] = text.strip().split("\n", 1)[0].strip()  # leading blank lines are not the answer
    return outputs


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu's defaults: 13a tokenisation, case-sensitive, exponential
    smoothing) of one hypothesis per segment against that segment's references; segments may
    have different numbers of references (E2E: several per meaning representation)."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ConfigError(f"{len(hypotheses)} hypotheses for {len(references)} reference lists.")
    if not hypotheses:
        raise ConfigError("BLEU of an empty corpus is undefined.")
    if any(len(refs) == 0 for refs in references):
        raise ConfigError("Every hypothesis needs at least one reference.")
    width = max(len(refs) for refs in references)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams).score)
