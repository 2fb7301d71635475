"""Attention for a ragged batch: paged over the KV cache, or fresh over a sequence's own rows.

Grouped-query attention is done without repeating K/V: the G query heads that share a KV
head are laid along the query-length axis of one SDPA call, so each KV head is read once.
On CPU, decode rows go to the C kernel of kernels/decode_attention.py where it is built,
which reads each context from its cache slots in place; SDPA over the gathered context
elsewhere.
"""

import torch
import torch.nn.functional as F

from tandem.kernels.decode_attention import decode_attention
from tandem.server.model.batch import AttentionMetadata, FreshChunk, PrefillChunk

# Fresh sequences up to this many tokens, in bfloat16 or float16 on CPU, attend by two
# matmuls and a float32 softmax instead of SDPA, whose CPU flash kernel is slow in these
# dtypes, most of all backward. Forward and backward of SmolLM2's 9 query over 3 KV heads
# (2-core EPYC, bf16): 86 tokens 1.4 -> 0.5 ms, 180 tokens 2.9 -> 1.3 ms, 256 tokens 3.7 ->
# 2.1 ms; 512 tokens x 4 sequences 39 -> 60 ms, past the crossover. In float32 neither wins.
EXPLICIT_MAX_TOKENS = 256


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata
) -> torch.Tensor:
    """q: [T, H, D], k, v: [T, Hkv, D] for every row of the batch -> [T, H * D].

    Cached rows (decodes, then prefills) write their K/V into the cache and attend through
    it; fresh rows (training sequences) attend to their own K/V, so autograd sees them whole.
    """
    n = meta.num_cached_rows
    parts = []
    if n:
        # detach: the cache is not part of any graph (a no-op under inference_mode).
        write_kv(k_cache, v_cache, k[:n].detach(), v[:n].detach(), meta.slot_mapping)
        parts.append(paged_attention(q[:n], k_cache, v_cache, meta))
    for first, last in _equal_runs(meta.fresh):
        rows, n = slice(first.start, last.end), first.end - first.start
        parts.append(_fresh_attention(_batched(q[rows], n), _batched(k[rows], n), _batched(v[rows], n), first.mask))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _equal_runs(chunks: list[FreshChunk]) -> list[tuple[FreshChunk, FreshChunk]]:
    """(first, last) of each run of consecutive fresh chunks of one length: one SDPA call per
    run (a training micro-batch of equal-length sequences is one run) costs half of one per
    chunk on CPU at 8 x 128 tokens, backward included."""
    runs: list[tuple[FreshChunk, FreshChunk]] = []
    for chunk in chunks:
        if runs and chunk.end - chunk.start == runs[-1][1].end - runs[-1][1].start and chunk.start == runs[-1][1].end:
            runs[-1] = (runs[-1][0], chunk)
        else:
            runs.append((chunk, chunk))
    return runs


def _batched(t: torch.Tensor, n: int) -> torch.Tensor:
    """[B * n, heads, D] -> [B, n, heads, D]."""
    return t.view(-1, n, *t.shape[1:])


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Store new keys/values ([T, Hkv, D]) at their flat slots in the layer's cache."""
    k_cache.index_copy_(0, slots, k)
    v_cache.index_copy_(0, slots, v)


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata
) -> torch.Tensor:
    """q: [T, H, D] (decode rows first) -> [T, H * D]; the batch's own K/V must be written first."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    nd = meta.num_decodes
    o = None if not nd or meta.decode_lens is None else decode_attention(q[:nd], k_cache, v_cache, meta.decode_slots, meta.decode_lens)
    if o is not None and nd == num_tokens:
        return o
    out = q.new_empty(num_tokens, num_heads * head_dim)
    if o is not None:
        out[:nd] = o
    elif nd:
        if meta.decode_mask is None:  # a captured decode step has no mask: its contexts are not gathered
            raise RuntimeError("decode rows without a mask need the paged decode kernel, which did not take them")
        qd = q[:nd].view(nd, num_kv_heads, group, head_dim)
        k = _gather(k_cache, meta.decode_slots).transpose(1, 2)
        v = _gather(v_cache, meta.decode_slots).transpose(1, 2)
        o = F.scaled_dot_product_attention(qd, k, v, attn_mask=meta.decode_mask)
        out[:nd] = o.reshape(nd, num_heads * head_dim)
    for run in _alike_runs(meta.prefills):
        first, last, n = run[0], run[-1], run[0].end - run[0].start
        slots = run[0].context_slots[None] if len(run) == 1 else torch.stack([c.context_slots for c in run])
        rows = slice(first.start, last.end)
        out[rows] = _chunk_attention(_batched(q[rows], n), _gather(k_cache, slots), _gather(v_cache, slots), first.mask)
    return out


def _alike_runs(chunks: list[PrefillChunk]) -> list[list[PrefillChunk]]:
    """Runs of consecutive prefill chunks with as many rows and as long a context, hence the
    same mask (a chunk's mask depends only on those): one attention call per run. A burst of
    prompts of one length is one call per layer, not one per prompt; on CPU 16 prompts of 32
    tokens spent 54 ms of a 380 ms SmolLM2 prefill step in 480 per-chunk calls."""
    runs: list[list[PrefillChunk]] = []
    for chunk in chunks:
        last = runs[-1][-1] if runs else None
        if (
            last is not None and chunk.start == last.end and chunk.end - chunk.start == last.end - last.start
            and chunk.context_slots.shape == last.context_slots.shape
        ):
            runs[-1].append(chunk)
        else:
            runs.append([chunk])
    return runs


def _fresh_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """_chunk_attention for B sequences of n tokens over their own K/V (mask: causal [n, n])."""
    b, n, num_heads, head_dim = q.shape
    if n > EXPLICIT_MAX_TOKENS or q.device.type != "cpu" or q.dtype == torch.float32:
        return _chunk_attention(q, k, v, mask)
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    qp = q.view(b, n, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4).reshape(b, num_kv_heads, group * n, head_dim)
    scores = (qp @ k.permute(0, 2, 3, 1)) * head_dim**-0.5
    scores = scores.masked_fill(~mask.repeat(group, 1), float("-inf"))
    o = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v.transpose(1, 2)
    return o.view(b, num_kv_heads, group, n, head_dim).permute(0, 3, 1, 2, 4).reshape(b * n, num_heads * head_dim)


def _chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """B sequences' queries q [B, n, H, D] over their contexts k, v [B, L, Hkv, D] -> [B * n, H * D];
    mask [n, L] bool, the same for each."""
    b, n, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    qp = q.view(b, n, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4).reshape(b, num_kv_heads, group * n, head_dim)
    o = F.scaled_dot_product_attention(qp, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask.repeat(group, 1))
    return o.view(b, num_kv_heads, group, n, head_dim).permute(0, 3, 1, 2, 4).reshape(b * n, num_heads * head_dim)


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache[slots] for slots of any shape; index_select is ~7x faster than advanced indexing on CPU."""
    return cache.index_select(0, slots.reshape(-1)).view(*slots.shape, *cache.shape[1:])
