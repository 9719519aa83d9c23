"""What DPTrainer refuses when it is built, naming the argument: Trainer settings that would weaken
or change the DP step, a Trainer that is not running what its arguments ask for, and a dataset that
does not fit the privacy unit. Refused before the first step, since the Trainer builds the privacy
engine only when it first iterates the loader.

Accelerate's own settings (the Trainer's Accelerator) are refused by
``dpscale.integrations.accelerate_checks``, and the dataset's fit to the privacy unit by
``dpscale.units``, the same checks the other entry points run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dpscale.config import DPConfig
from dpscale.errors import ConfigError
from dpscale.integrations.accelerate_checks import check_accelerator
from dpscale.units import check_privacy_units

__all__ = ["check_dp_arguments", "check_trainer", "check_training_arguments", "trainer_user_ids"]


def check_training_arguments(args) -> None:
    """Refuse ``TrainingArguments`` that would weaken or change the DP step, naming the argument."""
    if args.max_grad_norm not in (0, None):
        raise ConfigError(
            f"TrainingArguments(max_grad_norm={args.max_grad_norm}): the Trainer would clip the summed, "
            "noised DP gradient (it clips at 1.0 by default). Per-example clipping is dpscale's "
            "(DPConfig.max_grad_norm): set max_grad_norm=0."
        )
    if args.fp16:
        raise ConfigError(
            "TrainingArguments(fp16=True) scales the loss with a GradScaler: it would unscale gradients dpscale "
            "never scaled and skip steps on overflow, which the accountant still counts. Use bf16=True or fp32."
        )
    if args.gradient_accumulation_steps != 1:
        raise ConfigError(
            f"TrainingArguments(gradient_accumulation_steps={args.gradient_accumulation_steps}): DPTrainer "
            "accumulates the micro-batches of each Poisson batch itself (their number varies). Set it to 1; "
            "per_device_train_batch_size is the micro-batch and DPConfig.expected_batch_size the logical batch."
        )
    for name in ("activation_checkpointing", "gradient_checkpointing"):
        kwargs = dict(getattr(args, f"{name}_kwargs", None) or {})
        kwargs.pop("every_n_layers", None)  # the Trainer takes these two out before torch sees the rest
        kwargs.pop("offload", None)
        # No kwargs: transformers passes use_reentrant=False. Kwargs without it: torch's default, True.
        if getattr(args, name, None) and kwargs and kwargs.get("use_reentrant", True):
            raise ConfigError(
                f"TrainingArguments({name}_kwargs={kwargs}) asks for reentrant checkpointing, which back-propagates "
                "each checkpointed layer in a nested backward that writes non-private weight gradients. Pass "
                f"{name}_kwargs={{'use_reentrant': False}} (or none): dpscale supports that kind exactly."
            )
    strategy = getattr(args, "train_sampling_strategy", "random")
    if strategy != "random" or getattr(args, "group_by_length", False):
        raise ConfigError(
            f"TrainingArguments(train_sampling_strategy={strategy!r}): the accountant assumes Poisson "
            "sampling, which DPTrainer's loader does; leave train_sampling_strategy='random' (it is ignored)."
        )
    if getattr(args, "torch_compile", False):
        raise ConfigError("TrainingArguments(torch_compile=True) fuses the modules whose activations dpscale records.")
    if getattr(args, "auto_find_batch_size", False):
        raise ConfigError(
            "TrainingArguments(auto_find_batch_size=True) restarts the training loop after an out-of-memory "
            "error, after privacy steps were taken; choose per_device_train_batch_size yourself."
        )
    if getattr(args, "include_num_input_tokens_seen", "no") not in ("no", False, None):
        raise ConfigError(
            "TrainingArguments(include_num_input_tokens_seen=...) logs the token count of the sampled examples, "
            "a non-private statistic; set it to 'no'."
        )
    if "lomo" in str(getattr(args.optim, "value", args.optim)).lower():
        raise ConfigError(
            f"TrainingArguments(optim={args.optim!r}) runs its own fused backward; use another optimizer."
        )
    version = int(dict(getattr(args, "fsdp_config", None) or {}).get("version", 2))
    if getattr(args, "fsdp", None) and version != 2:
        raise ConfigError(
            f"TrainingArguments(fsdp_config={{'version': {version}}}): FSDP1 flattens parameters into FlatParameters, "
            "so dpscale cannot key the noise by parameter name nor hook the layers' own weights. Use FSDP2: "
            "fsdp_config={'version': 2} (transformers' default)."
        )
    if getattr(args, "n_gpu", 1) > 1:
        raise ConfigError(
            f"{args.n_gpu} GPUs in one process (nn.DataParallel): launch one process per GPU (torchrun, "
            "accelerate launch) so that the Trainer uses DDP."
        )


def check_dp_arguments(dp_config, per_example_loss) -> None:
    """DPTrainer's own arguments, before the Trainer is built."""
    if not isinstance(dp_config, DPConfig):
        raise TypeError("dp_config must be a dpscale.DPConfig")
    if dp_config.dataset_size is None:
        raise ConfigError("DPTrainer needs DPConfig(dataset_size=N): the Poisson rate is B / N.")
    if per_example_loss != "auto" and not callable(per_example_loss):
        raise ConfigError("per_example_loss must be 'auto' or a function (outputs, labels) -> [B] losses.")


