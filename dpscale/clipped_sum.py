"""One backward's clipped sum of one parameter (divided by B), handed to the backend before it is
computed, so that the backend decides where it is written.

Why lazy: a backend keeps the sums in buffers of its own layout (DDP's flat buckets, FSDP2's
per-rank rows, DeepSpeed's buffers scaled for its averaging). Computed first and handed over as a
tensor, every sum was written twice: once by the matmul that forms it, once by the copy into the
bucket (for the benchmark Llama under FSDP2, 0.06 s a step). Here the matmul writes the bucket
itself (``torch.mm(..., out=)``, ``addmm_`` when adding to an earlier backward's sum), one block of
rows at a time where the backend splits dim 0 (FSDP2 gives each rank a block of rows).

The layering holds both ways: the engine builds this object from per-example forms and the clip
weights and knows nothing of the buckets; a backend calls ``tensor()``, ``write_`` or ``scaled``
and knows nothing of the forms (no layer rule, no ``Dense`` or ``Outer``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dpscale.per_example import Dense, PerExampleGrad, weighted_sum

__all__ = ["ClippedSum"]


class ClippedSum:
    """sum_i weights[i] * g_i over the uses of one parameter, in ``shape`` (its logical shape)
    and ``dtype``. A backend consumes it inside ``accumulate`` (it holds the backward's per-example
    forms: keeping it would keep them alive)."""

    def __init__(self, uses: list[PerExampleGrad], weights: Tensor, dtype: torch.dtype) -> None:
        if not uses:
            raise ValueError("a clipped sum needs at least one use")
        self._uses = uses
        self._weights = weights
        self.dtype = dtype
        first = uses[0]
        self.shape = torch.Size(first.grad.shape[1:] if isinstance(first, Dense) else first.shape)
        self.numel = math.prod(self.shape)
        self._prepared: list[tuple[Tensor, ...]] | None = None

    def scaled(self, factor: float) -> ClippedSum:
        """The same sum times ``factor``, folded into the weights (no pass over the sum)."""
        return ClippedSum(self._uses, self._weights * factor, self.dtype)

    def tensor(self) -> Tensor:
        """The sum as a new tensor of ``shape`` and ``dtype``."""
        total = None
        for use in self._uses:
            term = weighted_sum(use, self._weights, self.dtype)
            total = term if total is None else total.add_(term)
        return total

    def write_(self, out: Tensor, *, add: bool, rows: tuple[int, int] | None = None) -> None:
        """Write (``add=False``: whatever ``out`` held is overwritten) or add rows ``[lo, hi)`` of
        dim 0 of the sum (all of it by default) into ``out``, a contiguous tensor of
        ``(hi - lo) * prod(shape[1:])`` elements in any shape, with no tensor of the sum's size
        in between where the forms allow it."""
        lo, hi = rows if rows is not None else (0, self.shape[0] if self.shape else 1)
        row = self.numel // self.shape[0] if self.shape and self.shape[0] else 1
        if out.numel() != (hi - lo) * row or not out.is_contiguous():
            raise ValueError(f"out has {out.numel()} elements for rows [{lo}, {hi}) of {tuple(self.shape)}")
        if out.dtype != self._weights.dtype:  # a cast is a pass anyway: compute, then cast in
            # rounded to out's dtype before it is added, as a sum handed over as a tensor of the
            # parameter's dtype always was (bf16 runs on any topology round alike)
            part = self._rows_tensor(lo, hi, row).to(out.dtype)
            out.add_(part.view(out.shape)) if add else out.copy_(part.view(out.shape))
            return
        for use, factors in zip(self._uses, self._factors()):
            _write_use(use, factors, self._weights, out, add, lo * row, hi * row)
            add = True

    def _factors(self) -> list[tuple[Tensor, ...]]:
        """Each use's operands in the weights' dtype, the weights applied once (not once per block
        of rows): Dense: the [B, numel] gradients; Outer: left [B*T, m] (or ids) and the weighted
        right factor [B*T, n]."""
        if self._prepared is None:
            weights, prepared = self._weights, []
            for use in self._uses:
                if isinstance(use, Dense):
                    prepared.append((use.flat(weights.dtype),))
                    continue
                batch, positions, n = use.right.shape
                right = (use.right.to(weights.dtype) * weights[:, None, None]).reshape(batch * positions, n)
                left = use.left.reshape(-1) if use.one_hot else use.left.to(weights.dtype).reshape(
                    batch * positions, use.m)
                prepared.append((left, right))
            self._prepared = prepared
        return self._prepared

    def _rows_tensor(self, lo: int, hi: int, row: int) -> Tensor:
        out = torch.empty((hi - lo) * row, dtype=self._weights.dtype, device=self._weights.device)
        for i, (use, factors) in enumerate(zip(self._uses, self._factors())):
            _write_use(use, factors, self._weights, out, i > 0, lo * row, hi * row)
        return out


def _write_use(use: PerExampleGrad, factors: tuple[Tensor, ...], weights: Tensor, out: Tensor, add: bool,
               start: int, stop: int) -> None:
    """Flat elements [start, stop) of one use's weighted sum into ``out`` (in weights' dtype)."""
    if isinstance(use, Dense):
        flat = factors[0][:, start:stop]
        target = out.view(1, -1)
        if add:
            target.addmm_(weights[None, :], flat)
        else:
            torch.mm(weights[None, :], flat, out=target)
        return
    n = use.right.shape[-1]
    if start % n or stop % n:  # rows of the parameter that do not fall on rows of the factors
        part = weighted_sum(use, weights, weights.dtype).reshape(-1)[start:stop]
        out.view(-1).add_(part) if add else out.view(-1).copy_(part)
        return
    a, b = start // n, stop // n  # rows [a, b) of the [m, n] sum
    left, right = factors
    target = out.view(b - a, n)
    if use.one_hot:
        ids = left
        if (a, b) != (0, use.m):
            keep = (ids >= a) & (ids < b)
            ids, right = ids[keep] - a, right[keep]
        if not add:
            target.zero_()
        target.index_add_(0, ids, right)
        return
    if add:
        target.addmm_(left[:, a:b].transpose(0, 1), right)
    else:
        torch.mm(left[:, a:b].transpose(0, 1), right, out=target)
