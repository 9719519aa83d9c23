"""Auditing the user's own run (`dpscale train --audit`, `dpscale.CanaryAudit`): canaries planted
with keyed coins in a fixed dataset of N + m rows, an excluded canary adds exactly nothing to a
step (against a float64 loop over the examples without it), the bound against a direct scipy
inversion of the paper's theorem, and the whole job on a tiny GPT-2: a correct run (stopped and
resumed) stays below the accountant's epsilon, the same run with clipping bypassed inside this test
refutes it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from torch import nn

import dpscale
import dpscale.group_clipping
from dpscale.audit import epsilon_lower_bound
from dpscale.audit_run import WEIGHT_KEY, CanaryAudit
from dpscale.cli import main as cli
from dpscale.config import DPConfig
from dpscale.errors import ConfigError
from dpscale.noise import NoiseKey
from tests.oracle import assert_close, clipped_sum, per_example_grads
from tests.tiny_models import E2E_ROWS, write_e2e_csv

torch.set_num_threads(1)
KEY = NoiseKey(bytes(range(32)))


# the bound against a direct computation -------------------------------------------------------------


def _scipy_p_value(m, r, v, eps, delta):
    from scipy.stats import binom

    p = math.exp(eps) / (1 + math.exp(eps))
    beta = binom.sf(v - 1, r, p)  # P[Bin(r, p) >= v]
    if delta == 0 or v == 0:
        return beta
    cdf = binom.cdf(np.arange(-1, v), r, p)  # cdf[k + 1] = P[Bin <= k], k = -1..v-1
    alpha = max((cdf[v] - cdf[v - i]) / i for i in range(1, v + 1))  # P[v - i <= Bin < v] / i
    return beta + 2 * m * delta * alpha


@pytest.mark.parametrize("m,r,v,delta", [(400, 100, 100, 1e-5), (400, 100, 97, 1e-5), (1000, 100, 85, 0.0),
                                         (200, 50, 50, 4e-4), (1000, 200, 160, 1e-6)])
def test_the_bound_is_the_root_of_the_theorem_computed_by_scipy(m, r, v, delta):
    from scipy.optimize import brentq

    def excess(eps):
        return _scipy_p_value(m, r, v, eps, delta) - 0.05

    expected = brentq(excess, 0.0, 20.0, xtol=1e-12) if excess(0.0) < 0 else 0.0
    assert expected > 0.5
    assert epsilon_lower_bound(m, r, v, delta=delta, confidence=0.95) == pytest.approx(expected, abs=1e-7)


# the coins and the dataset ------------------------------------------------------------------------------


def test_the_coins_are_keyed_recorded_and_fair():
    items = [{"x": torch.zeros(2)}] * 2000
    first, again = CanaryAudit(items, key=KEY), CanaryAudit(items, key=KEY)
    other = CanaryAudit(items, key=NoiseKey(bytes(range(1, 33))))
    assert np.array_equal(first.coins, again.coins) and not np.array_equal(first.coins, other.coins)
    assert abs(first.included - 1000) < 4 * math.sqrt(500)  # Bin(2000, 1/2): 4 standard deviations
    with pytest.raises(ConfigError, match="secret key"):
        CanaryAudit(items, key=None)
    assert dpscale.CanaryAudit is CanaryAudit and "CanaryAuditResult" in dir(dpscale)


def test_the_training_set_has_every_canary_row_whatever_the_coins():
    data = [{"x": torch.full((2,), float(i))} for i in range(5)]
    canaries = [{"x": torch.full((2,), -1.0 - j)} for j in range(40)]
    audit = CanaryAudit(canaries, key=KEY, guesses=4)
    wrapped = audit.wrap(data)
    assert len(wrapped) == 45
    assert [float(wrapped[i][WEIGHT_KEY]) for i in range(5)] == [1.0] * 5
    assert [float(wrapped[5 + j][WEIGHT_KEY]) for j in range(40)] == audit.coins.astype(float).tolist()
    assert torch.equal(wrapped[7]["x"], canaries[2]["x"]) and torch.equal(wrapped[-1]["x"], canaries[-1]["x"])
    tuple_audit = CanaryAudit([(torch.ones(2), torch.tensor(0))] * 40, key=KEY, guesses=4)
    tuples = tuple_audit.wrap([(torch.zeros(2), torch.tensor(1))] * 5)
    assert len(tuples[44]) == 3 and float(tuples[44][2]) == float(audit.coins[-1])
    with pytest.raises(ConfigError, match="no 'canary_weight'"):
        audit.weigh(lambda batch: batch["x"].sum(1))({"x": torch.zeros(3, 2)})


def test_an_excluded_canary_adds_exactly_nothing_to_the_step():
    """The engine's clipped sum over a batch of real rows and canaries (losses weighed by the coins)
    equals, in float64, the clipped sum of a one-example-at-a-time loop over the same batch with the
    excluded canaries removed: the add/remove neighbour the accountant covers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    data = [{"x": torch.randn(4, dtype=torch.float64), "y": torch.tensor(i % 3)} for i in range(6)]
    canaries = [{"x": 5 * torch.randn(4, dtype=torch.float64), "y": torch.tensor(j % 3)} for j in range(10)]
    audit = CanaryAudit(canaries, key=KEY, guesses=2)
    assert 0 < audit.included < 10
    wrapped = audit.wrap(data)
    batch = torch.utils.data.default_collate([wrapped[i] for i in range(len(wrapped))])

    def losses(inputs):
        return nn.functional.cross_entropy(model(inputs["x"]), inputs["y"], reduction="none")

    config = DPConfig(max_grad_norm=0.5, expected_batch_size=8.0, noise_multiplier=0.0, clip_fn="abadi")
    engine = dpscale.PrivacyEngine(model, config, optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    engine.backward(audit.weigh(losses)(batch))
    got = {n: g.clone() for n, g in engine.clipped_sums().items()}
    clipping = engine.clipping
    engine.detach()

    keep = torch.tensor([True] * 6 + audit.coins.tolist())
    kept = {"x": batch["x"][keep], "y": batch["y"][keep]}
    grads = per_example_grads(model, kept, lambda mdl, one: losses(one), int(keep.sum()))
    _, expected = clipped_sum(grads, clipping, 8.0)
    for name, value in expected.items():
        assert_close(got[name], value, 1e-10, name)
    # and the weights matter: unweighted, the excluded canaries would move the sum
    all_grads = per_example_grads(model, {"x": batch["x"], "y": batch["y"]}, lambda mdl, one: losses(one), 16)
    _, unweighted = clipped_sum(all_grads, clipping, 8.0)
    assert any((unweighted[n] - expected[n]).abs().max() > 1e-3 for n in expected)


def test_the_guesses_and_the_bound_from_scores():
    audit = CanaryAudit([{"x": torch.zeros(1)}] * 300, key=KEY, guesses=(40, 20))
    perfect = audit.coins.astype(float) + np.linspace(0, 0.5, 300)  # members above every non-member
    result = audit.result(perfect, epsilon=1.0, delta=1e-5)
    assert (result.guesses, result.correct) == (60, 60)
    assert result.epsilon_lower_bound == pytest.approx(epsilon_lower_bound(300, 60, 60, delta=1e-5))
    assert result.epsilon_lower_bound == result.epsilon_ceiling and result.refutes_accountant
    reversed_ = audit.result(-perfect, epsilon=1.0, delta=1e-5)
    assert reversed_.correct == 0 and reversed_.epsilon_lower_bound == 0.0 and not reversed_.refutes_accountant


# your own loop -------------------------------------------------------------------------------------------


def test_from_a_users_own_loop_with_the_engines_loader():
    """A user's loop: their TensorDataset (tuple items), the engine's Poisson loader over N + m rows,
    run_steps, then the audit scores the final model."""
    torch.manual_seed(1)
    n, m = 200, 60
    x, y = torch.randn(n, 6), torch.randint(0, 4, (n,))
    data = torch.utils.data.TensorDataset(x, y)
    canaries = [(3 * torch.randn(6), torch.randint(0, 4, ())) for _ in range(m)]  # random points, random labels
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))

    def losses(batch):
        inputs, labels = batch
        return nn.functional.cross_entropy(model(inputs), labels, reduction="none")

    audit = CanaryAudit(canaries, key=KEY, guesses=6)
    train_set = audit.wrap(data)
    config = DPConfig(max_grad_norm=1.0, expected_batch_size=26.0, dataset_size=len(train_set), steps=10,
                      noise_multiplier=1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    engine = dpscale.PrivacyEngine(model, config, optimizer=optimizer, noise_key=KEY)
    loader = engine.make_data_loader(train_set, max_physical_batch_size=32)
    assert engine.sample_rate == pytest.approx(26 / (n + m))
    before = audit.start(losses, model=model)
    dpscale.run_steps(engine, loader, audit.weigh(losses), max_steps=10)
    result = audit.finish(losses, epsilon=engine.epsilon(), delta=engine.delta, model=model)
    assert model.training  # given back as it was
    # recomputed by hand from the recorded losses and coins
    scores = before - audit.canary_losses(losses)
    top = np.argsort(-scores, kind="stable")[:6]
    assert result.correct == int(audit.coins[top].sum())
    assert result.accountant_epsilon == pytest.approx(engine.epsilon()) and math.isfinite(result.accountant_epsilon)
    assert result.epsilon_lower_bound < result.accountant_epsilon
    engine.detach()


# the job ----------------------------------------------------------------------------------------------------


def word_tokenizer(extra: int = 3000):
    """A word-level tokenizer: the E2E rows' words and ``extra`` filler words, so that canaries have
    tokens of their own (the BPE test tokenizer's 400 tokens are too few for 400 canaries of 16)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for row in E2E_ROWS for w in (row["mr"] + " " + row["ref"]).split()})
    vocab = {t: i for i, t in enumerate(["<|endoftext|>", "[UNK]", *words, *(f"w{i}" for i in range(extra))])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>",
                                                eos_token="<|endoftext|>", unk_token="[UNK]")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit_job")
    tokenizer = word_tokenizer()
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    transformers.GPT2LMHeadModel(config).save_pretrained(root / "gpt2")
    tokenizer.save_pretrained(root / "gpt2")
    key = root / "noise.key"  # a fixed key: the same coins, batches and noise on every run of the tests
    key.write_text(bytes(range(32)).hex())
    key.chmod(0o600)
    return {"model": root / "gpt2", "data": write_e2e_csv(root / "e2e.csv"), "key": key}


# 64 E2E rows and 400 canaries (N = 464), B = 32, 20 steps at epsilon 1, delta 1e-5, R = 0.01 (Abadi):
# each canary is drawn about 1.4 times; 100 member guesses (at most 3.48 if all are right)
RUN = ("--epsilon", "1", "--delta", "1e-5", "--batch-size", "32", "--micro-batch", "32", "--max-steps", "20",
       "--max-grad-norm", "0.01", "--clip-fn", "abadi", "--lr", "1e-2", "--trainable", "all",
       "--audit", "--audit-canaries", "400", "--audit-guesses", "100")


def train(job, out: Path, *flags) -> dict:
    assert cli(["train", "--model", str(job["model"]), "--data", str(job["data"]), "--eval-data", str(job["data"]),
                "--noise-key", str(job["key"]), "--output-dir", str(out), "--max-eval-examples", "16",
                "--generations", "0", *RUN, *flags]) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow  # whole jobs: 60 to 95 s each measured here on a heavily loaded machine
def test_a_correct_run_stopped_and_resumed_stays_below_the_accountant(job, tmp_path):
    train(job, tmp_path, "--stop-after", "12")
    first = json.loads((tmp_path / "audit.json").read_text())
    metrics = train(job, tmp_path)  # resumes at step 12: the losses before training are read back
    audit, report = metrics["audit"], json.loads((tmp_path / "privacy_report.json").read_text())
    record = json.loads((tmp_path / "audit.json").read_text())
    assert metrics["steps"] == 20 and report["audit"] == audit == record["result"]
    assert record["loss_before"] == first["loss_before"] and record["coins"] == first["coins"]
    assert (report["dataset_size"], metrics["train_examples"]) == (464, 464)
    assert report["sample_rate"] == pytest.approx(32 / 464)
    # the coins are the key's, the same as CanaryAudit draws for this key
    assert record["coins"] == CanaryAudit([0] * 400, key=job["key"]).coins.astype(int).tolist()
    # the result recomputed from the record: top 100 of (before - after)
    scores = np.array(record["loss_before"]) - np.array(record["loss_after"])
    top = np.argsort(-scores, kind="stable")[:100]
    correct = int(np.array(record["coins"])[top].sum())
    assert audit["correct"] == correct and audit["guesses"] == 100
    assert audit["epsilon_lower_bound"] == pytest.approx(epsilon_lower_bound(400, 100, correct, delta=1e-5))
    assert audit["accountant_epsilon"] == report["epsilon"] <= 1.0
    assert audit["epsilon_lower_bound"] < audit["accountant_epsilon"] and not audit["refutes_accountant"]
    assert audit["epsilon_ceiling"] > 3 and 0 < audit["canary_fraction_of_rows"] == pytest.approx(400 / 464)
    assert not (tmp_path / "model" / "audit.json").exists()


@pytest.mark.slow  # whole jobs: 60 to 95 s each measured here on a heavily loaded machine
def test_the_same_run_with_clipping_bypassed_is_refuted(job, tmp_path, monkeypatch):
    # Broken inside this test only: every per-example squared norm under-reported 10^8-fold, so no
    # gradient is clipped (the run's gradients are ~10^2 R); noise and accounting are untouched.
    real = dpscale.group_clipping.total_squared_norm
    monkeypatch.setattr(dpscale.group_clipping, "total_squared_norm", lambda *a, **k: real(*a, **k) / 1e8)
    audit = train(job, tmp_path)["audit"]
    assert audit["accountant_epsilon"] <= 1.0
    assert audit["refutes_accountant"] and audit["epsilon_lower_bound"] > 2 * audit["accountant_epsilon"]


def test_a_checkpoint_without_the_record_is_not_resumed_with_audit(job, tmp_path, capsys):
    train(job, tmp_path, "--stop-after", "1")
    (tmp_path / "audit.json").unlink()
    args = ["train", "--model", str(job["model"]), "--data", str(job["data"]), "--noise-key", str(job["key"]),
            "--output-dir", str(tmp_path), "--generations", "0", *RUN]
    assert cli(args) == 2
    assert "losses before training are lost" in capsys.readouterr().err


@pytest.mark.parametrize("flags,says", [
    (("--non-private",), "drop --non-private"),
    (("--privacy-unit", "user", "--user-column", "mr"), "--privacy-unit user"),
    (("--audit-guesses", "500"), "add up to at most the 400"),
    (("--audit-confidence", "1.5"), "confidence must lie in"),
])
def test_audit_options_that_cannot_work_are_refused_before_loading(tmp_path, capsys, flags, says):
    args = ["train", "--model", "no/such-model", "--output-dir", str(tmp_path), *RUN, *flags]
    assert cli(args) == 2
    assert says in capsys.readouterr().err
