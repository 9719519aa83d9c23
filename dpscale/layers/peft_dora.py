"""PEFT's DoRA (``LoraConfig(use_dora=True)``), refused when the engine is built.

DoRA rescales each output by a trained magnitude divided by the column norms of the merged weight
``W + scale * B A``: its forward reads ``lora_A.weight`` and ``lora_B.weight`` directly, outside
those modules' own calls, and its magnitude module is called on no batch at all. dpscale has no
exact per-example rule for that composition yet, and without one the call would fail later with a
message about batch dimensions; this says what to do instead, before the first step. Plain LoRA
(any rank, with dropout) and rsLoRA (``use_rslora=True``: only the scale differs) are supported.
"""

from __future__ import annotations

from torch import nn

from dpscale.errors import UnsupportedModuleError
from dpscale.layers.rule import Rule


def is_peft_dora_layer(module: nn.Module) -> bool:
    kind = type(module)
    return kind.__module__.startswith("peft.") and kind.__name__.startswith("Dora")


def refuse_dora(module: nn.Module) -> None:
    raise UnsupportedModuleError(
        f"PEFT DoRA ({type(module).__name__}, from LoraConfig(use_dora=True)) is not supported: its magnitude "
        "divides by the norm of the merged weight, which dpscale cannot yet differentiate per example. Train "
        "plain LoRA (use_dora=False; rsLoRA with use_rslora=True and lora_dropout are supported)."
    )


def _never(module, inputs, output_grad, names):  # validate refuses first
    refuse_dora(module)


DORA_UNSUPPORTED = Rule("peft_dora_unsupported", _never, refuse_dora)
