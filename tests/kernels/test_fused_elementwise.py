"""The C elementwise kernels of a decoder layer against the torch ops they replace: rope and
the residual add bit-equal in both dtypes; the norm and SiLU within float32 rounding (the
sum of squares' order, the exponential), in bfloat16 bit-equal nearly everywhere and never
more than one step apart;
rows split over threads equal to rows done one by one; and None (the torch path) wherever
autograd, the device, the dtype or the shape rules the kernel out."""

import pytest
import torch
import torch.nn.functional as F

from tandem.kernels import fused_elementwise as fe
from tandem.kernels.rms_norm import _forward as torch_rms_norm
from tandem.server.model.llama import Rotary

pytestmark = pytest.mark.skipif(fe.library() is None, reason="no C compiler to build the native kernels")

EPS = 1e-5
DTYPES = [torch.float32, torch.bfloat16]
# Rows: a decode step, and a prefill chunk past the kernels' threading threshold.
ROWS = [1, 13, 700]


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many steps of a's dtype separate a and b, elementwise (same-sign values; 0 == -0)."""
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[a.dtype]
    return torch.where(a == b, 0, (a.view(bits).long() - b.view(bits).long()).abs())


def assert_near(ours: torch.Tensor, ref: torch.Tensor, max_unequal: float) -> None:
    """At most one step of the dtype apart anywhere, and bit-equal but for max_unequal of them."""
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    same_sign = (ours.float() * ref.float() >= 0) | (ours == ref)
    assert same_sign.all()
    steps = ulps(ours, ref)
    assert int(steps.max()) <= 1
    assert float((steps > 0).float().mean()) <= max_unequal


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
def test_rms_norm_with_and_without_residual_add(dtype: torch.dtype, rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 576, generator=g) * 3).to(dtype)
    delta = torch.randn(rows, 576, generator=g).to(dtype)
    weight = (torch.rand(576, generator=g) + 0.5).to(dtype)

    out, s = fe.rms_norm(x, weight, EPS)
    assert s is x
    assert_norm_near(out, torch_rms_norm(x, weight, EPS)[0])

    out, s = fe.rms_norm(x, weight, EPS, delta)
    assert torch.equal(s, x + delta)
    assert_norm_near(out, torch_rms_norm(x + delta, weight, EPS)[0])


def assert_norm_near(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """float32: 1/rms one step apart moves the output a few steps; bfloat16 rounds that away
    but for rare ties."""
    if ours.dtype == torch.float32:
        torch.testing.assert_close(ours, ref, rtol=6e-7, atol=0)
    else:
        assert_near(ours, ref, 1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
def test_rope_equals_rotary_apply(dtype: torch.dtype, rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    heads, kv_heads, head_dim = 9, 3, 64
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    angle = torch.rand(rows, 1, head_dim, generator=g) * 40
    table = angle.cos().to(dtype), angle.sin().to(dtype)
    q, k = fe.rope(qkv, *table, heads, kv_heads)
    q_ref = Rotary.apply(qkv[:, : heads * head_dim].view(rows, heads, head_dim), table)
    k_ref = Rotary.apply(qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(rows, kv_heads, head_dim), table)
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
def test_silu_mul_equals_torch(dtype: torch.dtype, rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    gate_up = (torch.randn(rows, 2 * 1536, generator=g) * 6).to(dtype)
    gate_up[0, :8] = torch.tensor([0.0, -0.0, 100.0, -100.0, 90.0, -90.0, 1e-30, -1e-30]).to(dtype)
    gate, up = gate_up.split(1536, dim=-1)
    ours = fe.silu_mul(gate_up)
    ref = F.silu(gate) * up
    if dtype == torch.float32:  # the exponential: within float32 rounding, not bit-equal
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-37)
    else:
        assert_near(ours, ref, 1e-3)


def test_silu_mul_leaves_an_odd_width_to_torch() -> None:
    """A width of 2 x 16 + 1 passed the kernel's check and its rows after the first were read
    at the wrong stride."""
    assert fe.silu_mul(torch.randn(3, 33)) is None


def test_threaded_rows_equal_rows_one_by_one() -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(700, 576, generator=g).to(torch.bfloat16)
    delta = torch.randn(700, 576, generator=g).to(torch.bfloat16)
    weight = torch.rand(576, generator=g).to(torch.bfloat16)
    gate_up = torch.randn(700, 3072, generator=g).to(torch.bfloat16)
    whole, _ = fe.rms_norm(x, weight, EPS, delta)
    act = fe.silu_mul(gate_up)
    for r in (0, 350, 699):
        assert torch.equal(whole[r], fe.rms_norm(x[r : r + 1], weight, EPS, delta[r : r + 1])[0][0])
        assert torch.equal(act[r], fe.silu_mul(gate_up[r : r + 1])[0])


def test_what_the_kernels_do_not_take_goes_to_torch() -> None:
    x, weight = torch.randn(4, 64), torch.rand(64)
    qkv, table = torch.randn(4, 5 * 64), (torch.rand(4, 1, 64), torch.rand(4, 1, 64))
    gate_up = torch.randn(4, 128)
    with torch.enable_grad():
        assert fe.rms_norm(x.clone().requires_grad_(), weight, EPS) is None
        assert fe.rope(qkv.clone().requires_grad_(), *table, 3, 1) is None
        assert fe.silu_mul(gate_up.clone().requires_grad_()) is None
    assert fe.rms_norm(x.half(), weight.half(), EPS) is None
    assert fe.rms_norm(x, weight.bfloat16(), EPS) is None
    assert fe.rms_norm(torch.randn(4, 60), torch.rand(60), EPS) is None
    assert fe.rms_norm(x.t().contiguous().t(), weight, EPS) is None
    assert fe.rms_norm(x, weight, EPS, torch.randn(4, 32)) is None
    assert fe.rope(qkv, torch.rand(4, 1, 48), torch.rand(4, 1, 48), 3, 1) is None
    assert fe.rope(torch.randn(4, 3 * 64), *table, 3, 1) is None
    assert fe.silu_mul(torch.randn(4, 100)) is None
    assert fe.silu_mul(torch.randn(2, 4, 128)) is None
    # what the kernels do take, to the rounding the tests above bound
    assert fe.rms_norm(x, weight, EPS) is not None and fe.rope(qkv, *table, 3, 1) is not None and fe.silu_mul(gate_up) is not None
