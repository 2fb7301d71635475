"""The chunked head loss gives the plain path's loss and hidden-state gradient (logits
materialised, F.cross_entropy, autograd), across chunk boundaries, dtypes and projections."""

import pytest
import torch
import torch.nn.functional as F

from tandem.kernels import linear_cross_entropy as lce
from tandem.kernels.packed_linear import Prepacked

TOLERANCE = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


def head(rows: int, dtype: torch.dtype, vocab: int = 300, hidden: int = 24):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(vocab, hidden, generator=g).to(dtype)
    h = torch.randn(rows, hidden, generator=g).to(dtype)
    t = torch.randint(0, vocab, (rows,), generator=g)
    return h, w, t


def plain(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = h.clone().requires_grad_()
    loss = F.cross_entropy(F.linear(h, w).float(), t, reduction="sum")
    (loss * 0.37).backward()
    return loss.detach(), h.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 16, 33])
def test_loss_and_gradient_equal_the_plain_head(monkeypatch, rows, dtype):
    monkeypatch.setattr(lce, "CHUNK_ROWS", 16)  # 33 rows: two full chunks and a ragged one
    h, w, t = head(rows, dtype)
    want_loss, want_grad = plain(h, w, t)
    x = h.clone().requires_grad_()
    loss = lce.linear_cross_entropy(x, w, t, lambda c: F.linear(c, w))
    (loss * 0.37).backward()
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss.detach(), want_loss, rtol=1e-5, atol=1e-4)
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad, want_grad, **TOLERANCE[dtype])


@pytest.mark.parametrize("back", [False, True], ids=["mm-back", "packed-back"])
def test_through_a_prepacked_weight_and_without_grad(back):
    """Logits through the reordered weight; the gradient back through torch.mm or through the
    reordered transpose (project_back)."""
    h, w, t = head(40, torch.float32)
    want_loss, want_grad = plain(h, w, t)
    packed = Prepacked()
    x = h.clone().requires_grad_()
    project_back = (lambda g: packed.transposed_linear(g, w)) if back else None
    loss = lce.linear_cross_entropy(x, w, t, lambda c: packed.linear(c, w), project_back)
    (loss * 0.37).backward()
    torch.testing.assert_close(x.grad, want_grad, **TOLERANCE[torch.float32])
    with torch.inference_mode():
        torch.testing.assert_close(lce.linear_cross_entropy(h, w, t, lambda c: packed.linear(c, w)), want_loss, rtol=1e-5, atol=1e-4)


def test_a_trainable_weight_is_refused():
    h, w, t = head(4, torch.float32)
    with pytest.raises(ValueError, match="frozen"):
        lce.linear_cross_entropy(h, w.requires_grad_(), t, lambda c: F.linear(c, w))
