"""The skinny linears (C: bfloat16 on AVX512-BF16, float32 on AVX2 and FMA) against a float64
matmul of the same values: bfloat16 one step apart at most (past float32 summation error) and
nearly always equal to the exact value rounded once; float32 within float32 summation's
error bound. For every row count up to the limit (1 to 6 rows share a pass over a tile; 7 and
more go through it again, in balanced groups), output widths that end in a partial tile,
with and without bias. Prepacked routes a decode's rows to it and longer ones to oneDNN with
the same results; calls it cannot take get None."""

import pytest
import torch

from tandem.kernels import packed_linear, skinny_linear
from tandem.kernels.packed_linear import Prepacked

DTYPES = [
    pytest.param(dtype, marks=pytest.mark.skipif(skinny_linear.tile_cols(dtype) == 0, reason=f"no {dtype} kernel on this CPU or no C compiler"))
    for dtype in (torch.bfloat16, torch.float32)
]
ROWS = {torch.bfloat16: [1, 2, 5, 6, 7, 13, 64], torch.float32: [1, 2, 5, 6, 7, 13, 32, 256]}


def reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ w.double().T
    return y if bias is None else y + bias.double()


def assert_exact_to_rounding(ours: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    """bfloat16: within one step of the exact value, plus float32 summation error (which,
    where the sum nearly cancels, can be several steps of a tiny result), and equal to the
    exact value rounded to bf16 nearly everywhere. float32: within the summation's bound,
    (inputs + 1) x 2^-24 x the sum of magnitudes."""
    exact = reference(x, w, bias)
    magnitude = x.double().abs() @ w.double().abs().T + (0 if bias is None else bias.double().abs())
    if ours.dtype == torch.float32:
        assert bool(((ours.double() - exact).abs() <= (x.shape[1] + 1) * 2.0**-24 * magnitude).all())
        return
    step = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 7)
    assert bool(((ours.double() - exact).abs() <= step + 1e-5 * magnitude).all())
    assert float((ours != exact.bfloat16()).float().mean()) < 0.02


def cases():
    for dtype in DTYPES:
        for rows in ROWS[dtype.values[0]]:
            for out_features, in_features in [(960, 576), (100, 34), (64, 2)] + ([(20, 33)] if dtype.values[0] == torch.float32 else []):
                yield pytest.param(*dtype.values, rows, out_features, in_features, marks=dtype.marks)


@pytest.mark.parametrize("dtype,rows,out_features,in_features", list(cases()))
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_float64_matmul(dtype: torch.dtype, rows: int, out_features: int, in_features: int, with_bias: bool) -> None:
    g = torch.Generator().manual_seed(rows * 1000 + out_features)
    w = (torch.randn(out_features, in_features, generator=g) * 0.05).to(dtype)
    x = torch.randn(rows, in_features, generator=g).to(dtype)
    bias = torch.randn(out_features, generator=g).to(dtype) if with_bias else None
    y = skinny_linear.linear(x, skinny_linear.pack(w), out_features, bias)
    assert y.shape == (rows, out_features) and y.dtype == dtype
    assert_exact_to_rounding(y, x, w, bias)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prepacked_routes_its_rows_to_it_and_agrees_with_onednn(dtype: torch.dtype) -> None:
    routed = skinny_linear.ROUTED_ROWS[dtype]
    w = (torch.randn(960, 576) * 0.05).to(dtype)
    if routed == 0 or not packed_linear.supported(w):
        pytest.skip(f"Prepacked routes no {dtype} rows to the kernel on this CPU")
    layer = Prepacked()
    x = torch.randn(max(routed, skinny_linear.MAX_ROWS[dtype]) + 8, 576).to(dtype)
    few = layer.linear(x[:routed], w)
    assert layer._skinny is not None
    assert torch.equal(few, skinny_linear.linear(x[:routed], layer._skinny, 960))
    assert_exact_to_rounding(few, x[:routed], w, None)
    many = layer.linear(x, w)  # past the kernel's rows: oneDNN
    assert_exact_to_rounding(many[:routed], x[:routed], w, None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_declines_what_it_cannot_take(dtype: torch.dtype) -> None:
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    w = (torch.randn(64, 32) * 0.05).to(dtype)
    packed = skinny_linear.pack(w)
    x = torch.randn(2, 32).to(dtype)
    assert skinny_linear.pack(w.to(torch.float16)) is None
    assert skinny_linear.pack(torch.randn(4, 64, 32).to(dtype)) is None
    if dtype == torch.bfloat16:
        assert skinny_linear.pack(torch.randn(64, 33).bfloat16()) is None  # odd input width
    assert skinny_linear.linear(x, None, 64) is None
    assert skinny_linear.linear(x.to(other), packed, 64) is None
    assert skinny_linear.linear(torch.randn(skinny_linear.MAX_ROWS[dtype] + 1, 32).to(dtype), packed, 64) is None
    assert skinny_linear.linear(x.requires_grad_(), packed, 64) is None
    with pytest.raises(ValueError, match="does not fit"):
        skinny_linear.linear(torch.randn(2, 30).to(dtype), packed, 64)
    with pytest.raises(ValueError, match="does not fit"):
        skinny_linear.linear(x.detach(), packed, 65)
    # A bias the kernel would read past (it reads out_features values from its pointer).
    assert skinny_linear.linear(x.detach(), packed, 64, torch.zeros(63, dtype=dtype)) is None
    assert skinny_linear.linear(x.detach(), packed, 64, torch.zeros(64, 1, dtype=dtype)) is None
