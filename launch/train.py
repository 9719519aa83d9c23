"""The main job under any launcher: the same code as ``dpscale train`` (``dpscale.train.job``),
so the command line does not change between one process, N processes and N nodes.

    python launch/train.py --config examples/sst2/lora_eps8.yaml --output-dir runs/sst2
    accelerate launch --config_file launch/accelerate_cpu_2proc.yaml launch/train.py --cpu --config ...
    accelerate launch --config_file launch/accelerate_gpu.yaml launch/train.py --config ...
    torchrun --nproc_per_node 2 launch/train.py --cpu --config ...                  # gloo on CPU
    deepspeed --num_gpus 2 launch/train.py --deepspeed ds_configs/zero3.json --config ...
    torchrun --nproc_per_node 2 launch/train.py --deepspeed ds_configs/zero2.json --cpu --config ...
    accelerate launch --config_file launch/accelerate_deepspeed.yaml launch/train.py --cpu --config ...

Every flag is ``dpscale train``'s (``dpscale train --help``). With DeepSpeed the step driver closes
each logical step with the DeepSpeedEngine's step; the DeepSpeed config file must say
"gradient_clipping": 0.0 (refused otherwise). Every rank reads the same noise key file (created once
in --output-dir when --noise-key is not given).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpscale.cli import main  # noqa: E402


def _without_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N; the rank comes from the environment."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--local_rank", "--local-rank"):
            skip = True
        elif not arg.startswith(("--local_rank=", "--local-rank=")):
            kept.append(arg)
    return kept


if __name__ == "__main__":
    sys.exit(main(["train", *_without_local_rank(sys.argv[1:])]))
