"""Per-example gradients of one use of one parameter, in the cheapest exact form.

A layer rule never materialises [B, *param_shape] unless that is cheaper than the alternative.
Two forms cover every rule:

* ``Dense``: the per-example gradients themselves, ``grad[i]`` for example i.
* ``Outer``: a sum of outer products over positions, ``g_i = sum_t left[i, t] (x) right[i, t]``
  reshaped to the parameter's shape. A linear layer is ``left = G, right = A``; an embedding is
  ``left = one-hot(ids), right = G`` with the ids kept as integers.

Everything the engine needs is an inner product between two uses of the same parameter (squared
norms are the inner product of a use with itself, cross terms of a tied parameter are the inner
product of two different uses) and a clip-weighted sum. For ``Outer`` forms inner products are
Gram-matrix contractions ("ghost norms"): no per-example gradient is ever formed.

Norms are accumulated in float32 or better whatever the activation dtype (bf16 autocast), since a
clip factor computed in bf16 can be off by ~1%, enough to break the sensitivity bound.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor


def accumulation_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (never a 16-bit type)."""
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


@dataclass
class Dense:
    """Materialised per-example gradients: ``grad`` has shape [B, *param_shape]."""

    grad: Tensor

    @property
    def batch_size(self) -> int:
        return self.grad.shape[0]

    def flat(self, dtype: torch.dtype) -> Tensor:
        return self.grad.reshape(self.grad.shape[0], -1).to(dtype)


@dataclass
class Outer:
    """``g_i = reshape(sum_t left[i, t] (x) right[i, t], shape)``.

    ``left`` is [B, T, m] floating point, or [B, T] integer indices standing for one-hot rows of
    width ``m`` (an embedding's ids: keeping them as indices saves B*T*V memory). ``right`` is
    [B, T, n] with ``m * n == prod(shape)``.
    """

    left: Tensor
    right: Tensor
    m: int
    shape: torch.Size

    def __post_init__(self) -> None:
        n = self.right.shape[-1]
        if self.m * n != math.prod(self.shape):
            raise ValueError(f"Outer form {self.m}x{n} does not match parameter shape {tuple(self.shape)}")

    @property
    def one_hot(self) -> bool:
        return not self.left.is_floating_point()

    @property
    def batch_size(self) -> int:
        return self.left.shape[0]

    @property
    def positions(self) -> int:
        return self.left.shape[1]

    def left_gram_with(self, other: Outer, dtype: torch.dtype, cache: GramCache | None = None) -> Tensor:
        """[B, T_self, T_other] inner products of left factors."""
        if other is self and not self.one_hot and cache is not None:
            return cache.gram(self.left, dtype)
        if self.one_hot and other.one_hot:
            return (self.left[:, :, None] == other.left[:, None, :]).to(dtype)
        if self.one_hot:
            return other.left_gram_with(self, dtype).transpose(1, 2)
        if other.one_hot:
            # <left_s, e_{id_t}> = left_s[id_t]
            ids = other.left[:, None, :].expand(-1, self.positions, -1)
            return self.left.to(dtype).gather(2, ids)
        return torch.bmm(self.left.to(dtype), other.left.to(dtype).transpose(1, 2))

    def right_gram_with(self, other: Outer, dtype: torch.dtype, cache: GramCache | None = None) -> Tensor:
        if other is self and cache is not None:
            return cache.gram(self.right, dtype)
        return torch.bmm(self.right.to(dtype), other.right.to(dtype).transpose(1, 2))

    def materialize(self) -> Dense:
        """[B, *shape] per-example gradients."""
        batch, positions, n = self.right.shape
        dtype = accumulation_dtype(self.right)
        right = self.right.to(dtype)
        if self.one_hot:
            out = right.new_zeros(batch, self.m, n)
            out.scatter_add_(1, self.left[:, :, None].expand(-1, -1, n), right)
        else:
            out = torch.bmm(self.left.to(dtype).transpose(1, 2), right)
        return Dense(out.reshape(batch, *self.shape))

    def cheapest(self) -> Dense | Outer:
        """This use in the cheaper exact form for its shapes (see ``prefers_materialized``)."""
        return self.materialize() if self.prefers_materialized() else self

    def prefers_materialized(self) -> bool:
        """Materialise when per-example gradients take no more memory than the factors they
        replace (m*n <= T*(m + n)); past that point (2T^2 > mn for a square layer) they are also
        cheaper in time than the two T x T Gram matrices, and they make the clipped sum a cheap
        weighted reduction instead of a second weight-gradient matmul."""
        left_width = 1 if self.one_hot else self.m
        n = self.right.shape[-1]
        return self.m * n <= self.positions * (left_width + n)


PerExampleGrad = Dense | Outer


