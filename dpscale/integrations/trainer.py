"""Hugging Face Trainer, made private: ``DPTrainer``.

    args = TrainingArguments(output_dir="runs/dp", per_device_train_batch_size=16,  # the micro-batch
                             max_grad_norm=0,                 # dpscale clips per example, not the Trainer
                             learning_rate=5e-4, max_steps=1000)
    trainer = DPTrainer(model=model, args=args, train_dataset=train_set, data_collator=collator,
                        dp_config=DPConfig(max_grad_norm=1.0, expected_batch_size=256,
                                           dataset_size=len(train_set), target_epsilon=8.0, steps=1000),
                        noise_key="noise.key")
    trainer.train()                                   # trainer.train(resume_from_checkpoint=True) resumes

User-level privacy (one user with all their examples is the unit):
``DPConfig(privacy_unit="user", dataset_size=<number of users>, expected_batch_size=<users per step>,
examples_per_user=k)`` and ``DPTrainer(..., user_ids=[the user of each example] or "column")``; the
loader draws users and the step driver clips each user's examples as one (docs/GUARANTEES.md).

The same script runs on one process, under ``torchrun`` / ``accelerate launch`` with N processes
(the Trainer wraps the model in DDP), with ``TrainingArguments(deepspeed="ds_configs/zero2.json")``
(the Trainer calls ``deepspeed.initialize``) and with ``TrainingArguments(fsdp="full_shard",
fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": [...]})`` on GPUs (Accelerate applies
``fully_shard``; the engine's FSDP2 backend reduce-scatters and noises each rank's rows). What changes in the Trainer's step, and only through
its public methods:

* ``get_train_dataloader``: the privacy engine's own loader (``engine.make_data_loader``): Poisson
  logical batches at q = expected_batch_size / N drawn from the secret key, each rank keeping its
  part of the global draw by its position in the backend's data-parallel group (tensor-parallel
  ranks of one replica share examples). Each item the Trainer's loop takes is one *logical* batch,
  so the Trainer steps once per logical batch; ``per_device_train_batch_size`` is the physical
  micro-batch it is cut into. An empty draw still steps (noise only). The engine is built on the
  prepared model when the Trainer first iterates the loader.
* ``training_step``: dpscale's step driver (``dpscale.run_logical_step``, the same for every entry
  point): forward per micro-batch, ``compute_loss`` gives one loss per example, and
  ``engine.backward(losses)`` at the backward seam instead of ``accelerator.backward(loss)``.
  Under DeepSpeed the driver runs them inside the backend's accumulation block on
  ``ds_engine.module``, with ZeRO-3's padding passes, and closes the step with ``ds_engine.step()``.
* Noise once per optimizer step in the engine's optimizer pre-hook (DeepSpeed: the base
  optimizer's), the accountant's step with it.
* The budget: with a target epsilon, training stops (and saves a checkpoint) at the last step the
  budget allows, whatever ``max_steps`` says.
* ``log``: epsilon is added to every log; the pre-noise gradient norm the Trainer computes is
  dropped (it is a non-private statistic of the sampled examples), and so is the training loss
  unless ``log_train_loss=True``. Throughput counts logical examples (B per step).
* Checkpoints: ``privacy.pt`` (steps, accountant, sampler position, key fingerprint; never the key)
  is written into each ``checkpoint-*`` folder; ``train(resume_from_checkpoint=...)`` restores it and
  refuses a checkpoint without it, or one written under another noise key.

Refused when the trainer is built, naming the argument: ``max_grad_norm`` other than 0 (the
Trainer clips the summed gradient at 1.0 by default), ``fp16`` (loss scaling, skipped steps),
``gradient_accumulation_steps != 1`` (dpscale accumulates the micro-batches of each Poisson batch),
reentrant activation checkpointing (``use_reentrant=True``; the non-reentrant kind, transformers'
default, is supported), samplers other than the Poisson one (``train_sampling_strategy``),
``torch_compile``, ``auto_find_batch_size``, token counting in the logs, LOMO optimizers, FSDP1
(``fsdp_config={"version": 1}``; FSDP2, transformers' default version, is supported), ``compute_loss_func`` (it reduces over the batch: give ``per_example_loss`` instead), a DeepSpeed
config the Trainer is not running (``use_cpu=True`` silently falls back to DDP), and a Trainer whose
process count differs from torch.distributed's. Under DeepSpeed, the DeepSpeed backend refuses
engine clipping, fp16 and DeepSpeed's own gradient accumulation, naming the config key.

DeepSpeed on a CPU-only machine: Accelerate 1.15 finds no backend for it and counts one process
(refused above); configure its state first::

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    accelerate.PartialState(backend="gloo")
    args = TrainingArguments(..., deepspeed="ds_configs/zero2.json",
                             accelerator_config={"use_configured_state": True})

and run with ``DS_ACCELERATOR=cpu``. Machines with GPUs need none of this.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from dpscale.accounting import steps_for_epochs
from dpscale.checkpoint import load_state, save_atomic
from dpscale.config import DPConfig
from dpscale.driver import run_logical_step
from dpscale.engine import PrivacyEngine
from dpscale.integrations.accelerate import check_accelerator
from dpscale.errors import ConfigError, LossShapeError
from dpscale.layers import RuleRegistry
from dpscale.losses import causal_lm_losses, sequence_classification_losses, token_mean_losses
from dpscale.noise import NoiseKey
from dpscale.per_example import accumulation_dtype
from dpscale.plan import planned_steps
from dpscale.sampling import LogicalBatch, resolve_user_ids

__all__ = ["PRIVACY_STATE_NAME", "DPTrainer", "LogicalStep", "check_training_arguments"]

logger = logging.getLogger(__name__)

PRIVACY_STATE_NAME = "privacy.pt"

PerExampleLoss = Callable[[object, Tensor], Tensor]


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
        raise ConfigError(f"TrainingArguments(optim={args.optim!r}) runs its own fused backward; use another optimizer.")
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


class LogicalStep:
    """What the Trainer's loop takes as one batch: one logical (Poisson) batch of this rank, cut
    into micro-batches. It holds no tensor until ``training_step`` collates each micro-batch, and
    answers ``"labels" in step`` with False so the Trainer counts no tokens."""

    __slots__ = ("batch", "flops")

    def __init__(self, batch: LogicalBatch) -> None:
        self.batch = batch
        self.flops = 0.0

    def __contains__(self, key) -> bool:
        return False


class _LogicalBatches:
    """The Trainer's view of the engine's loader. ``len`` is the loader's pass (the planned steps,
    or one epoch-equivalent); iterating builds the privacy engine on the prepared model the first
    time (the loader is the engine's, split by the backend's data-parallel position), continues
    from the loader's position (a resumed run continues where its privacy state says), and ends
    before drawing a batch the budget would refuse."""

    def __init__(self, trainer: "DPTrainer") -> None:
        self.trainer = trainer
        self.dataset = trainer.train_dataset

    def __len__(self) -> int:
        config = self.trainer.dp_config
        return planned_steps(config) or steps_for_epochs(1.0, config.sample_rate)

    def __iter__(self):
        engine = self.trainer._engine_for(self.trainer.model_wrapped)
        batches = iter(engine.data_loader)
        while not engine.budget_exhausted:
            batch = next(batches, None)
            if batch is None:
                return
            yield LogicalStep(batch)


class _PrivacyStateCallback(TrainerCallback):
    """Writes the privacy state into the checkpoint folder the Trainer has just written; stops and
    saves at the privacy budget; keeps ``state.epoch`` in logical-batch passes across resumes."""

    def __init__(self, trainer: "DPTrainer") -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        engine = self.trainer.privacy_engine
        if engine is None:
            return control
        # The Trainer restarts its step count within an epoch on resume (the loader continues, it
        # does not skip): the epoch is the logical steps taken over the steps of one pass.
        state.epoch = state.global_step / len(self.trainer.get_train_dataloader())
        if engine.budget_exhausted and state.global_step < state.max_steps:
            logger.warning(
                "Privacy budget reached after %d steps (epsilon %.4g, target %g): stopping and saving a checkpoint.",
                engine.steps_taken, engine.epsilon(), engine.target_epsilon,
            )
            control.should_training_stop = True
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        self.trainer.save_privacy_state(folder)
        return control


class DPTrainer(Trainer):
    """``transformers.Trainer`` with dpscale's DP step (see the module docstring).

    dp_config: the mechanism (R, expected batch size B, dataset size N, sigma or a target epsilon).
    noise_key: a ``NoiseKey`` or a key file; required with several processes (every rank reads the
        same file) and to resume. Default: a fresh key (runs are then neither reproducible nor
        resumable).
    fresh_noise_key: resume from a checkpoint written under another key on purpose (the rest of the
        run draws fresh batches and noise); otherwise such a resume is refused.
    new_noise_scheme: resume from a checkpoint written by a dpscale with another noise scheme (v1)
        on purpose (the privacy report records both); otherwise such a resume is refused.
    rules: a registry with rules for custom layers (``dpscale.default_registry()``).
    per_example_loss: "auto" (causal LM, sequence classification or token-level cross-entropy, from
        the model and the logits' shape; ``label_smoothing_factor`` applied per example) or
        ``fn(outputs, labels) -> [B]``.
    log_train_loss: also log and return the training loss (a non-private statistic of the sampled
        examples); otherwise ``train()`` returns NaN as its training loss.
    user_ids: with ``DPConfig(privacy_unit="user")``, the user of every training example: a sequence
        in dataset order, or the name of a column of ``train_dataset`` (a ``datasets.Dataset``; read
        once here, before the Trainer drops columns the model does not take). Required at user level,
        refused at example level; ``dp_config.dataset_size`` must be the number of distinct users.

    Once training starts, ``trainer.privacy_engine`` is the PrivacyEngine (epsilon, privacy report,
    last norms).
    """

    def __init__(self, *args, dp_config: DPConfig, noise_key: NoiseKey | str | os.PathLike | None = None,
                 fresh_noise_key: bool = False, new_noise_scheme: bool = False, rules: RuleRegistry | None = None,
                 per_example_loss: str | PerExampleLoss = "auto", log_train_loss: bool = False,
                 user_ids: Sequence | str | None = None, **kwargs) -> None:
        if not isinstance(dp_config, DPConfig):
            raise TypeError("dp_config must be a dpscale.DPConfig")
        if dp_config.dataset_size is None:
            raise ConfigError("DPTrainer needs DPConfig(dataset_size=N): the Poisson rate is B / N.")
        if per_example_loss != "auto" and not callable(per_example_loss):
            raise ConfigError("per_example_loss must be 'auto' or a function (outputs, labels) -> [B] losses.")
        super().__init__(*args, **kwargs)
        check_training_arguments(self.args)
        if self.args.fsdp and not self.is_fsdp_enabled:
            raise ConfigError(
                "TrainingArguments(fsdp=...) is set but the Trainer is not running FSDP: Accelerate enables its FSDP "
                "plugin only on accelerators (GPUs and the like) and runs DDP on a CPU. Drop fsdp on a CPU-only "
                "machine, or run on GPUs."
            )
        check_accelerator(self.accelerator, deepspeed=True)  # FSDP1 or a dropped FSDP config from `accelerate launch`
        if self.args.deepspeed and not self.is_deepspeed_enabled:
            raise ConfigError(
                "TrainingArguments(deepspeed=...) is set but the Trainer is not running DeepSpeed (use_cpu=True or "
                "ACCELERATE_USE_CPU=true makes it fall back to DDP): drop use_cpu (DS_ACCELERATOR=cpu runs DeepSpeed "
                "on the CPU), or drop the DeepSpeed config."
            )
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() != self.args.world_size:
            raise ConfigError(
                f"torch.distributed has {torch.distributed.get_world_size()} ranks but the Trainer counts "
                f"{self.args.world_size} process(es): each rank would take the wrong part of the Poisson batch. "
                "(Accelerate finds no backend for DeepSpeed on a CPU-only machine: create "
                "accelerate.PartialState(backend='gloo') with ACCELERATE_USE_DEEPSPEED=true first and pass "
                "TrainingArguments(accelerator_config={'use_configured_state': True}).)"
            )
        if self.compute_loss_func is not None:
            raise ConfigError(
                "compute_loss_func returns one loss for the batch; DPTrainer needs one loss per example: pass "
                "per_example_loss=fn(outputs, labels) -> [B] instead."
            )
        self.user_ids = self._check_units(dp_config, user_ids)
        if self.user_ids is None and self.train_dataset is not None and len(self.train_dataset) != dp_config.dataset_size:
            raise ConfigError(
                f"The train dataset has {len(self.train_dataset)} examples but DPConfig(dataset_size="
                f"{dp_config.dataset_size}); the accountant's q = B / N would be wrong."
            )
        self.dp_config = dp_config
        self.noise_key = noise_key  # loaded by the engine (dpscale.noise.load_noise_key)
        self.fresh_noise_key = fresh_noise_key
        self.new_noise_scheme = new_noise_scheme
        self.rules = rules
        self.per_example_loss = per_example_loss
        self.log_train_loss = log_train_loss
        self.privacy_engine: PrivacyEngine | None = None
        self._resume_state: dict | None = None
        # The loader's position is restored from the privacy state, never by skipping batches.
        self.args.ignore_data_skip = True
        self.add_callback(_PrivacyStateCallback(self))

    # data ---------------------------------------------------------------------------------------

    def _check_units(self, dp_config: DPConfig, user_ids) -> list | None:
        """At user level the users of the train dataset, read now (a column name resolved before the
        Trainer drops unused columns) and checked against the config: their number is N, and k
        fits in a micro-batch. Refused: user ids at example level, none at user level."""
        if dp_config.privacy_unit != "user":
            if user_ids is not None:
                raise ConfigError(
                    "DPTrainer(user_ids=...) was given but DPConfig(privacy_unit='example') protects single "
                    "examples; for user-level privacy use DPConfig(privacy_unit='user', dataset_size=<number of "
                    "users>, expected_batch_size=<users per step>)."
                )
            return None
        if user_ids is None:
            raise ConfigError(
                "DPConfig(privacy_unit='user') protects users, so DPTrainer must know whose each example is: pass "
                "user_ids=[the user of each training example] or the name of a train_dataset column."
            )
        if self.train_dataset is None:
            raise ConfigError("DPTrainer(user_ids=...) names the users of the train_dataset: pass train_dataset too.")
        ids = resolve_user_ids(self.train_dataset, user_ids)
        users = len(set(ids))
        if users != dp_config.dataset_size:
            raise ConfigError(
                f"The train dataset's {len(ids)} examples belong to {users} users but DPConfig(dataset_size="
                f"{dp_config.dataset_size}); at user level dataset_size is the number of users."
            )
        k, micro = dp_config.examples_per_user, self.args.per_device_train_batch_size
        if k > micro:
            raise ConfigError(
                f"DPConfig(examples_per_user={k}) exceeds per_device_train_batch_size={micro}, the micro-batch: a "
                f"user's examples are clipped as one unit and must fit in one micro-batch. Raise "
                f"per_device_train_batch_size to at least {k} or lower examples_per_user."
            )
        return ids

    def get_train_dataloader(self) -> _LogicalBatches:
        """The engine's Poisson logical batches for this rank, micro-batched at
        ``per_device_train_batch_size``. One loader per trainer: a second ``train()`` continues the
        draw, never repeats it."""
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        return _LogicalBatches(self)

    def get_total_train_batch_size(self, args) -> int:
        """The expected logical batch B (the Trainer's throughput counts the examples of each step;
        at user level, the users)."""
        return max(1, round(self.dp_config.expected_batch_size))

    # the step -----------------------------------------------------------------------------------

    def training_step(self, model: nn.Module, inputs, num_items_in_batch=None) -> Tensor:
        """One logical batch through dpscale's step driver: every micro-batch's per-example losses
        through ``engine.backward`` (with the padding passes ZeRO-3 needs). The Trainer's optimizer
        step that follows adds the noise; under DeepSpeed, where that step is a no-op, the driver
        closes the step with the DeepSpeedEngine's."""
        if not isinstance(inputs, LogicalStep):
            raise ConfigError(
                "DPTrainer.training_step takes the logical batches of DPTrainer.get_train_dataloader; a "
                "replaced train dataloader would bypass Poisson sampling."
            )
        engine = self._engine_for(model)
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        module = engine.model  # DDP's inner module (its reducer is idle) or the DeepSpeedEngine's module

        def losses_of(micro):
            micro = self._to_device(micro)
            with self.compute_loss_context_manager():
                losses = self.compute_loss(module, micro)
            inputs.flops += float(super(DPTrainer, self).floating_point_ops(micro))
            return losses

        outcome = run_logical_step(engine, inputs.batch, losses_of, close_step=engine.backend.owns_step)
        if not self.log_train_loss:
            return torch.zeros((), device=self.args.device)
        return torch.tensor(outcome.loss_sum / max(outcome.examples, 1), dtype=torch.float32, device=self.args.device)

    def compute_loss(self, model: nn.Module, inputs: Mapping, return_outputs: bool = False,
                     num_items_in_batch=None):
        """One loss per example, ``[B]`` (never a batch mean): the model's forward without its own
        loss, then ``per_example_loss``. Override it for a custom loss; keep the shape."""
        inputs = dict(inputs)
        labels = inputs.get("labels")
        if labels is None:
            raise LossShapeError("DPTrainer needs 'labels' in each batch to compute one loss per example.")
        if not getattr(getattr(self.model, "config", None), "is_encoder_decoder", False):
            inputs.pop("labels")  # the model's own loss is a batch mean: not computed, never used
        outputs = model(**inputs)
        if callable(self.per_example_loss):
            losses = self.per_example_loss(outputs, labels)
        else:
            losses = self._auto_losses(outputs, labels)
        if not isinstance(losses, Tensor) or losses.dim() != 1 or losses.shape[0] != labels.shape[0]:
            raise LossShapeError(
                f"per_example_loss must return one loss per example, shape [{labels.shape[0]}], got "
                f"{getattr(losses, 'shape', type(losses).__name__)}."
            )
        return (losses, outputs) if return_outputs else losses

    def floating_point_ops(self, inputs) -> int:
        if isinstance(inputs, LogicalStep):
            return int(inputs.flops)
        return super().floating_point_ops(inputs)

    # logs and state -----------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Epsilon in every log; no pre-noise gradient norm; the training loss only when asked."""
        logs = dict(logs)
        logs.pop("grad_norm", None)
        if not self.log_train_loss:
            logs.pop("loss", None)
            logs.pop("train_loss", None)
        if self.privacy_engine is not None:
            logs["epsilon"] = self.privacy_engine.epsilon()
            logs["privacy_steps"] = self.privacy_engine.steps_taken
        super().log(logs, start_time)

    def save_privacy_state(self, folder: str | os.PathLike) -> None:
        """Write ``privacy.pt`` (steps, accountant, sampler position; never the key) into ``folder``
        on the process that saves. Called for each Trainer checkpoint."""
        if self.privacy_engine is None or not self.args.should_save:
            return
        save_atomic(self.privacy_engine.state_dict(), Path(folder) / PRIVACY_STATE_NAME)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None,
              **kwargs):
        """``Trainer.train``; resuming also restores the privacy state saved in the checkpoint (a
        checkpoint without one is refused: the accountant would start over; one written under
        another noise key is refused unless ``fresh_noise_key=True``). Without ``log_train_loss``
        the returned training loss is NaN: the loss of the sampled examples is not private."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if resume_from_checkpoint:
            path = Path(resume_from_checkpoint) / PRIVACY_STATE_NAME
            if not path.is_file():
                raise ConfigError(
                    f"{resume_from_checkpoint} has no {PRIVACY_STATE_NAME}: it was not written by DPTrainer (or the "
                    "run died between the Trainer's checkpoint and the privacy state). Resuming would restart "
                    "the accountant and the Poisson draw; resume from an earlier checkpoint."
                )
            self._resume_state = load_state(path)
            if self.privacy_engine is not None:
                self.privacy_engine.load_state_dict(self._resume_state, fresh_key=self.fresh_noise_key,
                                                     new_noise_scheme=self.new_noise_scheme)
        try:
            output = super().train(resume_from_checkpoint=resume_from_checkpoint or None, trial=trial,
                                   ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        finally:
            self._resume_state = None
        if self.log_train_loss:
            return output
        metrics = {k: v for k, v in output.metrics.items() if k != "train_loss"}
        return output._replace(training_loss=float("nan"), metrics=metrics)

    # internals ----------------------------------------------------------------------------------

    def _engine_for(self, model: nn.Module) -> PrivacyEngine:
        """The privacy engine on the model the Trainer's Accelerator prepared (DDP or none, a
        fully_shard'ed model, or a DeepSpeedEngine, which make_private hands to the DeepSpeed
        backend), with its loader."""
        if self.privacy_engine is not None:
            return self.privacy_engine
        from dpscale.integrations.accelerate import make_private

        engine = make_private(self.accelerator, model, self.optimizer, self.dp_config, noise_key=self.noise_key,
                              rules=self.rules)
        collator = self._get_collator_with_removed_columns(self.data_collator, description="training")
        engine.make_data_loader(self.train_dataset, max_physical_batch_size=self.args.per_device_train_batch_size,
                                collate_fn=collator, user_ids=self.user_ids)
        budget = engine.budget_steps
        if budget is not None and self.state.max_steps > budget:
            logger.warning(
                "The Trainer is set for %d steps but target_epsilon=%g allows %d: training will stop at the budget "
                "(and save a checkpoint there).", self.state.max_steps, engine.target_epsilon, budget,
            )
        if self._resume_state is not None:
            engine.load_state_dict(self._resume_state, fresh_key=self.fresh_noise_key,
                                   new_noise_scheme=self.new_noise_scheme)
        self.privacy_engine = engine
        return engine

    def _to_device(self, data):
        """Micro-batches onto the device; floating inputs in the parameters' dtype (a bf16
        DeepSpeed module takes bf16 inputs)."""
        if isinstance(data, Mapping):
            return type(data)({k: self._to_device(v) for k, v in data.items()})
        if isinstance(data, (tuple, list)):
            return type(data)(self._to_device(v) for v in data)
        if isinstance(data, Tensor):
            if data.is_floating_point():
                return data.to(self.args.device, dtype=next(self.model.parameters()).dtype)
            return data.to(self.args.device)
        return data

    def _auto_losses(self, outputs, labels: Tensor) -> Tensor:
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
        smoothing = float(self.args.label_smoothing_factor or 0.0)
        if logits.dim() == 2:
            if smoothing and not (logits.shape[1] == 1 and labels.is_floating_point()):
                return F.cross_entropy(logits.to(accumulation_dtype(logits)), labels, reduction="none",
                                       label_smoothing=smoothing)
            return sequence_classification_losses(logits, labels)
        if logits.dim() == 3:
            causal = self._is_causal_lm()
            if not smoothing:
                return causal_lm_losses(logits, labels) if causal else token_mean_losses(logits, labels)
            if causal:
                logits, labels = logits[:, :-1], labels[:, 1:]
            return _smoothed_token_mean_losses(logits, labels, smoothing)
        raise LossShapeError(
            f"per_example_loss='auto' knows logits [B, C] and [B, T, V], got {tuple(logits.shape)}: pass "
            "per_example_loss=fn(outputs, labels) -> [B]."
        )

    def _is_causal_lm(self) -> bool:
        # The same test the Trainer applies for its label smoother: the model class is a causal LM.
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        model = self.model
        base = getattr(model, "get_base_model", None)  # PEFT
        if callable(base):
            model = base()
        # By the class and its bases: FSDP2's fully_shard swaps the class for a subclass (FSDPLlamaForCausalLM).
        causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
        return any(cls.__name__ in causal for cls in type(model).__mro__)


def _smoothed_token_mean_losses(logits: Tensor, labels: Tensor, smoothing: float, ignore_index: int = -100) -> Tensor:
    """[B] label-smoothed cross-entropy averaged over each example's own labelled tokens (the
    Trainer's LabelSmoother averages over the batch's tokens, which mixes examples)."""
    batch, vocab = logits.shape[0], logits.shape[-1]
    per_token = F.cross_entropy(
        logits.reshape(-1, vocab).to(accumulation_dtype(logits)), labels.reshape(-1), ignore_index=ignore_index,
        reduction="none", label_smoothing=smoothing,
    ).reshape(batch, -1)
    counts = (labels.reshape(batch, -1) != ignore_index).sum(1).clamp(min=1)
    return per_token.sum(1) / counts

