"""The dense path for a batch whose every row trains one adapter (single_adapter.py) against
the general batched-LoRA path it stands in for: the same output and gradients in every
dtype the trainer runs, the general path for any other batch, and the weights converted
once per version, never stale."""

import functools

import pytest
import torch

from tandem.kernels.lora import LoRABatch, LoRAWeights, lora_add_autograd, lora_delta_autograd, single_adapter

# (in_features, out_slices, rank): a fused q/k/v-like group and a single projection.
GROUPS = {"three_slices": (40, (40, 24, 24), 8), "one_slice": (72, (40,), 16)}
# (activation dtype, rows, tolerance): float32; bfloat16 with few rows (the general path
# multiplies in float32 there) and with many (it multiplies in bfloat16).
DTYPES = {"float32": (torch.float32, 37, 1e-5), "bf16_few_rows": (torch.bfloat16, 20, 2e-2), "bf16_many_rows": (torch.bfloat16, 150, 2e-2)}


def make_weights(in_features, out_slices, rank, seed=0) -> LoRAWeights:
    """One slot of float32 weights, as a trained adapter's slot holds them."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(1, len(out_slices) * rank, in_features, generator=gen) / in_features**0.5
    b = torch.randn(1, sum(out_slices), rank, generator=gen) / rank**0.5
    return LoRAWeights(a, b, torch.tensor([rank], dtype=torch.int32), out_slices)


def grads(add, w: LoRAWeights, batch: LoRABatch, dtype, seed=1):
    """(out, dy, dx, da, db) of add(y, x, w, batch) with fresh leaves, float64 for comparing."""
    gen = torch.Generator().manual_seed(seed)
    n = batch.num_tokens
    y = torch.randn(n, w.out_features, generator=gen).to(dtype).requires_grad_()
    x = torch.randn(n, w.in_features, generator=gen).to(dtype).requires_grad_()
    dout = torch.randn(n, w.out_features, generator=gen).to(dtype)
    leaves = LoRAWeights(w.a.clone().requires_grad_(), w.b.clone().requires_grad_(), w.slot_ranks, w.out_slices)
    out = add(y, x, leaves, batch)
    out.backward(dout)
    return tuple(t.double() for t in (out.detach(), y.grad, x.grad, leaves.a.grad, leaves.b.grad))


def general(y, x, w, batch):
    return y + lora_delta_autograd(x, w, batch)


@pytest.mark.parametrize("dtype_case", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("group", GROUPS.values(), ids=GROUPS.keys())
def test_one_adapter_over_every_row_matches_the_general_path(group, dtype_case, monkeypatch):
    dtype, rows, tol = dtype_case
    w = make_weights(*group)
    batch = LoRABatch.build([0] * rows, 1)
    expected = grads(general, w, batch, dtype)
    dense_calls = []
    monkeypatch.setattr(single_adapter, "lora_add", functools.partial(_spy, dense_calls))
    got = grads(lora_add_autograd, w, batch, dtype)
    assert dense_calls, "the batch should have taken the dense path"
    for name, g, e in zip(("out", "dy", "dx", "da", "db"), got, expected):
        torch.testing.assert_close(g, e, rtol=tol, atol=tol, msg=name)


def _spy(calls: list, y, x, w):
    calls.append(1)
    return single_adapter.SingleLoRAAdd.apply(y, x, w.a, w.b, w)


@pytest.mark.parametrize(
    "token_slots, ranks",
    [([0, 0, -1, 0], [8]), ([0, 1, 1, 0], [8, 8]), ([0, 0, 0, 0], [5])],
    ids=["a_row_without_the_adapter", "two_adapters", "below_the_full_rank"],
)
def test_other_batches_take_the_general_path(token_slots, ranks):
    in_features, out_slices, max_rank = 24, (16, 8), 8
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(len(ranks), 2 * max_rank, in_features, generator=gen)
    b = torch.randn(len(ranks), sum(out_slices), max_rank, generator=gen)
    w = LoRAWeights(a, b, torch.tensor(ranks, dtype=torch.int32), out_slices)
    batch = LoRABatch.build(token_slots, len(ranks))
    assert not single_adapter.applies(w, batch)
    for g, e in zip(grads(lora_add_autograd, w, batch, torch.float32), grads(general, w, batch, torch.float32)):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_weights_are_converted_once_per_version():
    """The bf16 copies are reused while the float32 weights stand, and remade once they change
    in place (an optimizer step), so a step never multiplies by stale weights."""
    w = make_weights(*GROUPS["three_slices"])
    first = single_adapter.compute_weights(w, torch.bfloat16)
    assert all(t1 is t2 for t1, t2 in zip(first, single_adapter.compute_weights(w, torch.bfloat16)))
    with torch.no_grad():
        w.a.mul_(2)
        w.b.add_(1)
    a, b = single_adapter.compute_weights(w, torch.bfloat16)
    torch.testing.assert_close(a, w.a[0].to(torch.bfloat16))
    rank, start = 8, 0
    for s, width in enumerate(w.out_slices):
        block = b[start : start + width]
        torch.testing.assert_close(block[:, s * rank : (s + 1) * rank], w.b[0, start : start + width].to(torch.bfloat16))
        assert torch.count_nonzero(block) == block[:, s * rank : (s + 1) * rank].count_nonzero()
        start += width
