"""Checks that the batches are the ones the accountant assumes, resume exactly, split over ranks
without loss or overlap, and reach the model as micro-batches without ever collating nothing.

Statistical checks use fixed seeds (so they are repeatable) and bounds of 5 to 6 standard
deviations: a sampler with the wrong rate or correlated draws fails them, a correct one passes with
any seed except with negligible probability.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dpscale.errors import ConfigError
from dpscale.noise import NoiseKey
from dpscale.sampling import DPDataLoader, LogicalBatch, PoissonBatchSampler, ShuffleBatchSampler


def _run_seed() -> bytes:
    """The seed every rank of a run shares: derived from its noise key (PrivacyEngine's loader)."""
    return NoiseKey.generate().derive_seed("sampling")


def _within(count: float, mean: float, var: float, sds: float = 5.0) -> bool:
    return abs(count - mean) <= sds * math.sqrt(var)


def _inclusion_matrix(sampler: PoissonBatchSampler, steps: int) -> np.ndarray:
    hits = np.zeros((steps, sampler.dataset_size), dtype=bool)
    for step in range(steps):
        hits[step, sampler.global_batch(step)] = True
    return hits


# ----------------------------------------------------------------------------- Poisson statistics


def test_each_example_is_included_at_rate_q_independently():
    n, q, steps = 50, 0.1, 2000
    hits = _inclusion_matrix(PoissonBatchSampler(n, q, seed=1234), steps)
    total = hits.sum()
    assert _within(total, n * steps * q, n * steps * q * (1 - q))
    per_example = hits.sum(axis=0)
    assert all(_within(c, steps * q, steps * q * (1 - q), sds=5.5) for c in per_example)
    # Independence across neighbouring examples and across consecutive steps: joint rate q^2.
    pairs = (n - 1) * steps
    joint_examples = (hits[:, :-1] & hits[:, 1:]).sum()
    assert _within(joint_examples, pairs * q * q, pairs * q * q * 3, sds=6)
    pairs = n * (steps - 1)
    joint_steps = (hits[:-1] & hits[1:]).sum()
    assert _within(joint_steps, pairs * q * q, pairs * q * q * 3, sds=6)


def test_batch_sizes_are_binomial():
    n, q, steps = 200, 0.05, 3000
    sampler = PoissonBatchSampler(n, q, seed=99)
    sizes = np.array([len(sampler.global_batch(t)) for t in range(steps)], dtype=float)
    mean, var = n * q, n * q * (1 - q)
    assert _within(sizes.mean(), mean, var / steps)
    # The sample variance has standard deviation about var * sqrt(2 / steps) (2.6% here).
    assert abs(sizes.var(ddof=1) - var) <= 5 * var * math.sqrt(2 / steps)
    # The distribution itself, not just its moments: a fixed-size or shuffled sampler fails this.
    counts = Counter(sizes.astype(int).tolist())
    for k in range(4, 17):
        p = math.comb(n, k) * q**k * (1 - q) ** (n - k)
        assert _within(counts[k], steps * p, steps * p * (1 - p), sds=5.5), k


def test_empty_batches_occur_and_are_yielded_as_empty_lists():
    n, q, steps = 100, 0.01, 600
    sampler = PoissonBatchSampler(n, q, steps=steps, seed=7)
    batches = list(sampler)
    assert len(batches) == steps
    empty = sum(batch == [] for batch in batches)
    p = (1 - q) ** n  # about 0.37
    assert _within(empty, steps * p, steps * p * (1 - p))
    assert all(isinstance(batch, list) for batch in batches)


def test_sample_rate_one_takes_everything():
    sampler = PoissonBatchSampler(5, 1.0, steps=3, seed=0)
    assert list(sampler) == [[0, 1, 2, 3, 4]] * 3


def test_default_steps_is_one_over_q_and_batches_are_sorted_ints():
    sampler = PoissonBatchSampler(1000, 0.03, seed=5)
    assert sampler.steps == math.ceil(1 / 0.03) == len(sampler)  # steps_for_epochs(1, q): one epoch
    assert sampler.expected_batch_size == pytest.approx(30.0)
    for batch in sampler:
        assert batch == sorted(set(batch))
        assert all(type(i) is int and 0 <= i < 1000 for i in batch)


# ----------------------------------------------------------------------------- determinism, resume


def test_batch_of_a_step_depends_only_on_seed_and_step():
    a = PoissonBatchSampler(300, 0.1, steps=40, seed=2024)
    b = PoissonBatchSampler(300, 0.1, steps=40, seed=2024)
    in_order = list(a)
    assert in_order == list(b)
    # Out of order and on another sampler object: the same batch for the same step.
    assert [b.global_batch(t) for t in reversed(range(40))] == in_order[::-1]
    assert len({tuple(batch) for batch in in_order}) == 40  # steps differ
    assert list(PoissonBatchSampler(300, 0.1, steps=40, seed=2025)) != in_order
    # steps per epoch only groups batches; it never changes them
    assert PoissonBatchSampler(300, 0.1, steps=7, seed=2024).global_batch(33) == in_order[33]
    # bytes and int seeds: an int is its little-endian bytes
    assert PoissonBatchSampler(300, 0.1, seed=b"\xe8\x07").global_batch(3) == in_order[3]


def test_fresh_seeds_differ():
    draws = {tuple(PoissonBatchSampler(1000, 0.5, seed=None).global_batch(0)) for _ in range(3)}
    assert len(draws) == 3


def test_epochs_continue_the_step_count_and_never_repeat():
    sampler = PoissonBatchSampler(200, 0.1, steps=10, seed=3)
    first, second = list(sampler), list(sampler)
    assert sampler.next_step == 20
    assert first != second
    assert second == [sampler.global_batch(t) for t in range(10, 20)]


@pytest.mark.parametrize("stop", [0, 1, 7, 19])
def test_resume_from_state_dict_gives_the_identical_remaining_sequence(stop):
    steps, epochs = 20, 2
    reference = PoissonBatchSampler(500, 0.05, steps=steps, seed=None)
    state0 = reference.state_dict()
    uninterrupted = [b for _ in range(epochs) for b in reference]

    first = PoissonBatchSampler(500, 0.05, steps=steps, seed=None)
    first.load_state_dict(state0)
    iterator = iter(first)
    seen = [next(iterator) for _ in range(stop)]
    state = json.loads(json.dumps(first.state_dict()))  # plain types only
    assert state["next_step"] == stop

    resumed = PoissonBatchSampler(500, 0.05, steps=steps, seed=None)  # another fresh seed...
    resumed.load_state_dict(state)  # ...replaced by the saved one
    assert len(resumed) == steps - stop
    rest = list(resumed) + [b for _ in range(epochs - 1) for b in resumed]
    assert seen + rest == uninterrupted


def test_resume_on_another_world_size_draws_the_same_global_batches():
    single = PoissonBatchSampler(400, 0.05, steps=30, seed=11)
    for _ in zip(range(12), single):
        pass
    state = single.state_dict()
    parts = []
    for rank in range(3):
        sampler = PoissonBatchSampler(400, 0.05, steps=30, seed=0, rank=rank, world_size=3)
        sampler.load_state_dict(state)
        parts.append(list(sampler))
    for offset, step in enumerate(range(12, 30)):
        union = sorted(i for part in parts for i in part[offset])
        assert union == single.global_batch(step)


@pytest.mark.parametrize(
    "other",
    [
        lambda: PoissonBatchSampler(401, 0.05, seed=1),
        lambda: PoissonBatchSampler(400, 0.06, seed=1),
        lambda: ShuffleBatchSampler(400, 20, seed=1),
    ],
)
def test_loading_a_state_of_another_mechanism_is_refused(other):
    state = PoissonBatchSampler(400, 0.05, seed=1).state_dict()
    with pytest.raises(ConfigError, match="resume|saved"):
        other().load_state_dict(state)


def test_malformed_state_is_refused():
    sampler = PoissonBatchSampler(10, 0.5, seed=1)
    state = sampler.state_dict()
    with pytest.raises(ConfigError, match="lacks"):
        sampler.load_state_dict({k: v for k, v in state.items() if k != "seed"})
    with pytest.raises(ConfigError, match="byte values"):
        sampler.load_state_dict({**state, "seed": [256]})
    with pytest.raises(ConfigError, match="next_step"):
        sampler.load_state_dict({**state, "next_step": -1})


# ----------------------------------------------------------------------------- ranks


def test_ranks_split_the_global_batch_disjointly_and_agree_on_the_step_count():
    n, q, steps, world = 30, 0.05, 200, 4  # expected global size 1.5: many locally empty parts
    seed = _run_seed()
    reference = PoissonBatchSampler(n, q, steps=steps, seed=seed)
    per_rank = [
        list(PoissonBatchSampler(n, q, steps=steps, seed=seed, rank=r, world_size=world))
        for r in range(world)
    ]
    assert all(len(batches) == steps for batches in per_rank)
    locally_empty_while_global_not = 0
    for step in range(steps):
        parts = [set(batches[step]) for batches in per_rank]
        union = set().union(*parts)
        assert sum(map(len, parts)) == len(union)  # disjoint
        assert sorted(union) == reference.global_batch(step)
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1  # balanced
        locally_empty_while_global_not += bool(union) and min(sizes) == 0
    assert locally_empty_while_global_not > 0


def test_a_rank_iterates_its_positions_of_the_global_batch():
    sampler = PoissonBatchSampler(100, 0.2, steps=5, seed=8, rank=1, world_size=2)
    assert list(sampler) == [sampler.global_batch(t)[1::2] for t in range(5)]


def test_several_ranks_without_a_seed_are_refused():
    with pytest.raises(ConfigError, match=r"derive_seed\("):
        PoissonBatchSampler(100, 0.1, rank=0, world_size=2)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(dataset_size=0, sample_rate=0.1),
        dict(dataset_size=10, sample_rate=0.0),
        dict(dataset_size=10, sample_rate=1.5),
        dict(dataset_size=10, sample_rate=float("nan")),
        dict(dataset_size=10, sample_rate=True),
        dict(dataset_size=10, sample_rate=0.1, steps=0),
        dict(dataset_size=10, sample_rate=0.1, seed=1, rank=2, world_size=2),
        dict(dataset_size=10, sample_rate=0.1, seed=-1),
        dict(dataset_size=10, sample_rate=0.1, seed=1.5),
        dict(dataset_size=10, sample_rate=0.1, seed=b""),
    ],
)
def test_bad_arguments_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        PoissonBatchSampler(**kwargs)


