"""DPTrainer runs shared by tests/test_trainer.py: the same model, data and arguments on one
process (called in the test process) and on each rank of a 2-process run, started by the test with
the environment a launcher sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT):

    python tests/trainer_worker.py spec.json

spec keys: dtype ("float32", "float64"), steps, expected_batch_size, deepspeed (a ZeRO stage or
null), autotp (DeepSpeed AutoTP's tensor-parallel size, with deepspeed), fsdp (true: the Trainer's
fsdp arguments, FSDP2 wrapping each Llama decoder layer; "cpu_fallback": the same arguments with
Accelerate left to fall back to DDP), model ("gpt2", the default, or "llama": a tiny Llama, whose
Linear layers AutoTP splits), out (where rank r writes its final
trainable parameters at full size, rank{r}.pt, its loader's split and privacy state).
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dpscale import DPConfig, PrivacyEngine  # noqa: E402
from dpscale.losses import causal_lm_losses  # noqa: E402
from dpscale.noise import NoiseKey  # noqa: E402

KEY = NoiseKey(bytes(range(32)))
N, T, VOCAB, MICRO, LR = 24, 6, 32, 2, 0.5


def config(spec: dict) -> DPConfig:
    return DPConfig(max_grad_norm=spec.get("max_grad_norm", 0.5),
                    expected_batch_size=spec.get("expected_batch_size", 6),
                    noise_multiplier=spec.get("noise_multiplier", 1.0), dataset_size=N,
                    clipping=spec.get("clipping", "flat"))


def gpt2(dtype: str = "float64") -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    return model.to(getattr(torch, dtype)).train()


def llama(dtype: str = "float32") -> nn.Module:
    """A tiny Llama (attention and MLP biases, no dropout): AutoTP splits its q/k/v, gate/up (rows)
    and o/down (columns) Linear layers; GPT-2's Conv1D layers it does not."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, attention_bias=True, mlp_bias=True,
                      attention_dropout=0.0, max_position_embeddings=16, use_cache=False)
    return LlamaForCausalLM(cfg).to(getattr(torch, dtype)).train()


