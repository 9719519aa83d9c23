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
PRIVACY_UNITS = ("example", "user")


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
    max_train_examples, max_eval_examples: use the first n rows only (quick runs; N is then n, or
        at user level the number of users among those rows).
    privacy_unit: "example" (default: epsilon protects one row) or "user": epsilon protects one user
        with all their rows, the user named by ``user_column``. Then N is the number of distinct
        users in the training rows, batch_size the expected number of users per step (each bringing
        at most ``examples_per_user`` of their rows, default 1), and an epoch is N users drawn in
        expectation (ceil(epochs / q) steps; with fewer than all of a user's rows per draw, an epoch
        need not visit every row).
    user_column: the training data's column naming each row's user (E2E: "mr", each meaning
        representation with its several references is one user). Only with privacy_unit "user".
    non_private: the baseline with the same everything else: no clipping, no noise, shuffled
        fixed batches of batch_size. At user level the privacy unit protects nothing there; the
        batches hold as many rows as a private step's expected count (batch_size users times the
        mean rows a drawn user brings) and the run as many steps, so the two runs see the same
        amount of data.
    report_to: Accelerate trackers ("tensorboard", "wandb", ...); none by default.
    cpu: Accelerator(cpu=True): gloo, even where GPUs exist.
    collective_timeout: seconds a process waits in a collective (the gradient all-reduce, a
        barrier) for the others before the job fails with an error naming the timeout: a rank that
        died or hung ends the run in bounded time instead of torch's default 30 minutes.
    deepspeed: a DeepSpeed config file (ds_configs/zero*.json), for the deepspeed launcher or
        torchrun; ``accelerate launch`` with a DeepSpeed config needs none.
    audit: plant audit_canaries canaries in this run (each trained with probability 1/2 by a keyed
        coin; N counts all of them) and report the one-run lower bound on epsilon (Steinke, Nasr
        and Jagielski 2023) from audit_guesses member guesses (default audit_canaries // 10) at
        audit_confidence beside the accountant's epsilon (docs/RELIABILITY.md).
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
    privacy_unit: str = "example"
    user_column: str | None = None
    examples_per_user: int | None = None
    non_private: bool = False
    output_dir: str = "runs/dpscale-train"
    report_to: list[str] = field(default_factory=list)
    checkpoint_every: int = 20
    resume: bool = True
    generations: int = 10
    max_new_tokens: int = 40
    eval_batch_size: int = 32
    cpu: bool = False
    collective_timeout: float = 300.0
    deepspeed: str | None = None
    audit: bool = False
    audit_canaries: int = 1000
    audit_guesses: int | None = None
    audit_confidence: float = 0.95

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
        self._check_privacy_unit()
        if self.audit:
            self._check_audit()
        if self.max_steps is None and self.epochs is None:
            raise ConfigError("Give epochs or max_steps: the length of the run the noise is calibrated for.")
        for name in ("batch_size", "lr", "max_grad_norm", "epsilon", "collective_timeout"):
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

    def _check_privacy_unit(self) -> None:
        """The unit's knobs go together: a user column or k without the user unit would be silently
        ignored (an example-level epsilon mistaken for a user-level one), the user unit without a
        column cannot know whose each row is."""
        if self.privacy_unit not in PRIVACY_UNITS:
            raise ConfigError(f"privacy_unit must be one of {PRIVACY_UNITS}, got {self.privacy_unit!r}.")
        if self.privacy_unit == "user":
            if not self.user_column:
                raise ConfigError(
                    "privacy_unit user protects each user with all their rows: name the column that holds each "
                    "training row's user with --user-column (user_column: in the YAML; for E2E, mr)."
                )
            k = self.examples_per_user
            if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
                raise ConfigError(f"examples_per_user must be a positive integer, got {k!r}.")
            if k is not None and k > self.micro_batch:
                raise ConfigError(
                    f"examples_per_user {k} exceeds micro_batch {self.micro_batch}: a user's rows are clipped as one "
                    f"unit and must fit in one micro-batch. Raise --micro-batch to at least {k} or lower "
                    "--examples-per-user."
                )
            return
        for name, flag in (("user_column", "--user-column"), ("examples_per_user", "--examples-per-user")):
            if getattr(self, name) is not None:
                raise ConfigError(
                    f"{flag} ({name}) is for --privacy-unit user; with privacy_unit example each row is its own "
                    f"unit and {name} would be ignored. Add --privacy-unit user, or drop {flag}."
                )

    def _check_audit(self) -> None:
        """--audit plants canaries in a private run at example level (dpscale/train/canaries.py)."""
        from dpscale.audit_run import check_audit_options

        if self.non_private or self.privacy_unit != "example":
            raise ConfigError(
                "--audit tests a private run's epsilon per example: drop --non-private (the baseline claims no "
                "epsilon) and --privacy-unit user (canaries are single rows), or drop --audit."
            )
        check_audit_options(self.audit_canaries, self.audit_guesses, self.audit_confidence)

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