# ----------------------------------------------------------------------------- shuffle


def test_shuffle_gives_fixed_sizes_and_covers_the_dataset_once_per_epoch():
    n, b = 103, 10
    sampler = ShuffleBatchSampler(n, b, seed=4)
    assert (sampler.sampling, sampler.steps, sampler.dataset_size) == ("shuffle", 10, n)
    assert sampler.sample_rate == pytest.approx(b / n)
    epochs = [list(sampler) for _ in range(3)]
    for batches in epochs:
        assert [len(batch) for batch in batches] == [b] * 10
        flat = [i for batch in batches for i in batch]
        assert len(set(flat)) == len(flat) == 100 and set(flat) <= set(range(n))
    assert epochs[0] != epochs[1] != epochs[2]
    left_out = [set(range(n)) - {i for batch in e for i in batch} for e in epochs]
    assert len({frozenset(s) for s in left_out}) > 1  # the dropped remainder moves


def test_shuffle_ranks_and_resume():
    seed = _run_seed()
    reference = ShuffleBatchSampler(60, 9, seed=seed)
    uninterrupted = list(reference) + list(reference)
    ranks = [ShuffleBatchSampler(60, 9, seed=seed, rank=r, world_size=2) for r in range(2)]
    for step, parts in enumerate(zip(*(list(r) for r in ranks))):
        assert sorted(parts[0] + parts[1]) == uninterrupted[step]
        assert not set(parts[0]) & set(parts[1])
    sampler = ShuffleBatchSampler(60, 9, seed=seed)
    head = [next(iter(sampler)) for _ in range(4)]
    resumed = ShuffleBatchSampler(60, 9)
    resumed.load_state_dict(sampler.state_dict())
    assert head + list(resumed) + list(resumed) == uninterrupted


