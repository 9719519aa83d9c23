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
``fully_shard``; the engine's FSDP2 backend reduce-scatters and noises each rank's rows). What changes
in the Trainer's step, and only through its public methods:

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
  budget allows, whatever ``max_steps`` says, with a warning and ``privacy_budget_reached`` in the
  log history.
* What it leaves: ``privacy_report.json`` and a model card (``README.md``, the privacy figures in its
  metadata and prose) in ``output_dir`` when training ends and beside every ``save_model``; the
  epoch it logs is passes over the data (expected examples processed / N).
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
(``fsdp_config={"version": 1}``; FSDP2, transformers' default version, is supported),
``compute_loss_func`` (it reduces over the batch: give ``per_example_loss`` instead), a DeepSpeed
config the Trainer is not running (``use_cpu=True`` silently falls back to DDP), and a Trainer whose
process count differs from torch.distributed's. Under DeepSpeed, the DeepSpeed backend refuses
engine clipping, fp16 and DeepSpeed's own gradient accumulation, naming the config key.

The pieces beside this file: ``trainer_refusals.py`` (what is refused when the trainer is built),
``trainer_data.py`` (the engine's loader as the Trainer's loop takes it), ``trainer_callback.py``
(the privacy state in the Trainer's checkpoints, the stop at the budget); the per-example losses
are ``dpscale.losses``, the causal-LM test ``dpscale.models_kind``.

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
from torch import Tensor, nn
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint

from dpscale.checkpoint import save_atomic
from dpscale.config import DPConfig
from dpscale.driver import run_logical_step
from dpscale.engine import PrivacyEngine
from dpscale.errors import ConfigError, LossShapeError
from dpscale.integrations.accelerate import make_private
from dpscale.integrations.trainer_callback import (
    PRIVACY_STATE_NAME,
    PrivacyStateCallback,
    load_privacy_state,
)
from dpscale.integrations.trainer_data import LogicalBatches, LogicalStep, to_device
from dpscale.integrations.trainer_outputs import write_privacy_outputs
from dpscale.integrations.trainer_refusals import (
    check_dp_arguments,
    check_trainer,
    check_training_arguments,
    trainer_user_ids,
)
from dpscale.layers import RuleRegistry
from dpscale.losses import per_example_losses
from dpscale.models_kind import is_causal_lm
from dpscale.noise import NoiseKey

# PRIVACY_STATE_NAME, LogicalStep and check_training_arguments live in the trainer_* modules; they are
# re-exported here, where callers imported them first.
__all__ = ["PRIVACY_STATE_NAME", "DPTrainer", "LogicalStep", "check_training_arguments"]

logger = logging.getLogger(__name__)

PerExampleLoss = Callable[[object, Tensor], Tensor]


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
        check_dp_arguments(dp_config, per_example_loss)
        super().__init__(*args, **kwargs)
        check_trainer(self)
        self.user_ids = trainer_user_ids(dp_config, self.train_dataset, user_ids,
                                         self.args.per_device_train_batch_size)
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
        self.add_callback(PrivacyStateCallback(self))

    # data ---------------------------------------------------------------------------------------

    def get_train_dataloader(self) -> LogicalBatches:
        """The engine's Poisson logical batches for this rank, micro-batched at
        ``per_device_train_batch_size``. One loader per trainer: a second ``train()`` continues the
        draw, never repeats it."""
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        return LogicalBatches(self)

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
            micro = to_device(micro, self.args.device, next(self.model.parameters()).dtype)
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
            losses = per_example_losses(outputs, labels, causal=is_causal_lm(self.model),
                                        label_smoothing=float(self.args.label_smoothing_factor or 0.0))
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

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model``, then the model card (``README.md``: epsilon, delta, the unit, sigma,
        q, steps, the accountant and the clipping, at this step) beside the weights, and outside
        checkpoints the privacy report too."""
        super().save_model(output_dir, _internal_call=_internal_call)
        write_privacy_outputs(self, output_dir or self.args.output_dir, report=not _internal_call)

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
            self._resume_state = load_privacy_state(resume_from_checkpoint)
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
