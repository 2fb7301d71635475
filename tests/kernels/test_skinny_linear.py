"""The skinny bf16 linear (C, AVX512-BF16) against a float64 matmul of the same bf16 values,
rounded once: one bf16 step apart at most (past float32 summation error) and nearly always
equal, for every row count up to its limit (1 to 6 rows share a pass over a tile; 7 and more go through it again), output
widths that end in a partial tile, with and without bias. Prepacked routes a decode's rows to
it and longer ones to oneDNN with the same results; calls it cannot take get None."""

import pytest
import torch

from tandem.kernels import skinny_linear
from tandem.kernels.packed_linear import Prepacked

pytestmark = pytest.mark.skipif(skinny_linear.library() is None, reason="no AVX512-BF16 or no C compiler")


def reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ w.double().T
    return y if bias is None else y + bias.double()


def assert_rounded_once(ours: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Within one bf16 step of the exact value, plus float32 summation error (which, where the
    sum nearly cancels, can be several steps of a tiny result); equal to the exact value
    rounded to bf16 nearly everywhere."""
    exact = reference(x, w, bias)
    magnitude = x.double().abs() @ w.double().abs().T + (0 if bias is None else bias.double().abs())
    step = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 7)
    assert bool(((ours.double() - exact).abs() <= step + 1e-5 * magnitude).all())
    assert float((ours != exact.bfloat16()).float().mean()) < 0.02


@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 13, 64])
@pytest.mark.parametrize("out_features,in_features", [(960, 576), (100, 34), (64, 2)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_float32_matmul(rows: int, out_features: int, in_features: int, with_bias: bool) -> None:
    g = torch.Generator().manual_seed(rows * 1000 + out_features)
    w = (torch.randn(out_features, in_features, generator=g) * 0.05).bfloat16()
    x = torch.randn(rows, in_features, generator=g).bfloat16()
    bias = torch.randn(out_features, generator=g).bfloat16() if with_bias else None
    y = skinny_linear.linear(x, skinny_linear.pack(w), out_features, bias)
    assert y.shape == (rows, out_features) and y.dtype == torch.bfloat16
    assert_rounded_once(y, x, w, bias)


def test_prepacked_routes_few_rows_to_it_and_agrees_with_onednn() -> None:
    w = (torch.randn(960, 576) * 0.05).bfloat16()
    layer = Prepacked()
    x = torch.randn(skinny_linear.MAX_ROWS + 8, 576).bfloat16()
    few = layer.linear(x[:3], w)
    assert layer._skinny is not None
    assert torch.equal(few, skinny_linear.linear(x[:3], layer._skinny, 960))
    assert_rounded_once(few, x[:3], w, None)
    many = layer.linear(x, w)  # past MAX_ROWS: oneDNN
    assert_rounded_once(many[:3], x[:3], w, None)


def test_declines_what_it_cannot_take() -> None:
    w = (torch.randn(64, 32) * 0.05).bfloat16()
    packed = skinny_linear.pack(w)
    x = torch.randn(2, 32).bfloat16()
    assert skinny_linear.pack(w.float()) is None
    assert skinny_linear.pack(torch.randn(64, 33).bfloat16()) is None  # odd input width
    assert skinny_linear.linear(x, None, 64) is None
    assert skinny_linear.linear(x.float(), packed, 64) is None
    assert skinny_linear.linear(torch.randn(skinny_linear.MAX_ROWS + 1, 32).bfloat16(), packed, 64) is None
    assert skinny_linear.linear(x.requires_grad_(), packed, 64) is None
    with pytest.raises(ValueError, match="does not fit"):
        skinny_linear.linear(torch.randn(2, 30).bfloat16(), packed, 64)
