"""The `dpscale` command line: one function per subcommand, registered in COMMANDS.

A subcommand is a `Command`: a name, a help line, a function that adds its arguments to its
parser, and a function that runs it from the parsed arguments and returns the exit status.
Adding one (say `dpscale train`) is one new `Command` in the table; `main` knows none by name.

dpscale's own errors (DPScaleError) end as one line on stderr and exit status 2, the status
argparse uses for bad arguments; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Sequence

from dpscale.accounting import (
    ACCOUNTANTS,
    DEFAULT_TOLERANCE,
    SAMPLINGS,
    calibrate_noise_multiplier,
    compute_epsilon,
    default_delta,
    steps_for_epochs,
)
from dpscale.errors import ConfigError, DPScaleError

EXIT_OK = 0
EXIT_USAGE = 2


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: `add_arguments(parser)` declares it, `run(args)` executes it."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# --------------------------------------------------------------------------------------------
# Arguments shared by the accounting subcommands.


def _add_run_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """How a run samples and how long it lasts: (q or B/N) and (steps or epochs)."""
    rate = parser.add_mutually_exclusive_group(required=True)
    rate.add_argument(
        "--sample-rate",
        "-q",
        type=float,
        help="chance that one example (one user with --privacy-unit user) joins a step's batch",
    )
    rate.add_argument(
        "--batch-size",
        type=int,
        help="expected batch size B (expected users per step with --privacy-unit user); "
        "the sample rate is B / --dataset-size",
    )
    length = parser.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", "-T", type=int, help="number of optimizer steps")
    length.add_argument(
        "--epochs", type=float, help="passes over the data; steps = ceil(epochs / sample rate)"
    )
    parser.add_argument(
        "--dataset-size",
        "-N",
        type=int,
        help="number of examples (of users with --privacy-unit user); refuses a delta >= 1/N "
        "and sets the default delta",
    )
    parser.add_argument(
        "--privacy-unit",
        choices=("example", "user"),
        default="example",
        help="what epsilon protects: one example (default) or one user with all their examples "
        "(then -N and --batch-size count users, as DPConfig(privacy_unit='user') does)",
    )
    parser.add_argument(
        "--delta",
        type=float,
        help="target delta (default with --dataset-size: 1/N**1.1)",
    )
    parser.add_argument("--accountant", choices=ACCOUNTANTS, default="pld")
    parser.add_argument(
        "--sampling",
        choices=SAMPLINGS,
        default="poisson",
        help="poisson (default) or shuffle: fixed-size batches without replacement (rdp only)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


@dataclasses.dataclass(frozen=True)
class _RunShape:
    sample_rate: float
    steps: int
    delta: float
    dataset_size: int | None
    accountant: str
    sampling: str
    privacy_unit: str = "example"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        size = "" if self.dataset_size is None else f"N = {self.dataset_size} {self.privacy_unit}s, "
        return (
            f"per {self.privacy_unit}: {size}q = {self.sample_rate:.6g}, {self.steps} steps, "
            f"{self.accountant} accountant, {self.sampling} sampling"
        )


def _run_shape(args: argparse.Namespace) -> _RunShape:
    if args.privacy_unit == "user" and args.sampling != "poisson":
        raise ConfigError("--privacy-unit user draws users by Poisson sampling; drop --sampling shuffle.")
    if args.batch_size is not None:
        if args.dataset_size is None:
            raise ConfigError("--batch-size needs --dataset-size to give the sample rate B / N.")
        if not 0 < args.batch_size <= args.dataset_size:
            raise ConfigError(
                f"--batch-size {args.batch_size} must lie between 1 and --dataset-size "
                f"{args.dataset_size}."
            )
        sample_rate = args.batch_size / args.dataset_size
    else:
        sample_rate = args.sample_rate
    if args.steps is not None:
        steps = args.steps
    else:
        if not (args.epochs > 0 and math.isfinite(args.epochs)):
            raise ConfigError(f"--epochs {args.epochs} must be a number > 0.")
        if not 0 < sample_rate <= 1:
            raise ConfigError(f"The sample rate {sample_rate:g} must lie in (0, 1].")
        steps = steps_for_epochs(args.epochs, sample_rate)
    if args.delta is not None:
        delta = args.delta
    elif args.dataset_size is not None:
        delta = default_delta(args.dataset_size)
    else:
        raise ConfigError("Give --delta, or --dataset-size to use the default delta 1/N**1.1.")
    return _RunShape(
        sample_rate=sample_rate,
        steps=steps,
        delta=delta,
        dataset_size=args.dataset_size,
        accountant=args.accountant,
        sampling=args.sampling,
        privacy_unit=args.privacy_unit,
    )


def _emit(args: argparse.Namespace, line: str, data: dict) -> None:
    if args.json:
        print(json.dumps(data, sort_keys=True))
    else:
        print(line)


# --------------------------------------------------------------------------------------------
# Subcommands.


def _add_epsilon_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sigma",
        "--noise-multiplier",
        dest="sigma",
        type=float,
        required=True,
        help="noise multiplier: noise std over the clipping norm",
    )
    _add_run_shape_arguments(parser)


def _run_epsilon(args: argparse.Namespace) -> int:
    shape = _run_shape(args)
    epsilon = compute_epsilon(
        args.sigma,
        shape.sample_rate,
        shape.steps,
        shape.delta,
        accountant=shape.accountant,
        sampling=shape.sampling,
        dataset_size=shape.dataset_size,
    )
    _emit(
        args,
        f"epsilon = {epsilon:.4f} at delta = {shape.delta:.3g} "
        f"(sigma = {args.sigma:g}, {shape.describe()})",
        {"epsilon": epsilon, "noise_multiplier": args.sigma, **shape.as_dict()},
    )
    return EXIT_OK


def _add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epsilon", type=float, required=True, help="target epsilon")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="relative gap to the target epsilon that ends the search (default %(default)g)",
    )
    _add_run_shape_arguments(parser)


def _run_calibrate(args: argparse.Namespace) -> int:
    shape = _run_shape(args)
    kinds = {
        "accountant": shape.accountant,
        "sampling": shape.sampling,
        "dataset_size": shape.dataset_size,
    }
    sigma = calibrate_noise_multiplier(
        args.epsilon,
        shape.delta,
        shape.sample_rate,
        shape.steps,
        tolerance=args.tolerance,
        **kinds,
    )
    epsilon = compute_epsilon(sigma, shape.sample_rate, shape.steps, shape.delta, **kinds)
    _emit(
        args,
        f"sigma = {sigma:g} gives epsilon = {epsilon:.4f} <= {args.epsilon:g} at "
        f"delta = {shape.delta:.3g} ({shape.describe()})",
        {
            "noise_multiplier": sigma,
            "epsilon": epsilon,
            "target_epsilon": args.epsilon,
            **shape.as_dict(),
        },
    )
    return EXIT_OK


_TRAIN_HELP = {
    "config": "YAML file of options (keys as below, with - or _); flags override it",
    "model": "hub id, local folder, .gguf file, or a packaged name: smollm2-135m, minilm-l6",
    "task": "causal-lm or classification",
    "data": "CSV, TSV, JSON lines or a saved datasets folder (default for causal-lm: packaged E2E)",
    "eval_data": "evaluation data, same formats",
    "epsilon": "target epsilon (sigma is calibrated for the planned steps)",
    "batch_size": "expected logical batch B (Poisson sampling at q = B / N); with --privacy-unit user, the "
                  "expected number of USERS per step (N is then the number of users)",
    "epochs": "passes over the data: ceil(epochs / q) steps (with --privacy-unit user, N users drawn per epoch "
              "in expectation)",
    "micro_batch": "physical batch: memory only, never the result",
    "max_grad_norm": "clipping norm R",
    "clip_fn": "abadi or automatic",
    "trainable": "all, bias (DP-BiTFiT) or lora",
    "non_private": "the non-private baseline with the same everything else (at user level: as many rows per "
                   "step as the private run's expected count, no privacy unit)",
    "privacy_unit": "example (epsilon protects one row) or user (one user with all their rows, named by "
                    "--user-column)",
    "user_column": "with --privacy-unit user: the training data's column holding each row's user (E2E: mr)",
    "examples_per_user": "with --privacy-unit user: at most k rows of each drawn user per step (unset: 1; "
                         "k <= --micro-batch)",
    "report_to": "Accelerate trackers, comma-separated: tensorboard, wandb, ...",
    "noise_key": "noise key file (every rank reads it; default: created in --output-dir)",
    "labels": "classification: the expected labels in id order, comma-separated (e.g. 0,1); a row with another "
              "label is refused (default: the training data's distinct labels; empty or NaN ones are refused)",
    "resume": "continue the checkpoint in --output-dir (default); --no-resume starts over (refused with the key the "
              "checkpoint was written with: see --fresh-key)",
    "fresh_key": "start anew with a new noise key where a previous run exists: that run moves whole to "
                 "--output-dir/previous-<key fingerprint>/",
    "head_init": "zero or default: how a classification head starts (unset: zero for a private run, see "
                 "dpscale/heads.py)",
    "lp_steps": "LP-FT in one accounted run: the first K steps train the classification head alone",
    "lp_lr": "with --lp-steps: the learning rate of the probing phase (default: --lr)",
    "label_words": "prompt-based classification with a causal LM: one word per label, comma-separated, in the "
                   "labels' order (SST-2: terrible,great)",
    "prompt_template": "with --label-words: where the text goes, e.g. '{text} It was' (the default)",
    "collective_timeout": "seconds a process waits for the others in a collective before the job fails: a dead "
                          "or hung rank ends the run in bounded time",
    # optimizer and adaptive clipping
    "optimizer": "adamw, or adambc (DP-AdamBC: Adam's second moment minus the known noise variance; "
                 "post-processing, epsilon unchanged; wants a smaller --lr than adamw)",
    "adambc_floor": "with --optimizer adambc: gamma', the least corrected second moment",
    "clip_quantile": "adaptive clipping: R follows this quantile of the per-example norms, estimated privately "
                     "each step (--max-grad-norm is the start; needs --clip-fn abadi; epsilon unchanged)",
    "clip_quantile_lr": "with --clip-quantile: eta of the update R <- R exp(-eta (unclipped fraction - quantile))",
    "clip_count_std": "with --clip-quantile: std of the noise on the unclipped count (default batch size / 20)",
    "mixed_precision": "no or bf16 (forward/backward under bf16 autocast; norms, sums and noise in float32); "
                       "refused on hardware without bf16, fp16 always",
    "audit": "plant canaries in this run (each trained with probability 1/2 by a keyed coin) and report the one-run "
             "lower bound on epsilon beside the accountant's (privacy_report.json 'audit', docs/RELIABILITY.md)",
    "audit_canaries": "with --audit: m canaries, all counted in N",
    "audit_guesses": "with --audit: 'member' guesses on the highest scores (default: audit_canaries // 10)",
    "audit_confidence": "with --audit: confidence of the lower bound",
}


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (--field-name); all default to None so that only the flags
    given override the YAML file."""
    from dpscale.train.config import TrainConfig

    parser.add_argument("--config", help=_TRAIN_HELP["config"])
    for spec in dataclasses.fields(TrainConfig):
        flag = "--" + spec.name.replace("_", "-")
        default = TrainConfig.__dataclass_fields__[spec.name].default
        help_text = _TRAIN_HELP.get(spec.name, "")
        if isinstance(default, bool):
            parser.add_argument(flag, dest=spec.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        elif spec.name == "report_to":
            parser.add_argument(flag, dest=spec.name, default=None, help=help_text)
        else:
            kind = _field_type(spec.type)
            parser.add_argument(flag, dest=spec.name, type=kind, default=None,
                                help=f"{help_text} (default {default})".strip())


def _field_type(annotation: str):
    text = str(annotation)
    if text.startswith("int"):
        return int
    if text.startswith("float"):
        return float
    return str


def _run_train(args: argparse.Namespace) -> int:
    from dpscale.train.config import load_config
    from dpscale.train.job import run

    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "command", "_command")}
    run(load_config(args.config, overrides))
    return EXIT_OK


