"""The skinny bf16 linear (C, AVX512-BF16) against a float32 matmul of the same bf16 values,
rounded once: at most one bf16 step apart and nearly always equal, for every row count up to
its limit (1 to 6 rows share a pass over a tile; 7 and more go through it again), output
widths that end in a partial tile, with and without bias. Prepacked routes a decode's rows to
it and longer ones to oneDNN with the same results; calls it cannot take get None."""

import pytest
import torch

from tandem.kernels import skinny_linear
from tandem.kernels.packed_linear import Prepacked

pytestmark = pytest.mark.skipif(skinny_linear.library() is None, reason="no AVX512-BF16 or no C compiler")


def reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x.float() @ w.float().T
    return (y if bias is None else y + bias.float()).bfloat16()


def assert_one_step(ours: torch.Tensor, ref: torch.Tensor) -> None:
    steps = (ours.view(torch.int16).long() - ref.view(torch.int16).long()).abs()
    steps = torch.where(ours == ref, 0, steps)
    assert int(steps.max()) <= 1
    assert float((steps > 0).float().mean()) < 0.02


@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 13, 32])
@pytest.mark.parametrize("out_features,in_features", [(960, 576), (100, 34), (64, 2)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_float32_matmul(rows: int, out_features: int, in_features: int, with_bias: bool) -> None:
    g = torch.Generator().manual_seed(rows * 1000 + out_features)
    w = (torch.randn(out_features, in_features, generator=g) * 0.05).bfloat16()
    x = torch.randn(rows, in_features, generator=g).bfloat16()
    bias = torch.randn(out_features, generator=g).bfloat16() if with_bias else None
    y = skinny_linear.linear(x, skinny_linear.pack(w), out_features, bias)
    assert y.shape == (rows, out_features) and y.dtype == torch.bfloat16
    assert_one_step(y, reference(x, w, bias))


def test_prepacked_routes_few_rows_to_it_and_agrees_with_onednn() -> None:
    w = (torch.randn(960, 576) * 0.05).bfloat16()
    layer = Prepacked()
    x = torch.randn(skinny_linear.MAX_ROWS + 8, 576).bfloat16()
    few = layer.linear(x[:3], w)
    assert layer._skinny is not None
    assert torch.equal(few, skinny_linear.linear(x[:3], layer._skinny, 960))
    assert_one_step(few, reference(x[:3], w, None))
    many = layer.linear(x, w)  # past MAX_ROWS: oneDNN
    assert_one_step(many[:3], few)


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
