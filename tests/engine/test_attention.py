"""Fresh (training) sequences' attention: the short-sequence path in reduced precision on CPU
(two matmuls and a float32 softmax instead of SDPA's flash kernel) is as accurate as SDPA,
forward and backward, and long sequences keep SDPA. Paged prefill chunks: alike ones
(as many rows, as long a context) attend in one call, as each would alone."""

import pytest
import torch
import torch.nn.functional as F

from tandem.server.model import attention as attention_module
from tandem.server.model.attention import EXPLICIT_MAX_TOKENS, attention, paged_attention
from tandem.server.model.batch import AttentionMetadata, FreshChunk, PrefillChunk

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


def test_alike_prefill_chunks_attend_in_one_call_as_each_would_alone(monkeypatch):
    """Three prompts of 8 tokens, a chunk of 8 continuing a 12-token context, two prompts of 5:
    three attention calls, each chunk's rows what SDPA gives it over its own context."""
    gen = torch.Generator().manual_seed(0)
    num_slots = 128
    k_cache, v_cache = (torch.randn(num_slots, KV_HEADS, HEAD_DIM, generator=gen) for _ in range(2))
    shapes = [(8, 0), (8, 0), (8, 0), (8, 12), (5, 0), (5, 0)]  # (new tokens, cached before them)
    order = torch.randperm(num_slots, generator=gen).tolist()
    meta = AttentionMetadata(torch.empty(0, dtype=torch.long), 0, None, None, [], [])
    row = 0
    for n, cached in shapes:
        total = cached + n
        slots = torch.tensor([order.pop() for _ in range(total)])
        mask = torch.arange(total)[None, :] <= torch.arange(cached, total)[:, None]
        meta.prefills.append(PrefillChunk(row, row + n, slots, mask))
        row += n
    q = torch.randn(row, HEADS, HEAD_DIM, generator=gen)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    out = paged_attention(q, k_cache, v_cache, meta)
    assert len(calls) == 3
    for chunk in meta.prefills:
        qs = q[chunk.start : chunk.end].transpose(0, 1).double()
        ks, vs = (c[chunk.context_slots].repeat_interleave(HEADS // KV_HEADS, dim=1).transpose(0, 1).double() for c in (k_cache, v_cache))
        ref = sdpa(qs, ks, vs, attn_mask=chunk.mask).transpose(0, 1).reshape(chunk.end - chunk.start, -1)
        torch.testing.assert_close(out[chunk.start : chunk.end].double(), ref, rtol=1e-5, atol=1e-5)
