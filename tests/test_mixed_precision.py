"""bf16 autocast against a float64 loop over single examples, and `dpscale train --mixed-precision`.

Under ``torch.autocast(bfloat16)`` every matmul reads its inputs rounded to bf16 (8 significant
bits: a relative rounding error of at most 2^-9 per operand) and accumulates in float32. The
per-example gradients the engine clips are therefore those of a slightly different function;
along the longest path of a two-layer model (embedding, two blocks of attention and MLP, head,
and back) about 20 matmuls each add at most ~2 x 2^-9 relative error, so the gradients and their
norms agree with the float64 ones to about 20 x 2^-8 ~ 8e-2 in the worst case, and in practice to
~1e-2: the tolerance below is 5e-2 (a float32 run is held to 1e-5 by tests/test_rules.py; a bug in
the rules, e.g. a dropped cross term or a factor computed in bf16 from a wrong operand, shows as
an error of order 1). What must hold EXACTLY, whatever the precision, is the sensitivity: the norm
of each example's clipped contribution that is actually summed is at most R (up to float32
rounding), because the norm and the sum are computed in float32 from the same bf16 factors.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

import dpscale.train.precision as precision
from dpscale import DPConfig, PrivacyEngine, lora
from dpscale.cli import main as cli
from dpscale.errors import ConfigError
from dpscale.losses import causal_lm_losses, sequence_classification_losses
from dpscale.noise import NoiseKey
from tests.oracle import clipped_sum, per_example_grads
from tests.tiny_models import save_tiny_causal_lm, write_e2e_csv

torch.set_num_threads(1)

BF16_RTOL = 5e-2
R = 0.05  # below every example's gradient norm here: every example is clipped


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def _bert():
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=32, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg)


def _case(kind: str, batch: int = 4):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 97, (batch, 10), generator=g)
    if kind == "llama-lora":
        model = lora(_llama(), r=4, alpha=8, task="causal-lm")
        with torch.no_grad():  # lora_B starts at zero, which would leave lora_A without gradient
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
        inputs = {"input_ids": ids}

        def loss_fn(m, x):
            return causal_lm_losses(m(input_ids=x["input_ids"]).logits, x["input_ids"])
    else:
        model = _bert()
        inputs = {"input_ids": ids, "labels": torch.randint(0, 3, (batch,), generator=g)}

        def loss_fn(m, x):
            return sequence_classification_losses(m(input_ids=x["input_ids"]).logits, x["labels"])
    model.train()
    return model, inputs, loss_fn


def _bf16_engine_run(model, inputs, loss_fn, batch):
    config = DPConfig(noise_multiplier=0.0, max_grad_norm=R, expected_batch_size=batch, clip_fn="abadi")
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine = PrivacyEngine(model, config, optimizer=torch.optim.SGD(trainable, lr=0.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = loss_fn(model, inputs)
    engine.backward(losses)
    norms = engine.last_norms.clone()
    sums = {n: g.clone() for n, g in engine.clipped_sums().items()}
    engine.detach()
    return engine, norms, sums


@pytest.mark.parametrize("kind", ["llama-lora", "bert-all"])
def test_bf16_autocast_norms_and_clipped_sums_match_a_float64_loop(kind):
    model, inputs, loss_fn = _case(kind)
    batch = inputs["input_ids"].shape[0]
    engine, norms, sums = _bf16_engine_run(model, inputs, loss_fn, batch)
    assert norms.dtype == torch.float32 and engine.last_clip_factors.dtype == torch.float32
    assert all(s.dtype == torch.float32 for s in sums.values())

    reference = copy.deepcopy(model).double()
    grads = per_example_grads(reference, inputs, loss_fn, batch)
    totals, expected = clipped_sum(grads, engine.clipping, batch)
    assert (totals > R).all()  # every example clipped: the factors are exercised
    torch.testing.assert_close(norms.double(), totals, rtol=BF16_RTOL, atol=0.0)
    whole = torch.sqrt(sum(v.pow(2).sum() for v in expected.values()))
    for name, value in expected.items():
        # a floor of 1e-4 of the whole sum's norm for parameters whose gradient is 0 in exact
        # arithmetic (BERT's key bias: softmax ignores a shift shared by all keys)
        err = float((sums[name].double() - value).norm())
        bound = BF16_RTOL * float(value.norm()) + 1e-4 * float(whole)
        assert err <= bound, f"{kind}: clipped sum of {name} off by {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("kind", ["llama-lora", "bert-all"])
def test_bf16_clipped_contribution_of_each_example_is_within_r(kind):
    # The sensitivity bound, held exactly: example i alone (B = 1), its clipped sum's norm <= R.
    model, inputs, loss_fn = _case(kind)
    for i in range(inputs["input_ids"].shape[0]):
        single = {k: v[i : i + 1] for k, v in inputs.items()}
        _, norms, sums = _bf16_engine_run(model, single, loss_fn, 1)
        total = torch.sqrt(sum(s.double().pow(2).sum() for s in sums.values()))
        assert float(norms[0]) > R
        assert float(total) <= R * (1 + 1e-5), f"example {i}: clipped norm {float(total):.8g} > R {R}"


def test_a_bf16_step_adds_its_noise_in_float32_to_float32_weights():
    model, inputs, loss_fn = _case("llama-lora")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(trainable.values(), lr=1.0)
    config = DPConfig(noise_multiplier=1.0, max_grad_norm=R, expected_batch_size=4, sampling_declared_by_user=True)
    engine = PrivacyEngine(model, config, optimizer=optimizer, noise_key=NoiseKey.generate())
    seen = []
    handle = optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.extend(p.grad.dtype for p in trainable.values()))
    before = {n: p.detach().clone() for n, p in trainable.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = loss_fn(model, inputs)
    engine.backward(losses)
    engine.step()
    handle.remove()
    engine.detach()
    assert seen and set(seen) == {torch.float32}
    assert all(p.dtype == torch.float32 for p in trainable.values())
    moved = [n for n, p in trainable.items() if not torch.equal(p.detach(), before[n])]
    assert len(moved) == len(trainable)  # every coordinate got its float32 noise (sigma R / B = 0.0125)


# --------------------------------------------------------------------------------------------
# dpscale train --mixed-precision


def test_precision_names():
    assert precision.check_mixed_precision_name(None) == "no"
    assert precision.check_mixed_precision_name(False) == "no"  # YAML reads `no` as False
    assert precision.check_mixed_precision_name("BF16") == "bf16"
    with pytest.raises(ConfigError, match="loss scaling.*--mixed-precision bf16"):
        precision.check_mixed_precision_name("fp16")
    with pytest.raises(ConfigError, match="one of"):
        precision.check_mixed_precision_name("fp8")


def test_bf16_on_a_cpu_without_bf16_is_refused_naming_the_fix(monkeypatch):
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)
    with pytest.raises(ConfigError, match="AVX512-BF16.*--mixed-precision no"):
        precision.check_mixed_precision("bf16", torch.device("cpu"))
    precision.check_mixed_precision("no", torch.device("cpu"))
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: True)
    assert precision.check_mixed_precision("bf16", torch.device("cpu")) == "bf16"


def test_cpu_probe_agrees_with_torch():
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    if caps.get("avx512_bf16") or caps.get("amx_bf16"):
        assert precision.cpu_supports_bf16()
    elif caps.get("architecture") == "x86_64":
        assert not precision.cpu_supports_bf16()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed_precision")
    key = root / "noise.key"
    NoiseKey.write_new(key)
    return {"gpt2": save_tiny_causal_lm(root / "gpt2"), "e2e": write_e2e_csv(root / "e2e.csv"), "key": key}


def _job(folders, out, *flags):
    return cli(["train", "--model", str(folders["gpt2"]), "--data", str(folders["e2e"]), "--eval-data",
                str(folders["e2e"]), "--noise-key", str(folders["key"]), "--output-dir", str(out), "--batch-size", "16",
                "--micro-batch", "8", "--max-steps", "2", "--max-eval-examples", "8", "--generations", "2",
                "--max-new-tokens", "3", *flags])


@pytest.mark.parametrize("flag, says", [("fp16", "loss scaling"), ("bf16", "AVX512-BF16")])
def test_the_job_refuses_before_loading_anything(folders, tmp_path, capsys, monkeypatch, flag, says):
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)
    status = cli(["train", "--model", str(tmp_path / "no-such-model"), "--cpu", "--output-dir", str(tmp_path),
                  "--mixed-precision", flag])
    err = capsys.readouterr().err
    assert status == 2 and says in err and "--mixed-precision" in err
    assert "no-such-model" not in err  # refused before the model was looked for


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)  # the bf16 run's process-wide state goes


def test_a_bf16_job_runs_its_forward_under_autocast(folders, tmp_path, monkeypatch, fresh_accelerate_state):
    import dpscale.train.models as models

    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: True)  # bf16 is emulated here: slow, exact
    seen = []
    select = models.select_trainable

    def watched(model, *args, **kwargs):
        model = select(model, *args, **kwargs)
        linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
        linear.register_forward_hook(lambda m, i, o: seen.append((torch.is_autocast_enabled("cpu"), o.dtype)))
        return model

    monkeypatch.setattr(models, "select_trainable", watched)
    assert _job(folders, tmp_path, "--cpu", "--mixed-precision", "bf16", "--trainable", "lora") == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["mixed_precision"] == "bf16" and metrics["steps"] == 2
    assert 0 < metrics["privacy"]["epsilon"] <= 8.0
    assert seen and all(on and dtype == torch.bfloat16 for on, dtype in seen)
