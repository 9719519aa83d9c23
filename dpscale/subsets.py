"""Which parameters train: the whole model, its biases (DP-BiTFiT), LoRA adapters, or a named set.

Under DP the choice matters more than without it: the noise has the same std on every trained
coordinate, so its norm grows with the square root of their number while the signal does not,
and every trained coordinate costs per-example work. Each helper sets ``requires_grad`` and
returns the model (wrapped by PEFT for LoRA); the engine then clips exactly what trains. A choice
that would train nothing, or not what was asked, is refused rather than narrowed silently.

    model = dpscale.bitfit(model)                 # biases (+ a task head), DP-BiTFiT
    model = dpscale.lora(model, r=8)              # PEFT LoRA on every linear layer
    model = dpscale.train_only(model, ["*.attention.*", "classifier.*"])

A model already wrapped by PEFT (``get_peft_model``) is taken as it is: pass it to the engine
directly.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence

from torch import nn

from dpscale.errors import ConfigError
from dpscale.models_kind import task_of

logger = logging.getLogger(__name__)

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def head_module_names(model: nn.Module) -> list[str]:
    """The top-level modules of a task model that hold parameters outside its backbone
    (`model.base_model`): the classifier of a sequence classifier (BERT: classifier; RoBERTa:
    classifier with dense and out_proj; DistilBERT: pre_classifier and classifier)."""
    base = getattr(model, "base_model", model)
    if base is model:
        raise ConfigError(
            f"{type(model).__name__} has no separate backbone (base_model), so its task head "
            "cannot be told apart; give a transformers task model (AutoModelFor...), or pass "
            "include_head=False"
        )
    return [
        child_name
        for child_name, child in model.named_children()
        if child is not base and any(True for _ in child.parameters())
    ]


def full(model: nn.Module) -> nn.Module:
    """Every parameter trains (a tied embedding and output head stay one parameter)."""
    _refuse_peft(model, "full")
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    _log(model, "all")
    return model


def bitfit(model: nn.Module, *, include_norms: bool = False, include_head: bool = True) -> nn.Module:
    """DP-BiTFiT (Bu et al. 2022): every bias term trains, normalisation biases included, and nothing
    else, so the per-example work is the output gradients' sums over positions.

    include_norms: also the normalisation layers' scales (LayerNorm/RMSNorm weights).
    include_head: also the whole task head of a transformers task model (weights and biases):
        a freshly initialised classifier must learn, and biases alone cannot rotate it.
    A model without biases outside its head (Llama, SmolLM2) is refused: use ``lora``.
    """
    _refuse_peft(model, "bitfit")
    head = head_module_names(model) if include_head else []
    chosen = set()
    biases_outside_head = 0
    for module_name, module in model.named_modules():
        in_head = module_name.split(".", 1)[0] in head
        for local, parameter in module.named_parameters(recurse=False):
            if in_head or local == "bias" or (include_norms and isinstance(module, _NORMS)):
                chosen.add(id(parameter))
            biases_outside_head += local == "bias" and not in_head
    if not biases_outside_head:
        raise ConfigError(
            f"bitfit trains bias terms, and {type(model).__name__} has none outside its head "
            "(Llama-style models, SmolLM2 among them, use no biases); use LoRA (dpscale.lora, --trainable lora) "
            "or full fine-tuning"
        )
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in chosen)
    _log(model, "bias")
    return model


def lora(
    model: nn.Module,
    *,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules: str | Sequence[str] = "all-linear",
    task: str | None = None,
) -> nn.Module:
    """PEFT LoRA (rank ``r``, scale ``alpha / r``) on ``target_modules`` ("all-linear": every linear
    layer but the output head); only lora_A and lora_B train, plus, for sequence classification, a
    trainable copy of the task head (a fresh head must learn).

    task: "classification" or "causal-lm"; read from the model's class when omitted.
    """
    try:
        from peft import LoraConfig, TaskType, get_peft_model
    except ImportError as err:
        raise ConfigError(f"dpscale.lora needs PEFT: pip install 'dpscale[train]' ({err})") from err
    _refuse_peft(model, "lora")
    task = task or task_of(model)
    if task not in ("classification", "causal-lm"):
        raise ConfigError(f"dpscale.lora: give task='classification' or 'causal-lm' for {type(model).__name__}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ConfigError(f"lora_r must be a positive integer, got {r!r}")
    if not alpha > 0:
        raise ConfigError(f"lora_alpha must be positive, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {dropout!r}")
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules:
            raise ConfigError("target_modules is empty: LoRA would train nothing")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        bias="none",
        # The whole head, found from the model itself (PEFT's default knows the names
        # "classifier" and "score" only; DistilBERT's pre_classifier is fresh too).
        modules_to_save=head_module_names(model) if task == "classification" else None,
    )
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as err:  # target modules that match nothing
        raise ConfigError(f"LoRA could not be applied to {type(model).__name__}: {err}") from err
    _log(wrapped, "lora")
    return wrapped


def train_only(model: nn.Module, patterns: Sequence[str]) -> nn.Module:
    """Exactly the parameters whose names match one of the shell-style ``patterns`` train
    (``"*.attention.*"``, ``"classifier.*"``); a pattern that matches nothing is refused (a typo
    would otherwise train less than asked)."""
    if isinstance(patterns, str):
        patterns = [patterns]
    names = [name for name, _ in model.named_parameters()]
    unmatched = [p for p in patterns if not fnmatch.filter(names, p)]
    if not patterns or unmatched:
        raise ConfigError(f"train_only: no parameter name matches {unmatched or 'an empty list'}; "
                          f"names look like {names[:3]}")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(any(fnmatch.fnmatchcase(name, p) for p in patterns))
    _log(model, f"patterns {list(patterns)}")
    return model


def _refuse_peft(model: nn.Module, helper: str) -> None:
    if is_peft_model(model):
        raise ConfigError(
            f"dpscale.{helper} takes the bare model, and this one is already wrapped by PEFT; "
            "a PEFT model is used as it is: pass it to the engine directly"
        )


def _log(model: nn.Module, what: str) -> None:
    trainable = [p for p in model.parameters() if p.requires_grad]
    count = sum(p.numel() for p in trainable)
    total = sum(p.numel() for p in model.parameters())
    logger.info("trainable=%s: %d of %d parameters (%.3f%%) in %d tensors",
                what, count, total, 100.0 * count / max(total, 1), len(trainable))