def check_trainer(trainer) -> None:
    """The built Trainer: its arguments, the Accelerator it made, and whether it runs what its
    arguments ask for (Accelerate falls back without saying so)."""
    args = trainer.args
    check_training_arguments(args)
    if args.fsdp and not trainer.is_fsdp_enabled:
        raise ConfigError(
            "TrainingArguments(fsdp=...) is set but the Trainer is not running FSDP: Accelerate enables its FSDP "
            "plugin only on accelerators (GPUs and the like) and runs DDP on a CPU. Drop fsdp on a CPU-only "
            "machine, or run on GPUs."
        )
    check_accelerator(trainer.accelerator, deepspeed=True)  # FSDP1 or a dropped FSDP config from `accelerate launch`
    if args.deepspeed and not trainer.is_deepspeed_enabled:
        raise ConfigError(
            "TrainingArguments(deepspeed=...) is set but the Trainer is not running DeepSpeed (use_cpu=True or "
            "ACCELERATE_USE_CPU=true makes it fall back to DDP): drop use_cpu (DS_ACCELERATOR=cpu runs DeepSpeed "
            "on the CPU), or drop the DeepSpeed config."
        )
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() != args.world_size:
        raise ConfigError(
            f"torch.distributed has {torch.distributed.get_world_size()} ranks but the Trainer counts "
            f"{args.world_size} process(es): each rank would take the wrong part of the Poisson batch. "
            "(Accelerate finds no backend for DeepSpeed on a CPU-only machine: create "
            "accelerate.PartialState(backend='gloo') with ACCELERATE_USE_DEEPSPEED=true first and pass "
            "TrainingArguments(accelerator_config={'use_configured_state': True}).)"
        )
    if trainer.compute_loss_func is not None:
        raise ConfigError(
            "compute_loss_func returns one loss for the batch; DPTrainer needs one loss per example: pass "
            "per_example_loss=fn(outputs, labels) -> [B] instead."
        )


def trainer_user_ids(dp_config: DPConfig, train_dataset, user_ids: Sequence | str | None,
                     micro_batch: int) -> list | None:
    """At user level the users of the train dataset, read now (a column name resolved before the
    Trainer drops unused columns) and checked against the config by ``dpscale.units`` as the
    engine's loader will check them; None at example level. Without a train dataset there is
    nothing to check yet (the Trainer refuses to train without one)."""
    if train_dataset is None:
        if user_ids is not None:
            raise ConfigError("DPTrainer(user_ids=...) names the users of the train_dataset: pass train_dataset too.")
        return None
    return check_privacy_units(dp_config, train_dataset, user_ids, micro_batch=micro_batch,
                               micro_name="per_device_train_batch_size")
