"""What one DP backward holds in per-example forms until its clipped sums are formed, per decoder
layer and LM head: the floor of flat clipping under gradient checkpointing (BENCHMARKS.md,
"Trainable subsets and gradient checkpointing").

Under flat clipping the one clip factor needs every layer's norm, so every layer's per-example
forms (for a ghost-norm layer its input and its output gradient, for a small layer its per-example
gradients) stay until the backward ends, also those checkpointing would have dropped. Under
per-layer clipping each layer's forms go with its clipped sum as soon as its output gradient has
arrived (``dpscale.group_clipping``).

Measured, not computed from shapes: a local backend records, for every clipped sum it receives,
the storages its forms live in, with their real sizes in bytes. Under flat clipping every sum
arrives after the backward with all forms alive at the first, so each storage is counted once
(under the first parameter whose forms use it: the activation the query, key and value
projections share is one storage) and their total is what the backward held. Under per-layer
clipping the forms of one layer are gone before the next arrive (their addresses are reused), so
only the largest single hand-over is reported.

    python benchmarks/held_forms.py --clipping flat
    python benchmarks/held_forms.py --clipping per_layer --json runs/held_per_layer.json

Same model, batch and checkpointing as ``bench_step.py --model llama --trainable all``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import build_model, make_batches, model_losses  # noqa: E402

from dpscale import DPConfig, PrivacyEngine  # noqa: E402
from dpscale.backends import LocalBackend  # noqa: E402
from dpscale.per_example import Dense  # noqa: E402


def module_of(name: str) -> str:
    """The row of the table a parameter belongs to: a decoder layer, the LM head, the embedding,
    the final norm."""
    layer = re.match(r"model\.layers\.(\d+)\.", name)
    if layer:
        return f"decoder layer {layer.group(1)}"
    names = {"lm_head.weight": "LM head", "model.embed_tokens.weight": "embedding", "model.norm.weight": "final norm"}
    return names.get(name, name)


class FormsRecorder(LocalBackend):
    """A local backend noting the storages of each clipped sum's per-example forms."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[int, tuple[str, str, int]] = {}  # storage pointer -> (parameter, kind, bytes)
        self.per_hand_over: list[int] = []  # bytes of the forms of each sum, as it arrives

    def accumulate(self, name, clipped) -> None:
        if clipped is not None:
            total = 0
            for use in clipped._uses:  # the forms this sum is made of (a diagnostic look inside)
                if isinstance(use, Dense):
                    parts = [("per-example gradients", use.grad)]
                elif use.one_hot:
                    parts = [("token ids", use.left), ("output gradient", use.right)]
                else:
                    parts = [("output gradient", use.left), ("input", use.right)]
                for kind, tensor in parts:
                    storage = tensor.untyped_storage()
                    total += storage.nbytes()
                    self.seen.setdefault(storage.data_ptr(), (name, kind, storage.nbytes()))
            self.per_hand_over.append(total)
        super().accumulate(name, clipped)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clipping", choices=("flat", "per_layer"), default="flat")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    bench = argparse.Namespace(model="llama", trainable="all", checkpointing=True, device="cpu", seed=0,
                               batch=args.batch, seq=args.seq)
    model = build_model(bench)
    backend = FormsRecorder()
    engine = PrivacyEngine(model, DPConfig(max_grad_norm=1.0, noise_multiplier=0.0, clipping=args.clipping,
                                           expected_batch_size=args.batch), backend=backend,
                           optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    engine.backward(model_losses(model, make_batches(bench, 1)[0]))
    mib = 2.0 ** 20
    print(f"clipping {args.clipping}, B {args.batch}, T {args.seq}, checkpointing, fp32")
    print(f"largest single hand-over: {max(backend.per_hand_over) / mib:.1f} MiB of forms "
          f"({len(backend.per_hand_over)} sums)")
    engine.detach()
    if args.clipping != "flat":
        return 0
    table: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for name, kind, nbytes in backend.seen.values():
        table[module_of(name)][kind] += nbytes
    kinds = ["input", "output gradient", "per-example gradients", "token ids"]
    rows = ["| held until the clipped sums | " + " | ".join(f"{k} MiB" for k in kinds) + " | total MiB |",
            "|---|" + "---:|" * (len(kinds) + 1)]
    order = sorted(table, key=lambda m: (not m.startswith("decoder"), m))
    for module in order:
        cells = [table[module].get(k, 0) / mib for k in kinds]
        rows.append(f"| {module} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {sum(cells):.1f} |")
    total = sum(sum(v.values()) for v in table.values())
    rows.append("| all | " + " | ".join(f"{sum(t.get(k, 0) for t in table.values()) / mib:.1f}" for k in kinds)
                + f" | {total / mib:.1f} |")
    print("\n".join(rows))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "bytes": {m: dict(v) for m, v in table.items()},
                       "per_hand_over_bytes": backend.per_hand_over}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
