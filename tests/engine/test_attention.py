"""Fresh (training) sequences' attention: the short-sequence path in reduced precision on CPU
(two matmuls and a float32 softmax instead of SDPA's flash kernel) is as accurate as SDPA,
forward and backward, and long sequences keep SDPA."""

import pytest
import torch
import torch.nn.functional as F

from tandem.server.model import attention as attention_module
from tandem.server.model.attention import EXPLICIT_MAX_TOKENS, attention
from tandem.server.model.batch import AttentionMetadata, FreshChunk

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def fresh_batch(lengths: list[int]) -> AttentionMetadata:
    meta = AttentionMetadata(torch.empty(0, dtype=torch.long), 0, None, None, [], [])
    row = 0
    for n in lengths:
        meta.fresh.append(FreshChunk(row, row + n, torch.ones(n, n, dtype=torch.bool).tril()))
        row += n
    return meta


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Each sequence causally over itself, K/V heads repeated per group: plain SDPA."""
    outs, row = [], 0
    for n in lengths:
        rows = slice(row, row + n)
        qs = q[rows].transpose(0, 1)
        ks = k[rows].repeat_interleave(HEADS // KV_HEADS, dim=1).transpose(0, 1)
        vs = v[rows].repeat_interleave(HEADS // KV_HEADS, dim=1).transpose(0, 1)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1).reshape(n, -1))
        row += n
    return torch.cat(outs)


def run(lengths: list[int], dtype: torch.dtype, through) -> tuple[torch.Tensor, ...]:
    """Output and q/k/v gradients of `through` on fixed random inputs, in float64."""
    gen = torch.Generator().manual_seed(0)
    total = sum(lengths)
    tensors = [torch.randn(total, h, HEAD_DIM, generator=gen) for h in (HEADS, KV_HEADS, KV_HEADS)]
    grad = torch.randn(total, HEADS * HEAD_DIM, generator=gen)
    q, k, v = (t.to(dtype).requires_grad_() for t in tensors)
    out = through(q, k, v)
    out.backward(grad.to(dtype))
    return tuple(t.double() for t in (out, q.grad, k.grad, v.grad))


@pytest.mark.parametrize("lengths", [[86], [40, 40, 40], [37, 200, 9]], ids=["one", "equal-run", "ragged"])
def test_short_fresh_sequences_in_bf16_are_as_accurate_as_sdpa(lengths):
    exact = run(lengths, torch.float64, lambda q, k, v: reference(q, k, v, lengths))
    ours = run(lengths, torch.bfloat16, lambda q, k, v: attention(q, k, v, None, None, fresh_batch(lengths)))
    sdpa = run(lengths, torch.bfloat16, lambda q, k, v: reference(q, k, v, lengths))
    for name, e, o, s in zip(("output", "dq", "dk", "dv"), exact, ours, sdpa):
        ours_err, sdpa_err = (o - e).abs().max().item(), (s - e).abs().max().item()
        assert ours_err <= 2 * sdpa_err, (name, ours_err, sdpa_err)


def test_long_fresh_sequences_keep_sdpa(monkeypatch):
    """Past EXPLICIT_MAX_TOKENS (where the explicit path's n^2 scores cost more than flash),
    attention goes through SDPA as before."""
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    for n, expected in ((EXPLICIT_MAX_TOKENS, 0), (EXPLICIT_MAX_TOKENS + 1, 1)):
        calls.clear()
        run([n], torch.bfloat16, lambda q, k, v: attention(q, k, v, None, None, fresh_batch([n])))
        assert len(calls) == expected, n