class _ByStorage:
    """Results cached by the tensor they were computed from, valid while that tensor's storage
    lives: the key is where its elements are (pointer, shape, strides, dtype, version), and an
    entry holds only a weak reference to the storage, never a tensor. A cache that outlives some
    of the forms it served (clipping groups finished during the backward,
    ``dpscale.group_clipping``) neither keeps their activations alive nor mistakes a later tensor
    allocated at a freed address for the one it saw. The storage, not the tensor: under activation
    checkpointing each eager call's saved input comes back as a tensor of its own over one shared
    storage (the query, key and value projections' input), and the entry must outlive the first."""

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[weakref.ref, object]] = {}

    @staticmethod
    def key(x: Tensor, *extra) -> tuple:
        return (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x._version, *extra)

    def get(self, key: tuple):
        entry = self._entries.get(key)
        if entry is None or entry[0]() is None:
            return None
        return entry[1]

    def put(self, key: tuple, x: Tensor, value) -> None:
        # torch keeps one Python object per storage while any tensor uses it: alive exactly as long
        self._entries[key] = (weakref.ref(x.untyped_storage()), value)

    def prune(self, keep=None) -> None:
        """Drop the entries whose tensor is gone and, given ``keep`` (tensors), every entry not of
        one of them: when no later work can read an entry, it goes now rather than when its
        tensor happens to die."""
        wanted = None if keep is None else {self.key(t) for t in keep}
        self._entries = {key: entry for key, entry in self._entries.items()
                         if entry[0]() is not None and (wanted is None or key[:5] in wanted)}


