"""The base model saved beside a LoRA adapter, for bases no standard class can open.

A LoRA adapter names its base in ``adapter_config.json`` and PEFT's ``AutoPeftModelFor...`` loads
that base with ``from_pretrained(name)``. A GGUF base (the packaged SmolLM2-135M is one) cannot be
opened that way: ``from_pretrained`` needs the ``gguf_file=`` argument, and the file lives inside a
virtualenv that does not travel with the adapter. So the de-quantized float weights the adapter was
trained on are saved as safetensors in ``<adapter folder>/base`` and the adapter names that folder:
the adapter then loads with PEFT's auto classes alone, in a fresh process, and gives exactly the
outputs of the trained model (the same float32 weights, not a re-quantization).

PEFT and transformers resolve a relative base path against the working directory, not the adapter
folder, so the name written is the absolute path of ``base``; a folder moved elsewhere loads with
``PeftModel.from_pretrained(AutoModelFor...from_pretrained(<folder>/base), <folder>)``, which the
model card spells out.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

__all__ = ["BASE_FOLDER", "base_state_dict", "save_base_beside"]

BASE_FOLDER = "base"

_LORA_MARKERS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.", ".lora_magnitude_vector.",
                 ".modules_to_save.")


def base_state_dict(peft_model: nn.Module) -> dict:
    """The base model's own state dict under its own names: PEFT's injected LoRA weights and the
    trained copies of ``modules_to_save`` left out, ``base_layer`` and ``original_module`` (the
    untouched originals) renamed back to the names the base class expects."""
    inner = peft_model.get_base_model()
    state = {}
    for name, tensor in inner.state_dict().items():
        if any(marker in name for marker in _LORA_MARKERS):
            continue
        state[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = tensor
    return state


def save_base_beside(peft_model: nn.Module, tokenizer, folder: str | Path) -> Path:
    """Save the base of ``peft_model`` (weights, config, generation config, tokenizer) into
    ``folder/base`` as a plain transformers folder; returns its absolute path."""
    target = (Path(folder) / BASE_FOLDER).resolve()
    inner = peft_model.get_base_model()
    state = base_state_dict(peft_model)
    inner.save_pretrained(target, state_dict=state)
    tokenizer.save_pretrained(target)
    return target
