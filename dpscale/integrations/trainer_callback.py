"""The privacy state alongside the Trainer's own checkpoints: ``privacy.pt`` (steps, accountant,
sampler position, key fingerprint; never the key) in each ``checkpoint-*`` folder, a resume that
refuses a checkpoint without it (the accountant would start over), and the stop-and-save at the
privacy budget. The Trainer knows nothing of these, so a callback carries them."""

from __future__ import annotations

import os
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from dpscale.checkpoint import load_state
from dpscale.driver import budget_reached
from dpscale.errors import ConfigError

__all__ = ["PRIVACY_STATE_NAME", "PrivacyStateCallback", "load_privacy_state"]

PRIVACY_STATE_NAME = "privacy.pt"


class PrivacyStateCallback(TrainerCallback):
    """Writes the privacy state into the checkpoint folder the Trainer has just written; stops and
    saves at the privacy budget; keeps ``state.epoch`` in logical-batch passes across resumes."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        engine = self.trainer.privacy_engine
        if engine is None:
            return control
        # The Trainer restarts its step count within an epoch on resume (the loader continues, it
        # does not skip): the epoch is the logical steps taken over the steps of one pass.
        state.epoch = state.global_step / len(self.trainer.get_train_dataloader())
        # At max_steps the Trainer stops by itself; before it, the budget stops (and saves) it here.
        if state.global_step < state.max_steps and budget_reached(engine):
            control.should_training_stop = True
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        self.trainer.save_privacy_state(folder)
        return control


def load_privacy_state(checkpoint: str | os.PathLike) -> dict:
    """The privacy state saved in a Trainer checkpoint folder; a folder without one is refused:
    resuming would restart the accountant and the Poisson draw."""
    path = Path(checkpoint) / PRIVACY_STATE_NAME
    if not path.is_file():
        raise ConfigError(
            f"{checkpoint} has no {PRIVACY_STATE_NAME}: it was not written by DPTrainer (or the "
            "run died between the Trainer's checkpoint and the privacy state). Resuming would restart "
            "the accountant and the Poisson draw; resume from an earlier checkpoint."
        )
    return load_state(path)
