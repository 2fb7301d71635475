"""Half-precision CPU matmuls run their rows padded to a bucket: few shapes, little waste,
and the real rows' results unchanged."""

import pytest
import torch
import torch.nn.functional as F

from bench.soak import memory_in_use_mb
from tandem.kernels import row_buckets
from tandem.kernels.row_buckets import bucket_rows


def test_row_buckets_are_few_and_waste_under_an_eighth():
    assert len({bucket_rows(n) for n in range(1, 8193)}) <= 16 + 8 * 9
    assert all(n <= bucket_rows(n) < n * 9 / 8 for n in range(17, 8193))
    assert [bucket_rows(n) for n in (1, 16, 17, 18, 19, 33, 100)] == [1, 16, 18, 18, 20, 36, 104]


def test_padded_rows_leave_the_real_rows_unchanged():
    torch.manual_seed(0)
    x, w, b = (torch.randn(*shape, dtype=torch.bfloat16) for shape in ((37, 24), (40, 24), (40,)))
    y = row_buckets.linear(x, w, b)
    assert y.shape == (37, 40) and y.is_contiguous()
    torch.testing.assert_close(y, F.linear(x, w, b), atol=0.0625, rtol=0.01)


def test_float32_and_exact_counts_are_not_padded():
    assert not row_buckets.needs_buckets(torch.zeros(3, 2))
    assert row_buckets.needs_buckets(torch.zeros(3, 2, dtype=torch.bfloat16))


def test_the_bucket_below_a_count_is_a_bucket_within_an_eighth_of_it():
    below = [row_buckets.bucket_below(n) for n in range(1, 8193)]
    assert all(bucket_rows(b) == b and b <= n and n - b < max(1, n / 8) for n, b in zip(range(1, 8193), below))
    assert [row_buckets.bucket_below(n) for n in (16, 17, 19, 257, 300, 497)] == [16, 16, 18, 256, 288, 480]


@pytest.mark.parametrize("rows", [16, 150, 300, 497])
def test_split_products_match_the_plain_ones(rows):
    """mm, addmm and mm_over_rows: the products a training backward and the trained adapter
    take, split at a bucket, equal torch's to bfloat16 rounding (exactly where no split)."""
    gen = torch.Generator().manual_seed(rows)
    a, b, y = (torch.randn(*shape, generator=gen).to(torch.bfloat16) for shape in ((rows, 24), (24, 72), (rows, 72)))
    c = torch.randn(rows, 40, generator=gen).to(torch.bfloat16)
    pairs = [
        (row_buckets.mm(a, b), torch.mm(a, b)),
        (row_buckets.addmm(y, a, b), torch.addmm(y, a, b)),
        (row_buckets.mm_over_rows(a, c), torch.mm(a.t(), c)),
    ]
    for got, want in pairs:
        assert got.shape == want.shape and got.dtype == want.dtype
        if bucket_rows(rows) == rows:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got.float(), want.float(), atol=0.0625, rtol=0.02)


def test_every_row_count_through_the_training_products_costs_no_memory_once_each_bucket_has_been_met():
    # A co-served backward meets every row count up to a micro-batch's tokens (dy W past the
    # packed weights' limit, the trained adapter's products from 128 rows): before the split,
    # each new count compiled new oneDNN kernels (dy W for SmolLM2's gate/up: +1.75 MB and
    # ~21 ms each on a 2-core Xeon with AMX). Widths no other test uses, so that no shape has
    # been compiled before.
    gen = torch.Generator().manual_seed(0)
    w, a = (torch.randn(*shape, generator=gen).to(torch.bfloat16) for shape in ((104, 44), (44, 12)))

    def products(rows: int) -> None:
        dy = torch.randn(rows, 104, generator=gen).to(torch.bfloat16)
        x = torch.randn(rows, 44, generator=gen).to(torch.bfloat16)
        row_buckets.mm(dy, w)
        v = row_buckets.mm(x, a)
        row_buckets.addmm(dy[:, :12], v, a.t()[:, :12].contiguous())
        row_buckets.mm_over_rows(v, x)

    counts = range(129, 600)
    for rows in sorted({bucket_rows(n) for n in counts} | {bucket_rows(n - row_buckets.bucket_below(n)) for n in counts}):
        products(rows)
    before = memory_in_use_mb()
    for rows in counts:
        products(rows)
    assert memory_in_use_mb() - before < 32