def test_poisson_and_shuffle_report_their_sampling():
    poisson = PoissonBatchSampler(100, 0.1, seed=1)
    assert (poisson.sampling, poisson.sample_rate, poisson.dataset_size) == ("poisson", 0.1, 100)
    assert poisson.steps == 10


# ----------------------------------------------------------------------------- DPDataLoader


class _SpyCollate:
    """Counts calls and fails the test if a collate_fn is ever handed an empty list."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, examples):
        assert examples, "collate_fn called with an empty list"
        self.calls += 1
        return self.inner(examples)


def test_dp_data_loader_on_a_tensor_dataset():
    n, m = 40, 3
    features = torch.arange(n * 2, dtype=torch.float32).reshape(n, 2)
    labels = torch.arange(n)
    collate = _SpyCollate(torch.utils.data.default_collate)
    loader = DPDataLoader(
        TensorDataset(features, labels),
        collate_fn=collate,
        sample_rate=0.08,
        max_physical_batch_size=m,
        steps=150,
        seed=21,
    )
    sampler = PoissonBatchSampler(n, 0.08, steps=150, seed=21)
    assert (loader.sampling, loader.sample_rate, loader.dataset_size, loader.steps) == (
        "poisson",
        0.08,
        n,
        150,
    )
    batches = list(loader)
    assert collate.calls == 0  # nothing collated until a micro-batch is asked for
    assert [b.step for b in batches] == list(range(150))
    empty = 0
    for batch in batches:
        assert isinstance(batch, LogicalBatch)
        assert list(batch.indices) == sampler.global_batch(batch.step)
        assert batch.size == batch.global_size == len(batch.indices)
        micro = list(batch.micro_batches)
        assert len(micro) == len(batch.micro_batches) == math.ceil(batch.size / m)
        assert [mb[0].shape[0] for mb in micro] == [min(m, batch.size - i) for i in range(0, batch.size, m)]
        if micro:
            x, y = (torch.cat(parts) for parts in zip(*micro))
            assert torch.equal(y, torch.tensor(batch.indices))
            assert torch.equal(x, features[list(batch.indices)])
        empty += batch.size == 0
    assert empty > 0  # (1 - 0.08) ** 40 = 3.6% of 150 steps
    assert collate.calls == sum(len(b.micro_batches) for b in batches)


def test_dp_data_loader_ranks_and_resume():
    data = TensorDataset(torch.arange(50))

    def make(rank):
        return DPDataLoader(
            data, sample_rate=0.1, max_physical_batch_size=2, seed=5, rank=rank, world_size=2
        )

    loaders = [make(0), make(1)]
    runs = [list(loader) for loader in loaders]
    assert [len(r) for r in runs] == [10, 10]
    for a, b in zip(*runs):
        assert a.step == b.step and a.global_size == b.global_size == a.size + b.size
        assert not set(a.indices) & set(b.indices)

    fresh = make(0)
    iterator = iter(fresh)
    head = [next(iterator).indices for _ in range(3)]
    resumed = make(0)
    resumed.load_state_dict(fresh.state_dict())
    assert head + [b.indices for b in resumed] == [b.indices for b in runs[0]]


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the a cat dog sat ran on mat far away".split()
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    model = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=model, pad_token="[PAD]", unk_token="[UNK]")


@pytest.mark.parametrize("collator", ["padding", "causal_lm"])
def test_dp_data_loader_on_a_hugging_face_dataset(collator):
    datasets = pytest.importorskip("datasets")
    from transformers import DataCollatorForLanguageModeling, DataCollatorWithPadding

    tokenizer = _tiny_tokenizer()
    sentences = [" ".join(["the cat sat"] * (1 + i % 4) + ["far"] * (i % 3)) for i in range(24)]
    dataset = datasets.Dataset.from_dict(dict(tokenizer(sentences)))
    lengths = [len(ids) for ids in dataset["input_ids"]]
    if collator == "padding":
        inner = DataCollatorWithPadding(tokenizer)
    else:
        inner = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    collate = _SpyCollate(inner)
    loader = DPDataLoader(
        dataset, collate_fn=collate, sample_rate=0.1, max_physical_batch_size=2, steps=60, seed=3
    )
    sizes = []
    for batch in loader:
        sizes.append(batch.size)
        chunks = [list(batch.indices[i : i + 2]) for i in range(0, batch.size, 2)]
        assert len(batch.micro_batches) == len(chunks)
        for chunk, micro in zip(chunks, batch.micro_batches):
            ids = micro["input_ids"]
            assert ids.shape == (len(chunk), max(lengths[i] for i in chunk))  # padded per micro
            assert micro["attention_mask"].sum(dim=1).tolist() == [lengths[i] for i in chunk]
            if collator == "causal_lm":
                assert micro["labels"].shape == ids.shape
            for row, i in zip(ids.tolist(), chunk):
                assert row[: lengths[i]] == dataset[i]["input_ids"]
    assert 0 in sizes and max(sizes) > 2  # empty steps passed through; some split in several


def test_dp_data_loader_shuffle_mode():
    loader = DPDataLoader(
        TensorDataset(torch.arange(30)), sample_rate=0.2, max_physical_batch_size=4, seed=1,
        sampling="shuffle",
    )
    assert (loader.sampling, loader.steps, loader.sample_rate) == ("shuffle", 5, 0.2)
    batches = list(loader)
    assert [[len(mb[0]) for mb in b.micro_batches] for b in batches] == [[4, 2]] * 5
    flat = [i for b in batches for i in b.indices]
    assert sorted(flat) == list(range(30))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(sampling="uniform"),
        dict(sampling="shuffle", steps=3),
        dict(sampling="shuffle", sample_rate=0.01),
        dict(max_physical_batch_size=0),
    ],
)
def test_dp_data_loader_refuses_bad_settings(kwargs):
    settings_ = dict(sample_rate=0.2, max_physical_batch_size=4, seed=1)
    settings_.update(kwargs)
    with pytest.raises(ConfigError):
        DPDataLoader(TensorDataset(torch.arange(30)), **settings_)


def test_dp_data_loader_refuses_an_iterable_dataset():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(3))

    with pytest.raises(ConfigError, match="map-style"):
        DPDataLoader(Stream(), sample_rate=0.5, max_physical_batch_size=1)


def test_poisson_sampler_drives_a_plain_torch_data_loader():
    data = TensorDataset(torch.arange(20))
    sampler = PoissonBatchSampler(20, 0.05, steps=50, seed=9)

    def collate(examples):  # a plain DataLoader hands empty batches to collate_fn
        return torch.utils.data.default_collate(examples) if examples else None

    out = list(DataLoader(data, batch_sampler=sampler, collate_fn=collate))
    assert len(out) == 50 and any(b is None for b in out)
    expected = [PoissonBatchSampler(20, 0.05, seed=9).global_batch(t) for t in range(50)]
    assert [[] if b is None else b[0].tolist() for b in out] == expected


def test_draws_do_not_depend_on_the_chunking_of_the_stream(monkeypatch):
    import dpscale.sampling.samplers as samplers

    whole = [PoissonBatchSampler(50, 0.3, seed=12).global_batch(t) for t in range(5)]
    monkeypatch.setattr(samplers, "_CHUNK", 7)  # 50 examples in 8 chunks of one stream
    chunked = [PoissonBatchSampler(50, 0.3, seed=12).global_batch(t) for t in range(5)]
    assert chunked == whole
