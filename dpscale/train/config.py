"""TrainConfig: every knob of ``dpscale train``, read from a YAML file (``--config``) and
overridden by flags, validated before anything is loaded.

The defaults are the embedded default job, sized to finish in under 10 minutes on 2 CPU cores:
DP-LoRA of SmolLM2-135M on the packaged E2E split at epsilon 8, 12 Poisson steps of expected batch
64, a small clipping norm with automatic clipping, BLEU on 100 held-out meaning representations.
Its memory is set by the micro-batch (activations of 30 layers; BENCHMARKS.md, "The main job"):
4 keeps the whole job under 3 GiB resident at no cost in time per example on a CPU. Real runs
want more steps and larger batches (the recipes in examples/).
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
OPTIMIZERS = ("adamw", "adambc")


@dataclass
class TrainConfig:
    """model: a hub id, a local folder, a .gguf file, or a packaged short name ("smollm2-135m",
        "minilm-l6").
    task: "causal-lm" (loss on the target column, or on the whole text) or "classification".
    data, eval_data: CSV, TSV, JSON lines or a saved datasets folder; none for causal-lm: the
        packaged E2E development split, split by meaning representation into train and eval. Both
        are checked before the model loads (dpscale.train.checks).
    labels: classification only: the expected labels in id order ("0,1"); a row with another label
        is refused. Unset: the distinct labels of the training data (refused if one is empty or NaN).
    epsilon, delta: the target (sigma is calibrated for the planned steps); delta default N^-1.1.
    epochs or max_steps: the length the noise is calibrated for: epochs when given, else max_steps.
        With both, max_steps caps the run; it also stops (saving) where the budget is spent.
    stop_after: end this invocation after so many steps (a quick look, a CI smoke run); the plan,
        and so sigma, stay those of the whole run, which a rerun resumes.
    batch_size: the expected logical batch B (Poisson: q = B / N); micro_batch: the physical one.
    max_train_examples, max_eval_examples: use the first n rows only (quick runs; N is then n, or
        at user level the number of users among those rows).
    generations, max_new_tokens: causal LM: BLEU of greedy generations (64 prompts at a time) for
        the first ``generations`` distinct prompts of ALL the eval rows, each against every
        reference it has (max_eval_examples cuts the rows of the eval loss only); 0: no BLEU.
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
    resume: a rerun with the same output_dir continues its checkpoint (the same key and resume flags,
        dpscale.train.rerun); --no-resume starts over (refused with the key the checkpoint was
        written with). fresh_key: start anew with a new key, the previous run moved whole to
        output_dir/previous-<its key's fingerprint>/.
    report_to: Accelerate trackers ("tensorboard", "wandb", ...); none by default.
    cpu: Accelerator(cpu=True): gloo, even where GPUs exist.
    collective_timeout: seconds a process waits in a collective (the gradient all-reduce, a
        barrier) for the others before the job fails with an error naming the timeout: a rank that
        died or hung ends the run in bounded time instead of torch's default 30 minutes.
    deepspeed: a DeepSpeed config file (ds_configs/zero*.json), for the deepspeed launcher or
        torchrun; ``accelerate launch`` with a DeepSpeed config needs none.
    optimizer: "adamw" (default) or "adambc" (``dpscale.DPAdamBC``: Adam with the DP noise variance
        removed from its second moment, floored at ``adambc_floor``; post-processing, epsilon unchanged).
    clip_quantile, clip_quantile_lr, clip_count_std: adaptive clipping (``DPConfig``'s knobs of the
        same names; max_grad_norm is then the starting R): R follows that quantile of the per-example
        norms, estimated privately each step; needs clip_fn abadi.
    head_init: "zero" or "default" (the model's own random init): how a classification head starts.
        Unset: "zero" for a private classification run with a head, "default" otherwise (the resolved
        value is what metrics.json records). Why zero: dpscale/heads.py.
    lp_steps: linear probing then fine-tuning in one accounted run (private classification with a
        head): the first lp_steps steps train the head alone, the rest the --trainable subset and
        the head; sigma is calibrated for the whole run. Why one run: dpscale/phases.py.
    lp_lr: with lp_steps, the learning rate of the probing phase (unset: lr). A head alone takes a
        far larger step than a whole backbone can under DP noise (each noised coordinate moves by
        about the learning rate under Adam): probe fast, then fine-tune at lr.
    label_words: prompt-based classification with a causal LM (task classification): one word per
        label in the labels' order (sorted values; SST-2: terrible,great), each scored as the LM's
        next token " <word>" after the rendered prompt_template. No head is created.
    prompt_template: with label_words, where the text goes: default "{text} It was".
    mixed_precision: "no" or "bf16" (forward and backward under bf16 autocast; weights, norms,
        clipped sums and noise in float32: dpscale/train/precision.py); unset: what ``accelerate
        launch --mixed_precision`` says, else "no". bf16 is refused on hardware without bf16
        arithmetic, fp16 always (it needs loss scaling).
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
    labels: list[str] | None = None
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
    micro_batch: int = 4
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
    fresh_key: bool = False
    generations: int = 100
    max_new_tokens: int = 40
    eval_batch_size: int = 16
    cpu: bool = False
    collective_timeout: float = 300.0
    deepspeed: str | None = None
    # optimizer and adaptive clipping (DP-AdamBC; Andrew et al.'s quantile clipping)
    optimizer: str = "adamw"
    adambc_floor: float = 1e-8
    clip_quantile: float | None = None
    clip_quantile_lr: float = 0.2
    clip_count_std: float | None = None
    head_init: str | None = None
    lp_steps: int | None = None
    lp_lr: float | None = None
    label_words: list[str] | None = None
    prompt_template: str | None = None
    mixed_precision: str | None = None
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
        self._check_labels()
        self._check_privacy_unit()
        self._check_optimizer_and_adaptive_clipping()
        self._check_heads()
        if self.mixed_precision is not None:
            from dpscale.train.precision import check_mixed_precision_name

            self.mixed_precision = check_mixed_precision_name(self.mixed_precision)
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

    def _check_labels(self) -> None:
        """--labels "neg,pos" (labels: [neg, pos] in the YAML): the expected labels in id order, as
        text; every data label is compared by its text."""
        if self.labels is None:
            return
        if self.task != "classification":
            raise ConfigError(
                "--labels (labels:) states a classifier's labels; it applies to --task classification only."
            )
        items = self.labels.split(",") if isinstance(self.labels, str) else self.labels
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"labels must be a comma-separated text or a list, got {self.labels!r}.")
        labels = [str(item).strip() for item in items]
        if len(labels) < 2 or "" in labels or len(set(labels)) != len(labels):
            raise ConfigError(
                f"--labels {','.join(labels)} must name at least two distinct, non-empty labels in id order "
                "(e.g. --labels 0,1 or --labels negative,positive)."
            )
        self.labels = labels

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

    def _check_optimizer_and_adaptive_clipping(self) -> None:
        """Checked before anything loads (DPConfig checks the rest when the engine is built)."""
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}.")
        if not (isinstance(self.adambc_floor, (int, float)) and math.isfinite(self.adambc_floor)
                and self.adambc_floor > 0):
            raise ConfigError(f"adambc_floor must be a positive number, got {self.adambc_floor!r}.")
        if self.non_private and (self.optimizer == "adambc" or self.clip_quantile is not None):
            raise ConfigError(
                "--non-private trains without clipping or noise, so --optimizer adambc (which removes the noise's "
                "variance) and --clip-quantile (adaptive clipping) have nothing to act on: drop them for the baseline "
                "(--optimizer adamw)."
            )
        adaptive_off = self.clip_quantile is None
        ignored = [flag for flag, on in (
            ("--adambc-floor", self.adambc_floor != 1e-8 and self.optimizer != "adambc"),
            ("--clip-quantile-lr", self.clip_quantile_lr != 0.2 and adaptive_off),
            ("--clip-count-std", self.clip_count_std is not None and adaptive_off)) if on]
        if ignored:
            raise ConfigError(
                f"{', '.join(ignored)} would be ignored: --adambc-floor goes with --optimizer adambc, "
                "--clip-quantile-lr and --clip-count-std with --clip-quantile (adaptive clipping). Add the option "
                "they belong to, or drop them."
            )
        if not adaptive_off and self.clip_fn != "abadi":
            raise ConfigError(
                f"--clip-quantile (adaptive clipping) follows the fraction of examples Abadi clipping leaves "
                f"unclipped; clip_fn {self.clip_fn!r} clips every example. Add --clip-fn abadi (clip_fn: abadi in the "
                "YAML), or "
                "drop --clip-quantile."
            )

    def _check_heads(self) -> None:
        """Head init, linear probing and label words: each only where it means something, refused
        where it would be silently ignored."""
        if isinstance(self.label_words, str):
            self.label_words = [word.strip() for word in self.label_words.split(",") if word.strip()]
        prompt = self.label_words is not None
        if prompt:
            if self.task != "classification":
                raise ConfigError("label_words (--label-words) classify with a causal LM's label words: they need "
                                  "--task classification.")
            from dpscale.train.prompting import DEFAULT_TEMPLATE, check_template

            self.prompt_template = self.prompt_template or DEFAULT_TEMPLATE
            check_template(self.prompt_template)
        elif self.prompt_template is not None:
            raise ConfigError("prompt_template (--prompt-template) is used only with label_words (--label-words).")
        has_head = self.task == "classification" and not prompt
        if self.head_init is None:
            self.head_init = "zero" if has_head and not self.non_private else "default"
        if self.head_init not in ("zero", "default"):
            raise ConfigError(f"head_init must be zero or default, got {self.head_init!r}.")
        if self.head_init == "zero" and not has_head:
            raise ConfigError("head_init zero zeroes a classification head, and this run has none (task causal-lm, or "
                              "label words through the LM head): drop --head-init zero.")
        if self.lp_lr is not None and self.lp_steps is None:
            raise ConfigError("lp_lr (--lp-lr) is the learning rate of LP-FT's probing phase, and this run has none: "
                              "add --lp-steps K, or drop --lp-lr.")
        if self.lp_steps is not None:
            if isinstance(self.lp_steps, bool) or not isinstance(self.lp_steps, int) or self.lp_steps < 1:
                raise ConfigError(f"lp_steps must be a positive integer, got {self.lp_steps!r}.")
            if not has_head:
                raise ConfigError("lp_steps (--lp-steps) trains a classification head first, and this run has none "
                                  "(task causal-lm, or label words): drop --lp-steps.")
            if self.clip_quantile is not None:
                raise ConfigError("lp_steps (--lp-steps) starts a new engine for the fine-tuning phase, which would "
                                  "restart adaptive clipping's R from --max-grad-norm: drop --clip-quantile (fixed "
                                  "clipping) or --lp-steps.")
            if self.non_private:
                raise ConfigError("lp_steps (--lp-steps) is for private runs (one accounted run in two phases); the "
                                  "non-private baseline trains one set: drop --lp-steps or --non-private.")
            if self.lp_lr is not None and not (isinstance(self.lp_lr, (int, float)) and not isinstance(self.lp_lr, bool)
                                               and math.isfinite(self.lp_lr) and self.lp_lr > 0):
                raise ConfigError(f"lp_lr must be a positive number, got {self.lp_lr!r}.")
            if self.max_steps is not None and self.epochs is None and self.lp_steps >= self.max_steps:
                raise ConfigError(f"lp_steps {self.lp_steps} leaves no fine-tuning step of max_steps "
                                  f"{self.max_steps}: lower --lp-steps or raise --max-steps.")

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
