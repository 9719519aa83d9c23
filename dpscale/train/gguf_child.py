"""``python -m dpscale.train.gguf_child FILE DTYPE``: de-quantize one GGUF file and publish its
float copy (``dpscale.train.gguf_cache``), then exit.

``load_model`` runs this in a child process the first time a GGUF file is used: de-quantizing
holds the file's arrays, the float model and the loader's temporaries at once, and that transient
(and the allocator's state after it) belongs in a process that ends, not in the training process
whose peak memory it would otherwise set.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from dpscale.train import gguf_cache
from dpscale.train.models import dequantized


def main(argv: list[str]) -> int:
    path, dtype_name = Path(argv[0]), argv[1]
    dtype = getattr(torch, dtype_name)
    model, tokenizer = dequantized(path, dtype)

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return 0 if gguf_cache.publish(path, dtype, gguf_cache.cache_root(), write) is not None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
