"""Weights reordered once for oneDNN give F.linear's results, only where no graph is being
recorded, and F.linear serves wherever the reordered path is missing."""

import pytest
import torch
import torch.nn.functional as F

from tandem.kernels import packed_linear, row_buckets
from tandem.kernels.packed_linear import Prepacked

# The dtypes this CPU reorders weights for (none: the tests of the packed path skip).
PACKED_DTYPES = [d for d in (torch.bfloat16, torch.float32) if packed_linear.supported(torch.zeros(1, 1, dtype=d))]
packed_dtypes = pytest.mark.parametrize(
    "dtype", PACKED_DTYPES or [pytest.param(None, marks=pytest.mark.skip(reason="this CPU reorders no dtype for oneDNN"))]
)
# bfloat16: both accumulate in float32 and round once, at most one bf16 step apart.
TOLERANCE = {torch.bfloat16: {"atol": 1 / 64, "rtol": 1 / 128}, torch.float32: {"atol": 1e-5, "rtol": 1e-5}}


def weights(dtype: torch.dtype = torch.bfloat16, bias: bool = True):
    torch.manual_seed(0)
    w = (torch.randn(96, 40) * 0.1).to(dtype)
    return w, (torch.randn(96) * 0.1).to(dtype) if bias else None


@packed_dtypes
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 33, 100])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_rows_match_f_linear(rows, bias, dtype):
    w, b = weights(dtype, bias=bias)
    x = torch.randn(rows, 40).to(dtype)
    packed = Prepacked()
    with torch.inference_mode():
        y = packed.linear(x, w, b)
    assert packed._packed is not None
    assert y.shape == (rows, 96) and y.dtype == dtype and y.is_contiguous()
    torch.testing.assert_close(y, F.linear(x, w, b), **TOLERANCE[dtype])


@packed_dtypes
@pytest.mark.parametrize("rows", [7, 40])
def test_a_graph_being_recorded_gets_f_linears_gradient_through_onednn(rows, dtype):
    w, b = weights(dtype)
    x = torch.randn(rows, 40).to(dtype).requires_grad_()
    packed = Prepacked()
    y = packed.linear(x, w, b)
    assert y.grad_fn is not None and packed._packed is not None
    dy = torch.randn(rows, 96).to(dtype)
    y.backward(dy)
    assert packed._transposed is not None
    ref = x.detach().clone().requires_grad_()
    want = F.linear(ref, w, b)
    want.backward(dy)
    torch.testing.assert_close(y, want, **TOLERANCE[dtype])
    torch.testing.assert_close(x.grad, ref.grad, **TOLERANCE[dtype])


@packed_dtypes
@pytest.mark.parametrize("rows", [7, 40])
def test_prepared_copies_give_f_linears_product_and_transposed_product(rows, dtype):
    """prepare makes both copies before any call; transposed_linear is dy @ weight."""
    w, _ = weights(dtype, bias=False)
    packed = Prepacked()
    packed.prepare(w, transposed=True)
    assert packed._packed is not None and packed._transposed is not None
    x, dy = torch.randn(rows, 40).to(dtype), torch.randn(rows, 96).to(dtype)
    with torch.inference_mode():
        torch.testing.assert_close(packed.linear(x, w), F.linear(x, w), **TOLERANCE[dtype])
        torch.testing.assert_close(packed.transposed_linear(dy, w), dy @ w, **TOLERANCE[dtype])


def test_without_onednn_the_transposed_product_is_a_plain_matmul(monkeypatch):
    w, _ = weights(bias=False)
    dy = torch.randn(5, 96).to(torch.bfloat16)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    packed = Prepacked()
    assert torch.equal(packed.transposed_linear(dy, w), dy @ w) and packed._transposed is None


@packed_dtypes
def test_a_weight_that_trains_keeps_f_linear(dtype):
    w, b = weights(dtype)
    w.requires_grad_()
    x = torch.randn(5, 40).to(dtype).requires_grad_()
    packed = Prepacked()
    packed.linear(x, w, b).float().sum().backward()
    assert packed._packed is None and w.grad is not None


