"""Weights reordered once for oneDNN give F.linear's results, only where no graph is being
recorded, and F.linear serves wherever the reordered path is missing."""

import pytest
import torch
import torch.nn.functional as F

from tandem.kernels import packed_linear, row_buckets
from tandem.kernels.packed_linear import Prepacked

needs_packing = pytest.mark.skipif(
    not packed_linear.supported(torch.zeros(1, 1, dtype=torch.bfloat16)), reason="this CPU has no oneDNN bfloat16 linear"
)


def weights(dtype: torch.dtype = torch.bfloat16, bias: bool = True):
    torch.manual_seed(0)
    w = (torch.randn(96, 40) * 0.1).to(dtype)
    return w, (torch.randn(96) * 0.1).to(dtype) if bias else None


@needs_packing
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 33, 100])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_rows_match_f_linear(rows, bias):
    w, b = weights(bias=bias)
    x = torch.randn(rows, 40).to(torch.bfloat16)
    packed = Prepacked()
    with torch.inference_mode():
        y = packed.linear(x, w, b)
    assert packed._packed is not None
    assert y.shape == (rows, 96) and y.dtype == torch.bfloat16 and y.is_contiguous()
    # Both accumulate in float32 and round once to bfloat16: at most one bf16 step apart.
    torch.testing.assert_close(y, F.linear(x, w, b), atol=1 / 64, rtol=1 / 128)


@needs_packing
def test_a_graph_being_recorded_runs_f_linear_and_gets_its_gradient():
    w, b = weights()
    x = torch.randn(7, 40).to(torch.bfloat16).requires_grad_()
    y = Prepacked().linear(x, w, b)
    assert y.grad_fn is not None
    y.float().sum().backward()
    ref = x.detach().clone().requires_grad_()
    F.linear(ref, w, b).float().sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, atol=0, rtol=0)


@needs_packing
def test_a_replaced_weight_is_packed_again():
    w, _ = weights(bias=False)
    x = torch.randn(3, 40).to(torch.bfloat16)
    packed = Prepacked()
    with torch.no_grad():
        packed.linear(x, w)
        other = -w
        torch.testing.assert_close(packed.linear(x, other), F.linear(x, other), atol=1 / 64, rtol=1 / 128)


def test_without_onednn_f_linear_serves(monkeypatch):
    w, b = weights()
    x = torch.randn(5, 40).to(torch.bfloat16)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    packed = Prepacked()
    with torch.inference_mode():
        y = packed.linear(x, w, b)
    assert packed_linear.prepack(w) is None and packed._packed is None
    assert torch.equal(y, F.linear(x, w, b))


def test_float32_and_non_cpu_weights_are_not_packed():
    assert packed_linear.prepack(torch.zeros(8, 4)) is None
    assert not packed_linear.supported(torch.zeros(8, 4, dtype=torch.bfloat16, device="meta"))


@needs_packing
def test_rows_past_the_measured_limit_run_f_linear():
    w, b = weights()
    x = torch.randn(packed_linear.PACKED_MAX_ROWS + 1, 40).to(torch.bfloat16)
    packed = Prepacked()
    with torch.inference_mode():
        y = packed.linear(x, w, b)
    assert packed._packed is None
    assert torch.equal(y, row_buckets.linear(x, w, b))
