"""ClippedSum (dpscale/clipped_sum.py): a parameter's clip-weighted sum written by the matmul that
forms it into a backend's buffer, whole or by blocks of rows, overwriting or adding, checked
against a plain float64 loop over single examples."""

from __future__ import annotations

import pytest
import torch

from dpscale.clipped_sum import ClippedSum
from dpscale.per_example import Dense, Outer

B, T = 5, 3


def per_example(use) -> torch.Tensor:
    """[B, *shape] per-example gradients in float64, one example at a time."""
    if isinstance(use, Dense):
        return use.grad.double()
    out = []
    for i in range(use.right.shape[0]):
        g = torch.zeros(use.m, use.right.shape[-1], dtype=torch.float64)
        for t in range(use.right.shape[1]):
            left = torch.zeros(use.m, dtype=torch.float64)
            if use.one_hot:
                left[use.left[i, t]] = 1.0
            else:
                left = use.left[i, t].double()
            g += torch.outer(left, use.right[i, t].double())
        out.append(g.reshape(use.shape))
    return torch.stack(out)


def reference(uses, weights) -> torch.Tensor:
    total = sum(sum(float(w) * g for w, g in zip(weights, per_example(use))) for use in uses)
    return total


def forms(kind: str, g: torch.Generator):
    if kind == "dense":
        return [Dense(torch.randn(B, 6, 4, generator=g))]
    if kind == "outer":  # a linear weight [6, 4]
        return [Outer(torch.randn(B, T, 6, generator=g), torch.randn(B, T, 4, generator=g), 6, torch.Size([6, 4]))]
    if kind == "one_hot":  # an embedding [6, 4]
        return [Outer(torch.randint(0, 6, (B, T), generator=g), torch.randn(B, T, 4, generator=g), 6,
                      torch.Size([6, 4]))]
    if kind == "tied":  # an embedding used again as a head: one-hot and dense factors, one parameter
        return forms("one_hot", g) + forms("outer", g)
    if kind == "unaligned":  # rows of the [6, 4] parameter are half rows of the [3, 8] factors' sum
        return [Outer(torch.randn(B, T, 3, generator=g), torch.randn(B, T, 8, generator=g), 3, torch.Size([6, 4]))]
    raise AssertionError(kind)


KINDS = ["dense", "outer", "one_hot", "tied", "unaligned"]


@pytest.mark.parametrize("kind", KINDS)
def test_tensor_and_scaled_match_the_loop(kind):
    g = torch.Generator().manual_seed(1)
    uses, weights = forms(kind, g), torch.rand(B, generator=g)
    want = reference(uses, weights)
    got = ClippedSum(uses, weights, torch.float32)
    assert got.shape == (6, 4) and got.dtype == torch.float32
    torch.testing.assert_close(got.tensor().double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.scaled(4.0).tensor().double(), 4 * want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("blocks", [[(0, 6)], [(0, 3), (3, 6)], [(0, 2), (2, 4), (4, 5), (5, 6)]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_written_and_added_in_place(kind, blocks, dtype):
    """Each block of rows lands in its own contiguous buffer (as FSDP2's per-rank layout is), first
    overwriting whatever was there, then adding a second backward's sum."""
    g = torch.Generator().manual_seed(2)
    first, second = forms(kind, g), forms(kind, g)
    w1, w2 = torch.rand(B, generator=g), torch.rand(B, generator=g)
    want = reference(first, w1) + reference(second, w2)
    buffers = [torch.full((hi - lo, 4), 1e6, dtype=dtype) for lo, hi in blocks]  # garbage, overwritten
    storage = [b.data_ptr() for b in buffers]
    for sums, add in ((ClippedSum(first, w1, dtype), False), (ClippedSum(second, w2, dtype), True)):
        for (lo, hi), buffer in zip(blocks, buffers):
            sums.write_(buffer, add=add, rows=(lo, hi))
    assert [b.data_ptr() for b in buffers] == storage  # written in place
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(torch.cat(buffers).double(), want, rtol=tol, atol=tol)


def test_a_flat_bucket_view_is_written_without_a_temporary_of_its_size():
    """DDP's buckets: the parameter's view of a flat buffer is the matmul's own output."""
    g = torch.Generator().manual_seed(3)
    uses, weights = forms("outer", g), torch.rand(B, generator=g)
    bucket = torch.zeros(30)
    view = bucket[3:27].view(6, 4)
    ClippedSum(uses, weights, torch.float32).write_(view, add=False)
    torch.testing.assert_close(view.double(), reference(uses, weights), rtol=1e-5, atol=1e-5)
    assert bucket[:3].eq(0).all() and bucket[27:].eq(0).all()


def test_a_buffer_of_the_wrong_size_is_refused():
    g = torch.Generator().manual_seed(4)
    sums = ClippedSum(forms("outer", g), torch.rand(B, generator=g), torch.float32)
    with pytest.raises(ValueError):
        sums.write_(torch.zeros(5, 4), add=False)
    with pytest.raises(ValueError):
        sums.write_(torch.zeros(4, 6).t(), add=False, rows=(0, 4))  # not contiguous
