"""Tokenizers and tiny models of real architectures, all built offline, shared by the tests of
``dpscale train`` (its data, evaluation and the whole job)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

E2E_ROWS = [
    {"mr": "name[Alimentum], area[city centre], familyFriendly[no]", "ref": "Alimentum is not family-friendly."},
    {"mr": "name[Alimentum], area[city centre], familyFriendly[no]",
     "ref": "In the city centre, Alimentum is not a family place."},
    {"mr": "name[Aromi], eatType[coffee shop], food[Chinese]", "ref": "Aromi is a Chinese coffee shop."},
    {"mr": "name[The Eagle], priceRange[cheap]", "ref": "The Eagle is a cheap place to eat near the river."},
]


def bpe_tokenizer(bos: bool) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences: GPT-2-like (no pad, BOS = EOS, adds
    nothing) or, with ``bos``, Llama-like (adds <s> before each text, EOS </s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<s>", "</s>"] if bos else ["<|endoftext|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    sentences = [row["mr"] + "\n" + row["ref"] for row in E2E_ROWS] * 5 + ["the film is good", "a dull , bad movie"]
    tokenizer.train_from_iterator(sentences, trainer)
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
        )
        return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )


def tiny_causal_lm(kind: str, tokenizer, tied: bool = True) -> torch.nn.Module:
    """A random GPT-2 or Llama. Tied embeddings make a random model repeat the last input token
    (a newline after an E2E prompt, so an empty generation): generation tests untie them. A wide
    initialisation spreads the token losses (with the default 0.02 every loss is about log V, and
    a batch-token mean could not be told from a mean over examples)."""
    torch.manual_seed(0)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": None}
    ids["initializer_range"] = 0.5
    vocab_size = len(tokenizer)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=128, tie_word_embeddings=tied, **ids
        )
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(
        **ids,
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
    )
    return transformers.LlamaForCausalLM(config)


def save_tiny_causal_lm(folder: Path, kind: str = "gpt2") -> Path:
    """A random tiny causal LM and its tokenizer saved as a local model folder (what a user gives
    ``dpscale train --model``)."""
    tokenizer = bpe_tokenizer(bos=kind == "llama")
    model = tiny_causal_lm(kind, tokenizer, tied=True)
    model.config.initializer_range = 0.02
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_classifier(folder: Path) -> Path:
    """A random tiny BERT sequence classifier (2 labels) with the BPE tokenizer, saved as a folder."""
    tokenizer = bpe_tokenizer(bos=False)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                                     num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_e2e_csv(path: Path, copies: int = 16) -> Path:
    """A small E2E-style table (columns mr, ref) for the job's tests."""
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["mr", "ref"])
        writer.writeheader()
        writer.writerows(E2E_ROWS * copies)
    return path
