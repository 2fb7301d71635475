"""Attention for a ragged batch: paged over the KV cache, or fresh over a sequence's own rows.

Grouped-query attention is done without repeating K/V: the G query heads that share a KV
head are laid along the query-length axis of one SDPA call, so each KV head is read once.
"""

import torch
import torch.nn.functional as F

from tandem.server.model.batch import AttentionMetadata


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
    for chunk in meta.fresh:
        rows = slice(chunk.start, chunk.end)
        parts.append(_chunk_attention(q[rows], k[rows].unsqueeze(0), v[rows].unsqueeze(0), chunk.mask))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


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
    out = q.new_empty(num_tokens, num_heads * head_dim)
    nd = meta.num_decodes
    if nd:
        qd = q[:nd].view(nd, num_kv_heads, group, head_dim)
        k = _gather(k_cache, meta.decode_slots).transpose(1, 2)
        v = _gather(v_cache, meta.decode_slots).transpose(1, 2)
        o = F.scaled_dot_product_attention(qd, k, v, attn_mask=meta.decode_mask)
        out[:nd] = o.reshape(nd, num_heads * head_dim)
    for chunk in meta.prefills:
        k = _gather(k_cache, chunk.context_slots).unsqueeze(0)
        v = _gather(v_cache, chunk.context_slots).unsqueeze(0)
        out[chunk.start : chunk.end] = _chunk_attention(q[chunk.start : chunk.end], k, v, chunk.mask)
    return out


def _chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One sequence's queries q [n, H, D] over its context k, v [1, L, Hkv, D] -> [n, H * D];
    mask [n, L] bool."""
    n, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    qp = q.view(n, num_kv_heads, group, head_dim).permute(1, 2, 0, 3).reshape(1, num_kv_heads, group * n, head_dim)
    o = F.scaled_dot_product_attention(qp, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask.repeat(group, 1))
    return o.view(num_kv_heads, group, n, head_dim).permute(2, 0, 1, 3).reshape(n, num_heads * head_dim)


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache[slots] for slots of any shape; index_select is ~7x faster than advanced indexing on CPU."""
    return cache.index_select(0, slots.reshape(-1)).view(*slots.shape, *cache.shape[1:])
