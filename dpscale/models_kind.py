"""What kind of transformers task model a module is (causal LM, sequence classification), decided
in this one place for every caller: DPTrainer's automatic per-example loss (a causal LM shifts its
labels), ``dpscale.lora`` (the PEFT task type) and ``save_model`` (the task it records).

The answer comes from transformers' own auto-model mappings, so a new architecture is known as soon
as transformers knows it. It is read from the model's class and its bases, never from the class
name alone: FSDP2's ``fully_shard`` swaps a module's class for a subclass named after it
(``FSDPLlamaForCausalLM``), which no mapping lists. Not from ``config.model_type`` alone either: a
family's base model and its heads share one model_type; nor from ``config.architectures``, which
records the class a checkpoint was saved from, not the class it was loaded into.
"""

from __future__ import annotations

from torch import nn

__all__ = ["is_causal_lm", "task_of", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The task model under the wrappers that hide it: PEFT's (``get_base_model``) and DDP's
    (``.module``). FSDP2 does not wrap (it changes the class in place), so it needs no unwrapping."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        base = getattr(model, "get_base_model", None)  # PEFT
        if callable(base):
            inner = base()
            if inner is not model:
                model = inner
                continue
        return model


def task_of(model: nn.Module) -> str | None:
    """"classification" or "causal-lm" for a transformers task model, read from transformers' own
    auto-model mappings (so a new architecture is known as soon as transformers knows it); None
    for anything else, where callers ask for the task explicitly."""
    from transformers.models.auto import modeling_auto

    names = {cls.__name__ for cls in type(unwrap_model(model)).__mro__}
    if names & _class_names(modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES):
        return "classification"
    if names & _class_names(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        return "causal-lm"
    return None


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` (bare, PEFT-wrapped, DDP-wrapped or fully_shard'ed) is a causal LM: its
    position t predicts label t+1, so its per-example losses shift the labels."""
    return task_of(model) == "causal-lm"


def _class_names(mapping) -> set[str]:
    out: set[str] = set()
    for value in mapping.values():
        out.update((value,) if isinstance(value, str) else value)
    return out
