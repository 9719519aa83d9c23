"""User-level DP (DPConfig(privacy_unit="user")): the unit clipped is the sum of one user's
examples' gradients, users are what the loader draws, and epsilon speaks of users.

Every check is against a one-user-at-a-time loop in float64: for each sampled user, the sum of
their examples' gradients (autograd on one example at a time), clipped, summed over users and
divided by the expected number of users.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from dpscale import DPConfig, PrivacyEngine
from dpscale.accounting import calibrate_noise_multiplier, compute_epsilon
from dpscale.cli import main as cli
from dpscale.driver import run_logical_step, run_steps
from dpscale.errors import ConfigError, LossShapeError, SamplingError
from dpscale.noise import NoiseKey
from dpscale.sampling import DPDataLoader
from tests.oracle import assert_close, clipped_sum, per_example_grads
from tests.test_models import gpt2, llama

KEY = NoiseKey(bytes(range(32)))
LENGTH = 6
ARCHS = {"gpt2": lambda: gpt2(True), "llama": llama}  # both with tied input and output embeddings


def _inputs(vocab: int, batch: int, seed: int) -> dict:
    ids = torch.randint(1, vocab, (batch, LENGTH), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # a right-padded example
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _per_user(grads: dict[str, torch.Tensor], users: list) -> dict[str, torch.Tensor]:
    """{name: [U, *shape]}: each user's examples' gradients summed, users in order of first appearance."""
    order = list(dict.fromkeys(users))
    rows = {u: [i for i, v in enumerate(users) if v == u] for u in order}
    return {n: torch.stack([g[rows[u]].sum(0) for u in order]) for n, g in grads.items()}


def _user_config(**overrides) -> DPConfig:
    settings = {"max_grad_norm": 1.0, "expected_batch_size": 2.5, "noise_multiplier": 0.0, "privacy_unit": "user",
                "examples_per_user": 3}
    return DPConfig(**{**settings, **overrides})


def _engine(model: nn.Module, config: DPConfig, **kwargs) -> PrivacyEngine:
    model.zero_grad(set_to_none=True)
    return PrivacyEngine(model, config, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), **kwargs)


# exactness against the one-user loop ------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("clip_fn", ["abadi", "automatic"])
@pytest.mark.parametrize("k", [1, 3])
def test_user_norms_and_grads_match_one_user_loop(arch, clipping, clip_fn, k):
    model, loss_fn, _ = ARCHS[arch]()
    vocab = model.config.vocab_size
    # two backward calls of one step (accumulation); with k = 3 users have 1, 2 or 3 examples,
    # not adjacent in the micro-batch
    micro = [[4, 1, 4, 8, 1, 4], [5, 6, 5]] if k == 3 else [[4, 1, 7, 8, 2, 3], [5, 6, 9]]
    batches = [_inputs(vocab, len(users), seed) for seed, users in enumerate(micro)]
    unit_grads = [_per_user(per_example_grads(model, inputs, loss_fn, len(users)), users)
                  for inputs, users in zip(batches, micro)]
    flat_norms = torch.cat([sum(g.flatten(1).pow(2).sum(1) for g in grads.values()).sqrt() for grads in unit_grads])
    radius = float(flat_norms.median())  # some users clipped, some not
    config = _user_config(max_grad_norm=radius, clipping=clipping, clip_fn=clip_fn, examples_per_user=k)
    engine = _engine(model, config)
    for j, (inputs, users) in enumerate(zip(batches, micro)):
        # with k = 1 the users may be left out (each example is its own user)
        engine.backward(loss_fn(model, inputs), **({} if k == 1 and j == 1 else {"users": users}))
        totals, _ = clipped_sum(unit_grads[j], engine.clipping, config.expected_batch_size)
        assert engine.last_norms.shape == (len(set(users)),)
        assert_close(engine.last_norms, totals, 1e-6, "per-user norms")
    expected = {n: sum(clipped_sum(g, engine.clipping, config.expected_batch_size)[1][n] for g in unit_grads)
                for n in engine.parameters}
    got = engine.clipped_sums()
    for n in engine.parameters:
        assert_close(got[n], expected[n], 1e-6, f"clipped sum of {n}")
    engine.detach()


def _user_dataset(vocab: int, sizes: list[int], seed: int = 0):
    """A list dataset of token sequences, and the user of each example, the users' examples
    interleaved in dataset order."""
    owners = [f"user{u}" for u, size in enumerate(sizes) for _ in range(size)]
    random.Random(seed).shuffle(owners)
    ids = torch.randint(1, vocab, (len(owners), LENGTH), generator=torch.Generator().manual_seed(seed))
    rows = [{"input_ids": ids[i], "attention_mask": torch.ones(LENGTH, dtype=torch.long), "labels": ids[i]}
            for i in range(len(owners))]
    return rows, owners


@pytest.mark.parametrize("arch", ARCHS)
def test_loader_run_matches_one_user_loop(arch):
    """The engine's own loader and step driver: users drawn at q, at most k of each user's
    examples (round-robin), each user whole in one micro-batch; p.grad per step equals the loop."""
    model, loss_fn, _ = ARCHS[arch]()
    sizes = [1, 5, 2, 3, 1, 6, 2, 4]  # users 1 and 5 have more than k = 3 examples
    data, owners = _user_dataset(model.config.vocab_size, sizes)
    k, micro_size, steps = 3, 4, 4
    config = _user_config(max_grad_norm=2.0, expected_batch_size=4, dataset_size=len(sizes), steps=steps,
                          examples_per_user=k, clipping="per_layer")
    engine = _engine(model, config, noise_key=KEY)
    loader = engine.make_data_loader(data, max_physical_batch_size=micro_size, user_ids=owners)
    assert loader.dataset_size == len(sizes) and loader.privacy_unit == "user"
    brought: dict[str, list[int]] = {u: [] for u in set(owners)}
    drawn_any = False
    for batch in loader:
        chunks = batch.micro_batches._chunks
        seen: set[str] = set()
        for chunk, units in zip(chunks, batch.micro_batches.units):
            assert len(chunk) <= micro_size
            for user in dict.fromkeys(units):
                mine = [i for i, u in zip(chunk, units) if u == user]
                assert user not in seen, "a user split across micro-batches"
                seen.add(user)
                name = loader.user_names[user]
                assert all(owners[i] == name for i in mine)
                assert len(mine) == min(k, sizes[int(name[4:])])
                brought[name].extend(mine)
        assert batch.global_size == len(seen) == len(batch.users)
        run_logical_step(engine, batch, lambda micro: loss_fn(model, micro), close_step=False)
        expected = {n: torch.zeros_like(p) for n, p in engine.parameters.items()}
        for j, units in enumerate(batch.micro_batches.units):
            micro = batch.micro_batches[j]
            with engine.paused():  # the reference's own forwards and autograd.grad, unrecorded
                grads = _per_user(per_example_grads(model, micro, loss_fn, len(units)), list(units))
            _, sums = clipped_sum(grads, engine.clipping, config.expected_batch_size)
            for n in expected:
                expected[n] += sums[n]
        got = engine.clipped_sums()
        for n in engine.parameters:
            if batch.indices:
                drawn_any = True
                assert_close(got[n], expected[n], 1e-6, f"step {batch.step}: clipped sum of {n}")
            else:
                assert not got[n].any()
        engine.step()
    assert drawn_any and engine.steps_taken == steps
    assert len(brought["user1"]) > k and len(brought["user5"]) > k  # users with more than k, drawn twice or more
    for name, picks in brought.items():  # round-robin over each user's examples, in dataset order
        mine = [i for i, u in enumerate(owners) if u == name]
        assert picks == [mine[j % len(mine)] for j in range(len(picks))], name
    engine.detach()


def test_loader_resume_replays_the_round_robin():
    data, owners = _user_dataset(61, [1, 5, 2, 3, 1, 6, 2, 4])

    def loader():
        return DPDataLoader(data, sample_rate=0.5, max_physical_batch_size=3, seed=7, user_ids=owners,
                            examples_per_user=2, steps=6)

    def picks(batches):
        return [(b.step, b.indices, b.micro_batches.units) for b in batches]

    straight = picks(list(loader()))
    first = loader()
    picks(b for _, b in zip(range(3), first))
    state = json.loads(json.dumps(first.state_dict()))  # plain types
    resumed = loader()
    resumed.load_state_dict(state)
    assert picks(list(resumed)) == straight[3:]
    assert any(len(set(units)) < len(units) for _, _, chunks in straight for units in chunks), "k = 2 never used"


# the DP definition at user level -----------------------------------------------------------------


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("clip_fn", ["abadi", "automatic"])
def test_removing_one_user_moves_the_clipped_sum_by_at_most_R(clipping, clip_fn):
    """Neighbouring batches differ by one user with all their examples (seeded random group
    sizes): B times the clipped sum moves by at most R, and by R itself when that user is clipped."""
    model, loss_fn, _ = gpt2(True)
    radius, expected_users = 0.05, 2.0  # small: every user is clipped
    for seed in range(2):
        rng = random.Random(seed)
        users = [u for u in range(4) for _ in range(rng.randint(1, 3))]
        rng.shuffle(users)
        inputs = _inputs(model.config.vocab_size, len(users), 10 + seed)
        config = _user_config(max_grad_norm=radius, expected_batch_size=expected_users, clipping=clipping,
                              clip_fn=clip_fn)

        def scaled_sum(keep: list[int], config=config, inputs=inputs, users=users) -> torch.Tensor:
            engine = _engine(model, config)
            engine.backward(loss_fn(model, {k: v[keep] for k, v in inputs.items()}), users=[users[i] for i in keep])
            total = torch.cat([g.flatten() for g in engine.clipped_sums().values()]) * expected_users
            engine.detach()
            return total

        full = scaled_sum(list(range(len(users))))
        for removed in set(users):
            moved = float((full - scaled_sum([i for i, u in enumerate(users) if u != removed])).norm())
            assert moved <= radius * (1 + 1e-9), (removed, moved)
            if clip_fn == "abadi" and clipping == "flat":
                assert moved == pytest.approx(radius, rel=1e-9)


# accounting over users ---------------------------------------------------------------------------


def _linear_run(config: DPConfig, owners: list[int], steps: int) -> PrivacyEngine:
    torch.manual_seed(0)
    model = nn.Linear(4, 2).double()
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(len(owners), 4, generator=g, dtype=torch.float64),
                                          torch.randn(len(owners), 2, generator=g, dtype=torch.float64))
    engine = PrivacyEngine(model, config, noise_key=KEY, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    loader = engine.make_data_loader(data, max_physical_batch_size=4, user_ids=owners)
    run_steps(engine, loader, lambda micro: (model(micro[0]) - micro[1]).pow(2).sum(1), max_steps=steps)
    return engine


def test_accountant_over_users_equals_dpscale_epsilon(capsys):
    owners = [i % 40 for i in range(100)]  # 40 users with 2 or 3 examples each
    sigma, users_per_step, steps = 1.3, 5, 3
    config = DPConfig(max_grad_norm=1.0, expected_batch_size=users_per_step, noise_multiplier=sigma, dataset_size=40,
                      privacy_unit="user", examples_per_user=2, steps=steps)
    engine = _linear_run(config, owners, steps)
    assert engine.steps_taken == steps and engine.sample_rate == users_per_step / 40
    expected = compute_epsilon(sigma, users_per_step / 40, steps, engine.delta)
    assert engine.epsilon() == pytest.approx(expected, rel=1e-12)
    assert cli(["epsilon", "--sigma", str(sigma), "--batch-size", str(users_per_step), "--dataset-size", "40",
                "--steps", str(steps), "--privacy-unit", "user", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["epsilon"] == pytest.approx(engine.epsilon(), rel=1e-12)
    assert printed["privacy_unit"] == "user" and printed["delta"] == engine.delta
    report = engine.privacy_report()
    assert report["privacy_unit"] == "user" and report["dataset_size"] == 40 and report["examples_per_user"] == 2
    assert "user" in report["protects"]
    assert cli(["epsilon", "--sigma", "1", "-q", "0.1", "--steps", "3", "--delta", "1e-5",
                "--privacy-unit", "user"]) == 0
    assert "per user" in capsys.readouterr().out


def test_calibration_over_users_equals_dpscale_calibrate(capsys):
    config = DPConfig(max_grad_norm=1.0, expected_batch_size=5, target_epsilon=3.0, dataset_size=40, steps=20,
                      privacy_unit="user")
    engine = PrivacyEngine(nn.Linear(4, 2), config, noise_key=KEY)
    sigma = calibrate_noise_multiplier(3.0, engine.delta, 5 / 40, 20)
    assert engine.noise_multiplier == pytest.approx(sigma, rel=1e-12)
    assert cli(["calibrate", "--epsilon", "3", "--batch-size", "5", "--dataset-size", "40", "--steps", "20",
                "--privacy-unit", "user", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["noise_multiplier"] == pytest.approx(sigma, rel=1e-12)


# refusals ----------------------------------------------------------------------------------------


def test_config_refusals():
    with pytest.raises(ConfigError, match="privacy_unit must be one of"):
        _user_config(privacy_unit="person")
    with pytest.raises(ConfigError, match="privacy_unit='user'"):
        DPConfig(max_grad_norm=1.0, expected_batch_size=2, noise_multiplier=1.0, examples_per_user=2)
    with pytest.raises(ConfigError, match="examples_per_user must be a positive integer"):
        _user_config(examples_per_user=0)
    with pytest.raises(ConfigError, match="sampling='poisson'"):
        _user_config(sampling="shuffle")
    assert _user_config(examples_per_user=None).examples_per_user == 1


def test_loader_refusals():
    data = torch.utils.data.TensorDataset(torch.randn(6, 4), torch.randn(6, 2))
    owners = [0, 0, 1, 2, 2, 2]
    engine = PrivacyEngine(nn.Linear(4, 2), _user_config(dataset_size=3), noise_key=KEY)
    with pytest.raises(ConfigError, match="user_ids="):
        engine.make_data_loader(data, max_physical_batch_size=4)
    with pytest.raises(ConfigError, match="one user id per example"):
        engine.make_data_loader(data, max_physical_batch_size=4, user_ids=owners[:-1])
    with pytest.raises(ConfigError, match="names a column"):
        engine.make_data_loader(data, max_physical_batch_size=4, user_ids="author")
    with pytest.raises(ConfigError, match="exceeds max_physical_batch_size=2"):
        engine.make_data_loader(data, max_physical_batch_size=2, user_ids=owners)
    with pytest.raises(ConfigError, match="belong to 2 users"):
        engine.make_data_loader(data, max_physical_batch_size=4, user_ids=[0, 0, 1, 1, 1, 1])
    with pytest.raises(ConfigError, match="exceeds max_physical_batch_size"):
        DPDataLoader(data, sample_rate=0.5, max_physical_batch_size=2, user_ids=owners, examples_per_user=3)
    per_example = PrivacyEngine(nn.Linear(4, 2), DPConfig(max_grad_norm=1.0, expected_batch_size=2,
                                                          noise_multiplier=1.0, dataset_size=6), noise_key=KEY)
    with pytest.raises(ConfigError, match="privacy_unit='user'"):
        per_example.make_data_loader(data, max_physical_batch_size=4, user_ids=owners)
    assert engine.make_data_loader(data, max_physical_batch_size=3, user_ids=owners).dataset_size == 3


def test_backward_refusals():
    model = nn.Linear(4, 2).double()
    x = torch.randn(4, 4, dtype=torch.float64)

    def losses():
        return model(x).pow(2).sum(1)

    engine = _engine(model, _user_config(examples_per_user=2))
    with pytest.raises(ConfigError, match="needs the user of each example"):
        engine.backward(losses())
    with pytest.raises(LossShapeError, match="one per example"):
        engine.backward(losses(), users=[0, 1, 2])
    with pytest.raises(SamplingError, match="more than examples_per_user=2"):
        engine.backward(losses(), users=[7, 7, 7, 1])
    engine.backward(losses(), users=[7, 7, 1, 2])
    with pytest.raises(SamplingError, match=r"User\(s\) \[7\] already had examples"):
        engine.backward(losses(), users=[3, 7, 4, 5])
    engine.step()
    engine.backward(losses(), users=[3, 7, 4, 5])  # a new step: user 7 may come again
    engine.step()
    engine.detach()
    example_level = _engine(model, DPConfig(max_grad_norm=1.0, expected_batch_size=2, noise_multiplier=0.0))
    with pytest.raises(ConfigError, match="privacy_unit='example'"):
        example_level.backward(losses(), users=[0, 1, 2, 3])
    example_level.detach()


def test_cli_refuses_user_level_shuffle(capsys):
    assert cli(["epsilon", "--sigma", "1", "-q", "0.1", "--steps", "3", "--delta", "1e-5", "--privacy-unit", "user",
                "--sampling", "shuffle", "--accountant", "rdp"]) == 2
    assert "Poisson" in capsys.readouterr().err


# scale-out -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_equal_one_at_user_level(tmp_path):
    """DDP over 2 gloo processes, users (not examples) split across ranks, k = 2 with users of up to
    3 examples: after 2 noised steps the parameters equal the one-process run to 1e-5."""
    from tests import distributed_worker as worker
    from tests.launcher import launch_workers

    spec = {"case": "ddp", "users": True, "clipping": "flat", "batches": None, "steps": 2}
    results = launch_workers(Path(worker.__file__), spec, tmp_path, 2, 120.0)
    for rank, (code, err) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{err[-3000:]}"
    expected = worker.run(spec, 0, 1)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert set(ranks[0]) == set(expected)
    for name, value in expected.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"ranks disagree on {name}"
        assert torch.allclose(ranks[0][name], value, rtol=1e-5, atol=1e-5), name