def _add_audit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sigma", "--noise-multiplier", dest="sigma", type=float, default=1.0,
                        help="noise multiplier of the audited run; 0 runs without noise (deliberately "
                        "broken: epsilon is infinite) (default %(default)g)")
    parser.add_argument("--claim-sigma", type=float, default=None,
                        help="deliberately mis-stated run: train with --sigma but test the epsilon that "
                        "this sigma would give (default: the accountant's epsilon of the run)")
    parser.add_argument("--steps", "-T", type=int, default=100, help="logical steps (default %(default)d)")
    parser.add_argument("--sample-rate", "-q", type=float, default=0.05,
                        help="Poisson sampling rate over examples and included canaries (default %(default)g)")
    parser.add_argument("--canaries", "-m", type=int, default=1000,
                        help="canaries, each in the training set with probability 1/2 (default %(default)d)")
    parser.add_argument("--guesses", type=int, default=100,
                        help="k: guess 'member' for the k highest scores and 'non-member' for the k lowest "
                        "(default %(default)d)")
    parser.add_argument("--examples", type=int, default=5000,
                        help="ordinary (non-canary) training examples (default %(default)d)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping norm R (default %(default)g)")
    parser.add_argument("--canary-norm", type=float, default=10.0,
                        help="canaries' raw gradient norm over R; the engine must clip them (default %(default)g)")
    parser.add_argument("--confidence", type=float, default=0.95, help="confidence of the bound (default %(default)g)")
    parser.add_argument("--seed", type=int, default=0, help="the canaries' coins, data and initial model")
    parser.add_argument("--noise-key", default=None, help="noise key file (default: a fresh key)")
    parser.add_argument("--accountant", choices=ACCOUNTANTS, default="pld")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _run_audit(args: argparse.Namespace) -> int:
    from dpscale.audit import audit_one_run

    result = audit_one_run(
        noise_multiplier=args.sigma, claimed_noise_multiplier=args.claim_sigma, steps=args.steps,
        sample_rate=args.sample_rate, canaries=args.canaries, guesses=args.guesses, examples=args.examples,
        max_grad_norm=args.max_grad_norm, canary_norm=args.canary_norm, confidence=args.confidence,
        seed=args.seed, noise_key=args.noise_key, accountant=args.accountant,
    )
    _emit(args, result.describe(), result.as_dict())  # an infinite epsilon (no noise) is JSON's Infinity
    return EXIT_OK


COMMANDS: tuple[Command, ...] = (
    Command(
        "epsilon",
        "epsilon of a run with a given noise multiplier",
        _add_epsilon_arguments,
        _run_epsilon,
    ),
    Command(
        "calibrate",
        "smallest noise multiplier that meets a target epsilon",
        _add_calibrate_arguments,
        _run_calibrate,
    ),
    Command(
        "train",
        "privately fine-tune a pretrained model (default: DP-LoRA of SmolLM2-135M on E2E at epsilon 8)",
        _add_train_arguments,
        _run_train,
    ),
    Command(
        "audit",
        "empirical lower bound on epsilon from one run with canaries (Steinke, Nasr, Jagielski 2023)",
        _add_audit_arguments,
        _run_audit,
    ),
)


# --------------------------------------------------------------------------------------------


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpscale", description="Differentially private training of transformers."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in commands:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(_command=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    args = build_parser().parse_args(argv)
    try:
        return args._command.run(args)
    except DPScaleError as error:
        print(f"dpscale {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
