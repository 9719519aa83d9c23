"""TrainConfig: every knob of ``dpscale train``, read from a YAML file (``--config``) and
overridden by flags, validated before anything is loaded.

The defaults are the embedded default job, sized to finish in under 10 minutes on 2 CPU cores:
DP-LoRA of SmolLM2-135M on the packaged E2E split at epsilon 8, 12 Poisson steps of expected batch
64, a small clipping norm with automatic clipping. Real runs want more steps and larger batches
(the recipes in examples/).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpscale.errors import ConfigError

__all__ = ["TrainConfig", "load_config"]

TASKS = ("causal-lm", "classification")
TRAINABLE = ("all", "bias", "lora")


@dataclass
class TrainConfig:
    """model: a hub id, a local folder, a .gguf file, or a packaged short name ("smollm2-135m",
        "minilm-l6").
    task: "causal-lm" (loss on the target column, or on the whole text) or "classification".
    data, eval_data: CSV, TSV, JSON lines or a saved datasets folder; none for causal-lm: the
        packaged E2E development split, split by meaning representation into train and eval.
    epsilon, delta: the target (sigma is calibrated for the planned steps); delta default N^-1.1.
    epochs or max_steps: the length the noise is calibrated for: epochs when given, else max_steps.
        With both, max_steps caps the run; it also stops (saving) where the budget is spent.
    stop_after: end this invocation after so many steps (a quick look, a CI smoke run); the plan,
        and so sigma, stay those of the whole run, which a rerun resumes.
    batch_size: the expected logical batch B (Poisson: q = B / N); micro_batch: the physical one.
    max_train_examples, max_eval_examples: use the first n rows only (quick runs; N is then n).
    non_private: the baseline with the same everything else: no clipping, no noise, shuffled
        fixed batches of batch_size.
    report_to: Accelerate trackers ("tensorboard", "wandb", ...); none by default.
    cpu: Accelerator(cpu=True): gloo, even where GPUs exist.
    deepspeed: a DeepSpeed config file (ds_configs/zero*.json), for the deepspeed launcher or
        torchrun; ``accelerate launch`` with a DeepSpeed config needs none.
    """

    model: str = "smollm2-135m"
    task: str = "causal-lm"
    data: str | None = None
    eval_data: str | None = None
    text_column: str | None = None
    label_column: str = "label"
    eval_text_column: str | None = None
    prompt_column: str | None = "mr"
    target_column: str | None = "ref"
    max_length: int = 96
    max_train_examples: int | None = None
    max_eval_examples: int | None = 100
    epsilon: float = 8.0
    delta: float | None = None
    epochs: float | None = None
    max_steps: int | None = 12
    stop_after: int | None = None
    batch_size: float = 64
    micro_batch: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 0.1
    clip_fn: str = "automatic"
    trainable: str = "lora"
    lora_r: int = 8
    lora_alpha: float = 16.0
    noise_key: str | None = None
    seed: int = 0
    non_private: bool = False
    output_dir: str = "runs/dpscale-train"
    report_to: list[str] = field(default_factory=list)
    checkpoint_every: int = 20
    resume: bool = True
    generations: int = 10
    max_new_tokens: int = 40
    eval_batch_size: int = 32
    cpu: bool = False
    deepspeed: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.report_to, str):
            self.report_to = [name for name in self.report_to.split(",") if name and name != "none"]
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {TASKS}, got {self.task!r}.")
        if self.trainable not in TRAINABLE:
            raise ConfigError(f"trainable must be one of {TRAINABLE}, got {self.trainable!r}.")
        if self.task == "classification" and self.data is None:
            raise ConfigError("task classification needs --data (a CSV, TSV, JSON lines file or datasets folder).")
        if self.task == "classification" and self.text_column is None:
            self.text_column = "sentence"
        if self.max_steps is None and self.epochs is None:
            raise ConfigError("Give epochs or max_steps: the length of the run the noise is calibrated for.")
        for name in ("batch_size", "lr", "max_grad_norm", "epsilon"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number, got {value!r}.")
        for name in ("micro_batch", "max_length", "lora_r", "checkpoint_every", "eval_batch_size"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value > 0):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
        for name in ("max_steps", "stop_after"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value > 0):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}.")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """The YAML file's values, then the flags given (those not None), then the defaults."""
    values: dict[str, Any] = {}
    if path is not None:
        import yaml

        loaded = yaml.safe_load(Path(path).read_text())
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of option: value.")
        values.update({key.replace("-", "_"): value for key, value in loaded.items()})
    values.update({key: value for key, value in overrides.items() if value is not None})
    fields = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"Unknown option(s) {unknown}; known: {sorted(fields)}.")
    return TrainConfig(**{name: _as_number(name, value, fields[name]) for name, value in values.items()})


def _as_number(name: str, value: Any, annotation: str) -> Any:
    """YAML reads 3e-4 (no dot) as a string: numbers for the numeric options, whatever the spelling."""
    if not isinstance(value, str) or not annotation.startswith(("float", "int")):
        return value
    try:
        return float(value) if annotation.startswith("float") else int(value)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {value!r}.") from None
