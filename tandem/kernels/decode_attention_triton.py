"""Paged decode attention on CUDA (Triton): each decode sequence's query heads over its
context, read from the KV cache at its slots in place, in one launch per layer.

The torch path gathers every context into a padded copy ([N, longest context] per KV head)
and runs SDPA over it: a gather, a mask and several launches whose shapes change with the
longest context, which a CUDA graph cannot hold. Here the grid is (sequences, KV heads) and
each program walks its own context up to its length (read on the device), so the launch
depends on the batch's shape only. A program loads the G query heads that share its KV
head (each K/V row is read once for all of them) and keeps an online softmax in float32:
flash-decoding without the split over the context, which pays only for contexts far longer
than a served decode batch's count of (sequence, KV head) programs can hide.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_N = 64  # context tokens per iteration


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, slots_ptr, lens_ptr,
    stride_qn, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_on, stride_sn,
    scale,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    length = tl.load(lens_ptr + seq)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g
    mask_q = (offs_g < GROUP)[:, None] & mask_d[None, :]
    q = tl.load(q_ptr + seq * stride_qn + heads[:, None] * stride_qh + offs_d[None, :], mask=mask_q, other=0.0)

    m = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    denom = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for start in range(0, length, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < length
        # Slots past the length are never read: the rows may hold anything.
        slots = tl.load(slots_ptr + seq * stride_sn + offs_n, mask=mask_n, other=0)
        mask_kv = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_ptr + slots[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :], mask=mask_kv, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        scores = tl.where(mask_n[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        denom = denom * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + slots[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :], mask=mask_kv, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    out = acc / denom[:, None]
    tl.store(out_ptr + seq * stride_on + heads[:, None] * HEAD_DIM + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=mask_q)


def paged_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, lens: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(D)) v for one query row per sequence, as [N, H * D] in q's dtype.

    q [N, H, D]; k_cache, v_cache [num_slots, Hkv, D] (last dim contiguous); slots [N, W]
    int64 whose first lens[i] entries (int32, 1 <= lens[i] <= W) are sequence i's context
    slots in order. The caller checks the shapes (decode_attention.decode_attention).
    """
    n, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    if q.stride(2) != 1:
        q = q.contiguous()
    out = torch.empty(n, num_heads * head_dim, dtype=q.dtype, device=q.device)
    _decode_kernel[(n, num_kv_heads)](
        q, k_cache, v_cache, out, slots, lens,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        out.stride(0), slots.stride(0),
        head_dim**-0.5,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_N=BLOCK_N,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out
