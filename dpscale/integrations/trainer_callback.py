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
from dpscale.integrations.trainer_outputs import say_budget_stop, write_privacy_outputs

__all__ = ["PRIVACY_STATE_NAME", "PrivacyStateCallback", "load_privacy_state"]

PRIVACY_STATE_NAME = "privacy.pt"


class PrivacyStateCallback(TrainerCallback):
    """Writes the privacy state into the checkpoint folder the Trainer has just written; stops and
    saves at the privacy budget, saying so; keeps ``state.epoch`` in passes over the data (expected
    examples processed / N); writes the privacy report and model card when training ends."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        engine = self.trainer.privacy_engine
        if engine is None:
            return control
        # Epochs are passes over the data: expected examples processed / N (q per step; at user level,
        # users), whatever the Trainer counts (it restarts within an epoch on resume, and its pass is
        # the planned run, not the data).
        state.epoch = state.global_step * engine.sample_rate
        # At max_steps the Trainer stops by itself; before it, the budget stops (and saves) it here.
        if state.global_step < state.max_steps and budget_reached(engine):
            control.should_training_stop = True
            control.should_save = True
            say_budget_stop(self.trainer, state)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        write_privacy_outputs(self.trainer, args.output_dir)
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
