"""The task head of a sequence classifier under DP: zero it at build, find its parameters.

Why a zero head. A fresh classification head is random, and under DP it is learned under the same
noise as everything else. With ``logits = W h + b`` and ``W = 0, b = 0``:

* every prediction starts uniform (loss log K for K classes), whatever the backbone says, so no
  example starts confidently wrong with a large gradient that clipping then cuts down;
* the gradient of the loss with respect to the head's input is ``W^T (p - y) = 0``, so at the
  first step every backbone (or LoRA) parameter has a zero per-example gradient, and the whole
  clipping budget R goes to the head: ``dL/dW = (p - y) h^T`` with ``||p - y|| <= sqrt(2)``.
  From the second step the head is no longer zero and the backbone receives signal through it:
  the head learns first, then the features adapt to it. (The noise is still added to every
  trained coordinate at the first step; that is the price of training them at all.)

This is what DP fine-tuning papers do for the last layer (De et al. 2022 zero-initialise the
classifier; Li et al. 2022 avoid the fresh head altogether with label words, see
``dpscale.losses.label_word_losses``).

    model = dpscale.zero_head(model)            # before dpscale.lora: PEFT copies the zero head
    names = dpscale.head_parameter_names(model)  # the head's trainable parameters (any wrapper)

The head is found from the model itself, not from a list of names: the top-level modules of a
``*ForSequenceClassification`` model outside its backbone (``model.base_model``): BERT's
``classifier`` (its pooler belongs to the backbone and is pretrained), Llama's ``score``,
RoBERTa's ``classifier.dense`` and ``classifier.out_proj``, DistilBERT's ``pre_classifier`` and
``classifier``; under PEFT, the trainable copy in ``modules_to_save``. What is zeroed is the
output layer: every ``nn.Linear`` in the head with one output per label.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from dpscale.errors import ConfigError
from dpscale.subsets import head_module_names, is_peft_model

__all__ = ["HEAD_INITS", "head_parameter_names", "output_layers", "zero_head"]

logger = logging.getLogger(__name__)

HEAD_INITS = ("zero", "default")


def _task_model(model: nn.Module) -> nn.Module:
    """The transformers task model, under a PEFT wrapper if there is one."""
    return model.get_base_model() if is_peft_model(model) else model


def output_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """{qualified name in the task model: layer} of the head's output layers: the ``nn.Linear``
    modules inside the head with ``config.num_labels`` outputs (under PEFT both the frozen original
    and the trainable copy). Refused when there is none (a head that is not a Linear, or a model
    without a separate head)."""
    inner = _task_model(model)
    num_labels = getattr(getattr(inner, "config", None), "num_labels", None)
    if num_labels is None:
        raise ConfigError(f"{type(inner).__name__} has no config.num_labels: not a transformers classifier, so its "
                          "output layer cannot be found; zero it yourself or use head_init='default'.")
    heads = head_module_names(inner)
    found = {
        f"{head}.{name}" if name else head: module
        for head in heads
        for name, module in getattr(inner, head).named_modules()
        if isinstance(module, nn.Linear) and module.out_features == num_labels
    }
    if not found:
        raise ConfigError(
            f"No nn.Linear with {num_labels} outputs in the head ({heads}) of {type(inner).__name__}: nothing to "
            "zero. Use head_init='default' (--head-init default) for this model."
        )
    return found


def zero_head(model: nn.Module) -> nn.Module:
    """Zero the weight and bias of the classification head's output layer(s) and return the model.
    Call it on the task model before ``dpscale.lora`` (whose trainable head is a copy made when the
    model is wrapped); on a PEFT model both the original and the trainable copy are zeroed."""
    layers = output_layers(model)
    with torch.no_grad():
        for layer in layers.values():
            layer.weight.zero_()
            if layer.bias is not None:
                layer.bias.zero_()
    logger.info("zero-initialised the classification head: %s", sorted(layers))
    return model


def head_parameter_names(model: nn.Module, *, trainable_only: bool = True) -> list[str]:
    """Names (as ``model.named_parameters()`` gives them) of the task head's parameters, by default
    only those with ``requires_grad``: the set a linear probe trains. Under PEFT, the trainable
    copy of the head (``modules_to_save``)."""
    inner = _task_model(model)
    ids = {id(p) for head in head_module_names(inner) for p in getattr(inner, head).parameters()}
    names = [name for name, p in model.named_parameters() if id(p) in ids and (p.requires_grad or not trainable_only)]
    if not names:
        raise ConfigError(
            f"The head of {type(inner).__name__} has no {'trainable ' if trainable_only else ''}parameters: a linear "
            "probe would train nothing. Choose a subset that trains the head (all, bias, lora)."
        )
    return names