def model_for(spec: dict) -> nn.Module:
    build = {"gpt2": gpt2, "llama": llama}[spec.get("model", "gpt2")]
    return build(spec.get("dtype", "float64"))


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(0, VOCAB, (N, T), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def collate(examples: list[dict]) -> dict:
    return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


def training_arguments(spec: dict, output_dir: str, **changes):
    from transformers import TrainingArguments

    values = dict(output_dir=output_dir, per_device_train_batch_size=MICRO, max_grad_norm=0, optim="sgd",
                  learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_steps=spec.get("steps", 2),
                  report_to="none", use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
                  dataloader_pin_memory=False, seed=0)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        values.update(ddp_backend="gloo", ddp_timeout=60)
    if spec.get("deepspeed") is not None:
        # use_cpu=True would make the Trainer skip DeepSpeed; DS_ACCELERATOR=cpu puts it on the CPU.
        deepspeed_state()
        ds = deepspeed_config(spec["deepspeed"])
        if spec.get("autotp"):
            ds["tensor_parallel"] = {"autotp_size": spec["autotp"]}
        values.update(deepspeed=ds, use_cpu=False,
                      accelerator_config={"use_configured_state": True})
    if spec.get("fsdp"):
        values.update(fsdp="full_shard",
                      fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
        if spec["fsdp"] != "cpu_fallback":  # else Accelerate runs DDP, which DPTrainer must refuse
            fsdp_state()
            values.update(use_cpu=False, accelerator_config={"use_configured_state": True})
    values.update(changes)
    return TrainingArguments(**values)


def fsdp_state() -> None:
    """Accelerate 1.15 turns its FSDP plugin on only for accelerator types (MULTI_GPU and the like);
    on this CPU it would run DDP. The gloo state is configured first and labelled MULTI_GPU, so that
    the Trainer's Accelerator takes the FSDP plugin built from its own arguments (fsdp, fsdp_config)
    and prepares the model with Accelerate's FSDP2 code, on the CPU."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    PartialState(backend="gloo").distributed_type = DistributedType.MULTI_GPU


def deepspeed_state() -> None:
    """Accelerate 1.15 finds no distributed backend for DeepSpeed on a CPU-only machine and reports
    one process (torch.distributed has two): configure its state with gloo before the Trainer's
    arguments, which then use it (accelerator_config={"use_configured_state": True})."""
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")


def deepspeed_config(stage: int) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "ds_configs", f"zero{stage}.json")) as f:
        ds = json.load(f)
    ds["train_micro_batch_size_per_gpu"] = "auto"  # the Trainer fills it from per_device_train_batch_size
    ds.pop("train_batch_size", None)
    return ds


def trainer(spec: dict, output_dir: str, model: nn.Module | None = None, new_noise_scheme: bool = False, **changes):
    from dpscale.integrations.trainer import DPTrainer

    return DPTrainer(model=model if model is not None else model_for(spec),
                     args=training_arguments(spec, output_dir, **changes), train_dataset=TokenDataset(),
                     data_collator=collate, dp_config=config(spec), noise_key=KEY, new_noise_scheme=new_noise_scheme)


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters at full size (FSDP2's DTensor shards gathered)."""
    return {n: (p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()).clone()
            for n, p in model.named_parameters() if p.requires_grad}


def hand_loop(spec: dict) -> tuple[dict[str, torch.Tensor], float, list[list[int]]]:
    """The reference: PrivacyEngine, its Poisson loader, SGD, ``steps`` logical steps."""
    model = model_for(spec)
    engine = PrivacyEngine(model, config(spec), noise_key=KEY)
    optimizer = engine.attach_optimizer(torch.optim.SGD(engine.parameters.values(), lr=LR))
    loader = engine.make_data_loader(TokenDataset(), max_physical_batch_size=MICRO, collate_fn=collate)
    batches = []
    for _, logical in zip(range(spec.get("steps", 2)), loader):
        batches.append(list(logical.indices))
        for micro in logical.micro_batches:
            engine.backward(causal_lm_losses(model(input_ids=micro["input_ids"]).logits, micro["labels"]))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    params, epsilon = trainable(model), engine.epsilon()
    engine.detach()
    return params, epsilon, batches


def full_size(engine: PrivacyEngine) -> dict[str, torch.Tensor]:
    """The trainable parameters at full size: under AutoTP this rank holds shards of the split
    Linear layers (the backend's layouts), all-gathered over the tensor-parallel group."""
    params = trainable(engine.model)
    layouts = getattr(engine.backend, "_layouts", {})
    if layouts:
        from tests.autotp_worker import full_parameters

        full = full_parameters(engine.model, layouts, engine.backend.model_parallel_group)
        params = {name: full[name] for name in params}
    return params


def main() -> None:
    torch.set_num_threads(1)
    spec = json.loads(open(sys.argv[1]).read())
    rank = int(os.environ["RANK"])
    t = trainer(spec, os.path.join(spec["out"], "run"))
    assert t.args.world_size == int(os.environ["WORLD_SIZE"]), (t.args.world_size, os.environ["WORLD_SIZE"])
    t.train()
    engine = t.privacy_engine
    if spec.get("deepspeed") == 3:  # ZeRO-3 partitions the parameters: gather them to compare
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.parameters.values()), modifier_rank=None):
            params = full_size(engine)
    else:
        params = full_size(engine)
    stage = t.model_wrapped.zero_optimization_stage() if t.is_deepspeed_enabled else None
    sampler = engine.data_loader.batch_sampler
    torch.save({"params": params, "steps_taken": engine.steps_taken, "epsilon": engine.epsilon(),
                "world_size": t.args.world_size, "backend": type(engine.backend).__name__, "zero_stage": stage,
                "loader_split": (sampler.rank, sampler.world_size),
                "backend_world_size": getattr(engine.backend, "world_size", 1),
                "sharded": sorted(getattr(engine.backend, "_layouts", {})),
                "layer_kinds": sorted({type(m).__name__ for m in engine.model.modules()})},
               os.path.join(spec["out"], f"rank{rank}.pt"))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
