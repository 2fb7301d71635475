"""Half-precision CPU matmuls run their rows padded to a bucket: few shapes, little waste,
and the real rows' results unchanged."""

import torch
import torch.nn.functional as F

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
