"""What DPTrainer leaves beside the model, as ``dpscale train`` does: ``privacy_report.json`` (and
epsilon.png) and a model card (``README.md``) with the privacy figures, written at the end of
training into ``output_dir`` and with every ``save_model``; each checkpoint folder gets the card of
its own step. And the stop at the privacy budget, said where the user looks: a warning in the log
and an entry in the Trainer's log history (``privacy_budget_reached``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from dpscale.models_kind import task_of
from dpscale.subsets import is_peft_model
from dpscale.train.model_card import write_model_card

__all__ = ["describe_model", "say_budget_stop", "write_privacy_outputs"]

logger = logging.getLogger(__name__)


def describe_model(model) -> tuple[str | None, str | None, str | None]:
    """(base model name, task, adapter) for the card, read from the model itself."""
    if is_peft_model(model):
        config = model.peft_config[model.active_adapter]
        kind = str(getattr(config.peft_type, "value", config.peft_type)).lower()
        return config.base_model_name_or_path, task_of(model.get_base_model()), kind
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return name, task_of(model), None


def write_privacy_outputs(trainer, folder: str | os.PathLike, *, report: bool = True) -> None:
    """The privacy report (with ``report``) and the model card in ``folder``, on the process that
    saves; nothing before the engine exists."""
    engine = trainer.privacy_engine
    if engine is None or not trainer.args.should_save:
        return
    folder = Path(folder)
    model = trainer.accelerator.unwrap_model(trainer.model)
    base, task, adapter = describe_model(model)
    figures = engine.privacy_report(folder if report else None)
    write_model_card(folder, figures, base_model=base, task=task, adapter=adapter)


def say_budget_stop(trainer, state) -> None:
    """The budget stopped training before ``max_steps``: a warning naming what to change, and an
    entry in the Trainer's log history (which its progress printer shows)."""
    engine = trainer.privacy_engine
    logger.warning(
        "DPTrainer stopped at step %d of max_steps=%d: the privacy budget is spent (epsilon %.4g of target_epsilon "
        "%g at delta %.3g) and the next step would exceed it; a checkpoint is saved there. For more steps, calibrate "
        "for them (DPConfig(steps=...) or epochs=) or raise target_epsilon.",
        state.global_step, state.max_steps, engine.epsilon(), engine.target_epsilon, engine.delta,
    )
    trainer.log({"privacy_budget_reached": 1.0, "privacy_budget_steps": float(engine.budget_steps)})
