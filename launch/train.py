"""Train a small causal LM privately on one or many processes; the script is the same for all.

    python launch/train.py --cpu                                              # one process
    accelerate launch --config_file launch/accelerate_cpu_2proc.yaml launch/train.py --cpu
    accelerate launch --config_file launch/accelerate_gpu.yaml launch/train.py
    torchrun --nproc_per_node 2 launch/train.py --cpu                         # gloo on CPU
    deepspeed --num_gpus 2 launch/train.py --deepspeed ds_configs/zero3.json  # DeepSpeed ZeRO-3
    torchrun --nproc_per_node 2 launch/train.py --deepspeed ds_configs/zero2.json --cpu
    accelerate launch --config_file launch/accelerate_deepspeed.yaml launch/train.py --cpu   # ds_configs/zero3.json

The loop is dpscale's step driver (``dpscale.run_steps``), the same for every launcher: with
DeepSpeed (--deepspeed, or an Accelerate DeepSpeed config) Accelerate prepares a DeepSpeedEngine and
the driver closes each logical step with its step(); otherwise with the attached optimizer's. With
--epsilon the run stops at the privacy budget, saves its privacy state and says so. On CPU (--cpu, or no CUDA) the process group
is gloo. The DeepSpeed config file must say "gradient_clipping": 0.0 (refused otherwise).

The model is built from a config (tiny GPT-2 or Llama, random init); the data is synthetic, or the
E2E CSV given by --data (e.g. ../shared/data/e2e/devset.csv), tokenised by bytes so no tokenizer
download is needed. Every rank reads the same noise key file (created once in --output-dir when
--noise-key is not given). Saves each rank's privacy state as privacy-rank{r}.pt in --output-dir
and prints epsilon at the end.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpscale import DPConfig, run_steps  # noqa: E402
from dpscale.integrations.accelerate import make_data_loader, make_private  # noqa: E402
from dpscale.losses import causal_lm_losses  # noqa: E402
from dpscale.noise import NoiseKey  # noqa: E402

PAD, BOS, EOS = 256, 257, 258
VOCAB = 259


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["gpt2", "llama"], default="gpt2")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--data", help="E2E CSV (columns mr, ref); default synthetic")
    p.add_argument("--synthetic-size", type=int, default=512)
    p.add_argument("--batch-size", type=float, default=32, help="expected logical batch size B = qN")
    p.add_argument("--micro-batch", type=int, default=8, help="max physical batch size per rank")
    p.add_argument("--epochs", type=float, default=1.0, help="planned passes over the data (or --steps)")
    p.add_argument("--steps", type=int, help="planned logical steps: the run's length for calibration")
    p.add_argument("--max-steps", type=int, help="stop after this many logical steps (the budget stops it too)")
    p.add_argument("--epsilon", type=float, help="target epsilon (sigma calibrated); else --sigma")
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--clipping", default="flat", choices=["flat", "per_layer"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--noise-key", help="key file read by every rank (NoiseKey.write_new)")
    p.add_argument("--output-dir", default="runs/launch")
    p.add_argument("--cpu", action="store_true", help="Accelerator(cpu=True): gloo, even where GPUs exist")
    p.add_argument("--seed", type=int, default=0, help="model initialisation only")
    p.add_argument("--deepspeed", metavar="CONFIG", help="DeepSpeed config file (ds_configs/zero*.json)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("--dropout", type=float, default=0.1, help="GPT-2 dropout probabilities")
    p.add_argument("--save-params", metavar="PATH", help="write the trained parameters (full, fp32) here")
    return p.parse_args(argv)


def build_model(args) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    if args.model == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=VOCAB, n_positions=args.seq_len, n_embd=args.hidden, n_layer=args.layers,
                            n_head=args.heads, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                            resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.dropout)
        return GPT2LMHeadModel(config)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=args.seq_len,
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def encode(text: str, length: int) -> dict[str, torch.Tensor]:
    ids = [BOS, *text.encode("utf-8")[: length - 2], EOS]
    labels = ids + [-100] * (length - len(ids))
    mask = [1] * len(ids) + [0] * (length - len(ids))
    ids = ids + [PAD] * (length - len(ids))
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}


def load_texts(args) -> list[str]:
    if args.data:
        with open(args.data, newline="", encoding="utf-8") as f:
            return [f"{row['mr']} || {row['ref']}" for row in csv.DictReader(f)]
    g = torch.Generator().manual_seed(1234)
    words = ["name", "food", "area", "price", "near", "rating", "family", "city", "river", "cheap"]
    return [" ".join(words[i] for i in torch.randint(0, len(words), (12,), generator=g).tolist())
            for _ in range(args.synthetic_size)]


def shared_key(args, accelerator) -> str:
    """The key file every rank reads: --noise-key, or one created by the main process."""
    if args.noise_key:
        return args.noise_key
    path = os.path.join(args.output_dir, "noise.key")
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if not os.path.exists(path):
            NoiseKey.write_new(path)
    accelerator.wait_for_everyone()
    return path


def uses_deepspeed(args) -> bool:
    return bool(args.deepspeed) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_accelerator(args):
    """Accelerator(cpu=...) for data parallel; with DeepSpeed, the plugin from --deepspeed (or from
    `accelerate launch --use_deepspeed`) and, on CPU, a gloo process group."""
    from accelerate import Accelerator

    if not uses_deepspeed(args):
        return Accelerator(cpu=args.cpu)
    from accelerate import DeepSpeedPlugin
    from accelerate.utils import InitProcessGroupKwargs

    handlers = [InitProcessGroupKwargs(backend="gloo")] if args.cpu or not torch.cuda.is_available() else []
    plugin = DeepSpeedPlugin(hf_ds_config=args.deepspeed) if args.deepspeed else None
    return Accelerator(deepspeed_plugin=plugin, kwargs_handlers=handlers)


def full_parameters(engine) -> dict[str, torch.Tensor]:
    """Every trainable parameter of the module, whole (gathered from ZeRO-3 partitions), widened to
    fp32 (under DeepSpeed bf16 these are the bf16 copies of its fp32 master weights)."""
    params = dict(engine.model.named_parameters())
    if getattr(engine.backend, "stage", None) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {n: p.detach().float().clone() for n, p in params.items()}
    return {n: p.detach().float().clone() for n, p in params.items()}


def main(argv=None) -> float:
    args = parse_args(argv)
    accelerator = make_accelerator(args)
    texts = load_texts(args)
    train_set = [encode(t, args.seq_len) for t in texts]
    model = build_model(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    privacy = dict(target_epsilon=args.epsilon) if args.epsilon is not None else dict(noise_multiplier=args.sigma)
    length = dict(steps=args.steps) if args.steps is not None else dict(epochs=args.epochs)
    config = DPConfig(max_grad_norm=args.max_grad_norm, expected_batch_size=args.batch_size,
                      dataset_size=len(train_set), clipping=args.clipping, **length, **privacy)
    engine = make_private(accelerator, model, optimizer, config, noise_key=shared_key(args, accelerator))
    loader = make_data_loader(accelerator, engine, train_set, max_physical_batch_size=args.micro_batch)
    accelerator.print(f"{accelerator.num_processes} process(es) on {accelerator.device}, "
                      f"{len(train_set)} examples, sigma {engine.noise_multiplier:.3f}, {len(loader)} steps")
    model.train()

    def losses_of(micro):
        # engine.model: the module the engine hooks (DDP's inner module, or the DeepSpeedEngine's).
        micro = {k: v.to(accelerator.device) for k, v in micro.items()}
        logits = engine.model(input_ids=micro["input_ids"], attention_mask=micro["attention_mask"]).logits
        return causal_lm_losses(logits, micro["labels"])

    def report(outcome):
        step = engine.steps_taken
        if step % 10 == 0 or step == len(loader):
            accelerator.print(f"step {step}: global batch {outcome.global_size}, "
                              f"rank-0 mean loss {outcome.loss_sum / max(1, outcome.examples):.3f}")

    def save(result):
        if result.stopped == "budget":
            accelerator.print(f"privacy budget reached after {engine.steps_taken} steps: stopped, state saved in "
                              f"{args.output_dir}")
        engine.save_checkpoint(os.path.join(args.output_dir, f"privacy-rank{accelerator.process_index}.pt"))
        if args.save_params:
            params = full_parameters(engine)
            if accelerator.is_main_process:
                torch.save({"params": params, "steps_taken": engine.steps_taken,
                            "world_size": accelerator.num_processes}, args.save_params)

    run_steps(engine, loader, losses_of, max_steps=args.max_steps, on_step=report, on_stop=save)
    epsilon = engine.epsilon()
    accelerator.print(f"epsilon {epsilon:.3f} at delta {engine.delta:.2e} after {engine.steps_taken} steps")
    engine.detach()
    accelerator.end_training()
    return epsilon


if __name__ == "__main__":
    main()