class GramCache(_ByStorage):
    """Self-Gram matrices X X^T [B, T, T] of factors, shared within one backward pass: the
    query, key and value projections read the same activation, as do an MLP's gate and up
    projections, so their activation Gram matrix is computed once, also when their clipping groups
    are finished one after another."""

    def gram(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        key = self.key(x, dtype)
        gram = self.get(key)
        if gram is None:
            y = x.to(dtype)
            gram = torch.bmm(y, y.transpose(1, 2))
            self.put(key, x, gram)
        return gram


def param_shape(param: Tensor) -> torch.Size:
    """A parameter's logical shape. A training engine may partition its storage: under DeepSpeed
    ZeRO-3 ``p.data`` is an empty placeholder and the full shape is ``p.ds_shape``."""
    return getattr(param, "ds_shape", None) or param.shape


def inner(a: PerExampleGrad, b: PerExampleGrad, cache: GramCache | None = None) -> Tensor:
    """[B] per-example inner products <a_i, b_i> of two uses of one parameter."""
    if isinstance(a, Dense) and isinstance(b, Dense):
        dtype = accumulation_dtype(a.grad, b.grad)
        return (a.flat(dtype) * b.flat(dtype)).sum(1)
    if isinstance(a, Outer) and isinstance(b, Outer):
        dtype = accumulation_dtype(a.right, b.right, *(t for t in (a.left, b.left) if t.is_floating_point()))
        return (a.left_gram_with(b, dtype, cache) * a.right_gram_with(b, dtype, cache)).sum((1, 2))
    dense, outer = (a, b) if isinstance(a, Dense) else (b, a)
    return _dense_outer_inner(dense, outer)


def _dense_outer_inner(dense: Dense, outer: Outer) -> Tensor:
    dtype = accumulation_dtype(dense.grad, outer.right)
    batch, _, n = outer.right.shape
    matrix = dense.grad.reshape(batch, outer.m, n).to(dtype)
    if outer.one_hot:
        rows = matrix.gather(1, outer.left[:, :, None].expand(-1, -1, n))  # [B, T, n]
    else:
        rows = torch.bmm(outer.left.to(dtype), matrix)  # sum_m left[t, m] D[m, :]
    return (rows * outer.right.to(dtype)).sum((1, 2))


def squared_norm(grad: PerExampleGrad, cache: GramCache | None = None) -> Tensor:
    """[B] squared per-example norms."""
    if isinstance(grad, Dense):
        flat = grad.flat(accumulation_dtype(grad.grad))
        return (flat * flat).sum(1)
    return inner(grad, grad, cache)


def weighted_sum(grad: PerExampleGrad, weights: Tensor, dtype: torch.dtype) -> Tensor:
    """sum_i weights[i] * g_i, in the parameter's shape and ``dtype``."""
    if isinstance(grad, Dense):
        flat = grad.flat(weights.dtype)
        return (weights @ flat).reshape(grad.grad.shape[1:]).to(dtype)
    batch, positions, n = grad.right.shape
    right = grad.right.to(weights.dtype) * weights[:, None, None]
    if grad.one_hot:
        out = right.new_zeros(grad.m, n)
        out.index_add_(0, grad.left.reshape(-1), right.reshape(-1, n))
    else:
        left = grad.left.to(weights.dtype).reshape(batch * positions, grad.m)
        out = left.transpose(0, 1) @ right.reshape(batch * positions, n)
    return out.reshape(grad.shape).to(dtype)


def zero_units(grad: PerExampleGrad, drop: Tensor) -> PerExampleGrad:
    """``grad`` with the examples marked in ``drop`` ([B] bool) exactly zero, non-finite entries
    included (``torch.where``, not a multiplication: 0 * NaN is NaN)."""
    if isinstance(grad, Dense):
        mask = drop.to(grad.grad.device).reshape(-1, *([1] * (grad.grad.dim() - 1)))
        return Dense(torch.where(mask, torch.zeros_like(grad.grad), grad.grad))
    mask = drop.to(grad.right.device)[:, None, None]
    right = torch.where(mask, torch.zeros_like(grad.right), grad.right)
    left = grad.left
    if not grad.one_hot:
        left = torch.where(mask, torch.zeros_like(left), left)
    return Outer(left=left, right=right, m=grad.m, shape=grad.shape)


def total_squared_norm(uses: list[PerExampleGrad], cache: GramCache | None = None) -> Tensor:
    """[B] squared norm of a parameter's per-example gradient summed over all its uses,
    cross terms included (a tied embedding and output head is one parameter)."""
    dense = [u for u in uses if isinstance(u, Dense)]
    merged: list[PerExampleGrad] = [u for u in uses if isinstance(u, Outer)]
    if dense:
        merged.insert(0, Dense(torch.stack([d.grad for d in dense]).sum(0)) if len(dense) > 1 else dense[0])
    total = squared_norm(merged[0], cache)
    for i, a in enumerate(merged):
        if i:
            total = total + squared_norm(a, cache)
        for b in merged[i + 1 :]:
            total = total + 2 * inner(a, b)
    return total


class UnitLayout:
    """Which privacy unit (user) each example of one backward pass belongs to, and the per-unit
    forms built from it.

    At user level the gradient clipped is a user's sum ``G_u = sum_{i in u} g_i``, whose squared
    norm ``sum_{i, j in u} <g_i, g_j>`` needs the inner products between examples of one user.
    Rather than a second kind of inner product, each per-example form is turned into a per-unit
    form of the same kind, and everything downstream (norms with the cross terms of tied
    parameters, groups, clip factors, clipped sums) runs on units unchanged:

    * ``Dense``: ``G_u`` is a sum over the batch dimension (``index_add``).
    * ``Outer``: ``g_i = sum_t left[i, t] (x) right[i, t]``, so ``G_u`` is the same outer-product
      sum over the positions of all of u's examples laid end to end: ``[U, k * T, .]`` factors,
      zero-padded where a user has fewer than ``k`` examples (a zero right row adds nothing; a
      one-hot left row is padded with id 0 against a zero right row). Its Gram contraction is
      exactly ``sum_{i, j in u} (a_i^T a_j)(b_i^T b_j)`` summed over positions.

    Factors shared by several forms (the activation read by the query, key and value projections)
    are regrouped once, so the Gram cache still finds them shared.
    """

    def __init__(self, unit: Tensor, slot: Tensor, units: int, width: int) -> None:
        self.unit = unit  # [B] unit index of each example, 0 .. units - 1
        self.slot = slot  # [B] position of the example among its unit's examples
        self.units = units
        self.width = width  # the most examples any unit has
        self._regrouped = _ByStorage()  # source factor -> its regrouped copy, while the source lives

    @classmethod
    def from_ids(cls, ids: list[int], device: torch.device | None = None) -> UnitLayout:
        """Units in order of first appearance; examples of a unit need not be adjacent."""
        index: dict[int, int] = {}
        counts: list[int] = []
        unit, slot = [], []
        for user in ids:
            u = index.setdefault(user, len(index))
            if u == len(counts):
                counts.append(0)
            unit.append(u)
            slot.append(counts[u])
            counts[u] += 1
        unit_t = torch.tensor(unit, dtype=torch.long, device=device)
        slot_t = torch.tensor(slot, dtype=torch.long, device=device)
        return cls(unit_t, slot_t, len(counts), max(counts, default=1))

    @property
    def trivial(self) -> bool:
        """Every example its own unit, in order: the per-example forms already are per-unit."""
        return self.width == 1

    def per_unit(self, grad: PerExampleGrad) -> PerExampleGrad:
        """The form of ``G_u = sum_{i in u} g_i`` for every unit u."""
        if isinstance(grad, Dense):
            dtype = accumulation_dtype(grad.grad)
            out = grad.grad.new_zeros((self.units, *grad.grad.shape[1:]), dtype=dtype)
            out.index_add_(0, self.unit.to(grad.grad.device), grad.grad.to(dtype))
            return Dense(out)
        grouped = Outer(left=self._regroup(grad.left), right=self._regroup(grad.right), m=grad.m, shape=grad.shape)
        return grouped.cheapest()

    def prune(self, keep=None) -> None:
        """Forget the regrouped copies of factors that are gone (and given ``keep``, of every
        factor but those)."""
        self._regrouped.prune(keep)

    def regrouped(self, x: Tensor) -> Tensor | None:
        """The regrouped copy of factor ``x`` made so far, if any."""
        return self._regrouped.get(self._regrouped.key(x))

    def _regroup(self, x: Tensor) -> Tensor:
        """[B, T, ...] -> [U, width * T, ...]: each unit's examples' positions end to end."""
        key = self._regrouped.key(x)
        done = self._regrouped.get(key)
        if done is None:
            positions = x.shape[1]
            out = x.new_zeros((self.units, self.width, positions, *x.shape[2:]))
            out[self.unit.to(x.device), self.slot.to(x.device)] = x
            done = out.reshape(self.units, self.width * positions, *x.shape[2:])
            self._regrouped.put(key, x, done)
        return done
