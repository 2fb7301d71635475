"""The blockwise loss through the output projection against the logits and F.cross_entropy
it stands in for: the same summed loss and the same gradient of a scaled loss, over blocks
that split the rows unevenly, and no gradient work when none is asked for."""

import pytest
import torch
import torch.nn.functional as F

from tandem.kernels import linear_cross_entropy as lce

# (dtype, tolerance): float32 exactly as the trainer's float32 path; bfloat16 to its rounding.
DTYPES = {"float32": (torch.float32, 1e-5), "bfloat16": (torch.bfloat16, 2e-2)}


@pytest.mark.parametrize("dtype, tol", DTYPES.values(), ids=DTYPES.keys())
def test_loss_and_gradient_equal_the_logits_path(dtype, tol, monkeypatch):
    monkeypatch.setattr(lce, "BLOCK_ROWS", 8)
    gen = torch.Generator().manual_seed(0)
    rows, hidden, vocab = 21, 16, 50
    weight = torch.randn(vocab, hidden, generator=gen).to(dtype)
    h0 = torch.randn(rows, hidden, generator=gen).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    scale = 1 / 17

    h = h0.clone().requires_grad_()
    expected = F.cross_entropy(F.linear(h, weight).float(), targets, reduction="sum")
    (expected * scale).backward()
    h_fused = h0.clone().requires_grad_()
    loss = lce.linear_cross_entropy(h_fused, weight, targets)
    (loss * scale).backward()

    torch.testing.assert_close(loss, expected.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(h_fused.grad.float(), h.grad.float(), rtol=tol, atol=tol * h.grad.abs().max().item())


def test_without_a_gradient_only_the_loss_is_computed(monkeypatch):
    """An eval pass (inference_mode) keeps no gradient and matches the logits path."""
    gen = torch.Generator().manual_seed(1)
    weight, h = torch.randn(30, 8, generator=gen), torch.randn(11, 8, generator=gen)
    targets = torch.randint(0, 30, (11,), generator=gen)
    mms = []
    monkeypatch.setattr(lce.torch, "mm", lambda *args: mms.append(1) or torch.matmul(*args))
    with torch.inference_mode():
        loss = lce.linear_cross_entropy(h, weight, targets)
    assert not mms and not loss.requires_grad
    torch.testing.assert_close(loss, F.cross_entropy(F.linear(h, weight), targets, reduction="sum"))
