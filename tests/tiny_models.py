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


def write_tiny_gguf(path: Path) -> Path:
    """A random tiny Llama as a GGUF file (float32 tensors, byte-level BPE vocabulary of the 256
    byte symbols), the shape of the packaged SmolLM2 file: transformers opens it only with
    ``gguf_file=``."""
    import gguf
    import numpy as np

    # GPT-2's byte-to-symbol map: the printable bytes stand for themselves, the rest from U+0100 on
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    # <|endoftext|> in the vocabulary, as in SmolLM2's: transformers' GGUF tokenizer adds it otherwise, and
    # AutoPeftModel then grows the embeddings to the tokenizer's length
    tokens = ["<|endoftext|>", "<s>", "</s>", *symbols, "\u0120t"]  # and one merge: space + t
    vocab, dim, ffn, layers, heads, kv_heads = len(tokens), 16, 24, 2, 4, 2
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(dim)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(dim // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["\u0120 t"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    rng = np.random.default_rng(0)

    def tensor(name, *shape):
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    tensor("token_embd.weight", vocab, dim)
    for i in range(layers):
        for norm in ("attn_norm", "ffn_norm"):
            tensor(f"blk.{i}.{norm}.weight", dim)
        tensor(f"blk.{i}.attn_q.weight", dim, dim)
        tensor(f"blk.{i}.attn_k.weight", kv_heads * dim // heads, dim)
        tensor(f"blk.{i}.attn_v.weight", kv_heads * dim // heads, dim)
        tensor(f"blk.{i}.attn_output.weight", dim, dim)
        tensor(f"blk.{i}.ffn_gate.weight", ffn, dim)
        tensor(f"blk.{i}.ffn_up.weight", ffn, dim)
        tensor(f"blk.{i}.ffn_down.weight", dim, ffn)
    tensor("output_norm.weight", dim)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