@packed_dtypes
def test_a_replaced_weight_is_packed_again(dtype):
    w, _ = weights(dtype, bias=False)
    x = torch.randn(3, 40).to(dtype)
    packed = Prepacked()
    with torch.no_grad():
        packed.linear(x, w)
        other = -w
        torch.testing.assert_close(packed.linear(x, other), F.linear(x, other), **TOLERANCE[dtype])


def test_without_onednn_f_linear_serves(monkeypatch):
    w, b = weights()
    x = torch.randn(5, 40).to(torch.bfloat16)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    packed = Prepacked()
    with torch.inference_mode():
        y = packed.linear(x, w, b)
    assert packed_linear.prepack(w) is None and packed._packed is None
    assert torch.equal(y, F.linear(x, w, b))


def test_non_cpu_weights_are_not_packed():
    assert not packed_linear.supported(torch.zeros(8, 4, dtype=torch.bfloat16, device="meta"))
    assert not packed_linear.supported(torch.zeros(8, 4, device="meta"))


@pytest.mark.parametrize("vendor, packs", [("GenuineIntel", False), ("", False), ("AuthenticAMD", True), ("HygonGenuine", True)])
def test_float32_is_packed_only_where_the_cpu_is_not_intels(monkeypatch, vendor, packs):
    """MKL runs float32 F.linear fast on Intel CPUs only (bench/results/base_linears_cpu_*.json);
    a CPU that does not say keeps F.linear."""
    monkeypatch.setattr(packed_linear, "cpu_vendor", lambda: vendor)
    w = torch.zeros(8, 4)
    assert packed_linear.supported(w) is (packs and torch.backends.mkldnn.is_available())
    assert (packed_linear.prepack(w) is None) is not packed_linear.supported(w)


def test_rows_past_the_measured_limit_run_f_linear():
    dtype = torch.bfloat16
    if dtype not in PACKED_DTYPES:
        pytest.skip("this CPU does not reorder bfloat16 weights")
    w, b = weights(dtype)
    x = torch.randn(packed_linear.PACKED_MAX_ROWS[dtype] + 1, 40).to(dtype)
    packed = Prepacked()
    with torch.inference_mode():
        y = packed.linear(x, w, b)
    assert packed._packed is None
    assert torch.equal(y, row_buckets.linear(x, w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [7, 300])
def test_a_replayed_output_is_the_one_given_with_f_linears_gradient(rows, dtype):
    """What a co-served backward slice relies on: the output computed in an earlier forward,
    handed back as is, and the activation gradient F.linear's backward gives (through oneDNN
    up to the row limit, a plain matmul past it)."""
    w, b = weights(dtype)
    x = torch.randn(rows, 40).to(dtype)
    kept = F.linear(x, w, b)
    packed = Prepacked()
    mine = x.clone().requires_grad_()
    y = packed.replayed(mine, kept, w)
    dy = torch.randn(rows, 96).to(dtype)
    y.backward(dy)
    ref = x.clone().requires_grad_()
    F.linear(ref, w, b).backward(dy)
    assert torch.equal(y, kept)
    torch.testing.assert_close(mine.grad, ref.grad, **TOLERANCE[dtype])


@packed_dtypes
@pytest.mark.parametrize("rows", [16, 17])
@pytest.mark.parametrize("replayed", [False, True], ids=["linear", "replayed"])
def test_an_output_added_into_without_grad_still_trains(rows, replayed, dtype):
    """A forward that trains beside served rows adds their deltas into the frozen linear's
    output in place under no_grad, then the trained delta uses it with autograd: at 17 rows
    (padded to a bucket) and on every replayed output autograd refused that use, the output
    being a view."""
    w, b = weights(dtype)
    x = torch.randn(rows, 40).to(dtype)
    packed = Prepacked()
    mine = x.clone().requires_grad_()
    y = packed.replayed(mine, F.linear(x, w, b), w) if replayed else packed.linear(mine, w, b)
    served = torch.randn(rows, 96).to(dtype)
    with torch.no_grad():
        y += served
    dy = torch.randn(rows, 96).to(dtype)
    (y * 2).backward(dy)
    ref = x.clone().requires_grad_()
    want = F.linear(ref, w, b)
    with torch.no_grad():
        want += served
    (want * 2).backward(dy)
    torch.testing.assert_close(y, want, **TOLERANCE[dtype])
    torch.testing.assert_close(mine.grad, ref.grad, **TOLERANCE[dtype])
