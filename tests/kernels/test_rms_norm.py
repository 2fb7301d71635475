"""rms_norm: transformers' LlamaRMSNorm numbers forward, autograd's gradient backward."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from tandem.kernels import fused_elementwise
from tandem.kernels.rms_norm import rms_norm

EPS = 1e-5


def reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward, op for op."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    return weight * h.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grad", [False, True])
def test_forward_is_bitwise_transformers(dtype: torch.dtype, grad: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch path; without autograd the C kernel takes CPU calls where it is built, and
    tests/kernels/test_fused_elementwise.py bounds its distance from this path."""
    monkeypatch.setattr(fused_elementwise, "library", lambda: None)
    torch.manual_seed(0)
    x = (torch.randn(37, 96) * 3).to(dtype).requires_grad_(grad)
    weight = torch.randn(96).to(dtype)
    oracle = LlamaRMSNorm(96, eps=EPS).to(dtype).requires_grad_(False)
    with torch.no_grad():
        oracle.weight.copy_(weight)
    expected = oracle(x)
    assert expected.dtype == dtype
    assert torch.equal(rms_norm(x, weight, EPS), expected)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_input_gradient_equals_autograds(dtype: torch.dtype, tolerance: float) -> None:
    torch.manual_seed(1)
    x = (torch.randn(53, 128) * 2 + 0.5).to(dtype)
    weight = torch.randn(128).to(dtype)
    dy = torch.randn(53, 128).to(dtype)
    ours = x.clone().requires_grad_()
    rms_norm(ours, weight, EPS).backward(dy)
    exact = x.double().requires_grad_()
    reference(exact, weight.double()).backward(dy.double())
    assert ours.grad.dtype == dtype
    scale = exact.grad.abs().max()
    torch.testing.assert_close(ours.grad.double(), exact.grad, rtol=tolerance, atol=tolerance * scale)
    if dtype == torch.bfloat16:  # no further from exact than autograd through the same formula
        plain = x.clone().requires_grad_()
        reference(plain, weight).backward(dy)
        assert (ours.grad.double() - exact.grad).abs().max() <= 1.5 * (plain.grad.double() - exact.grad).abs().max()


def test_trainable_weight_is_refused() -> None:
    x = torch.randn(4, 8, requires_grad=True)
    with pytest.raises(ValueError, match="frozen"):
        rms_norm(x, torch.ones(8, requires_grad=True), EPS)
