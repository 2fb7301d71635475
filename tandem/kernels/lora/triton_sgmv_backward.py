"""Triton kernels for the gradients of batched LoRA (SGMV layout) and their launchers.

Same contracts as reference_backward; same grid discipline as triton_sgmv: every grid is
(tiles, slices, num_slots) and depends on the shapes of the step only, a program finds its
segment through LoRABatch.seg_* and exits at once when the segment is empty or its tile
lies past the segment or the slot's real rank. Loads past a rank are masked, never read.

Four kernels:
    grad_v: dv = dy_s B_s per slice (a shrink by B), tiles of (tokens x rank);
    grad_x: dx = dv A, tiles of (tokens x in_features), reduced over slices and rank;
    grad_a: dA = dv^T x, tiles of (rank x in_features), reduced over the segment's tokens;
    grad_b: dB_s = dy_s^T v_s, tiles of (slice columns x rank), reduced over the tokens.
Each slot has exactly one segment per step, so one program owns each tile of dA and dB
and reduces over all of the segment's tokens itself: no atomics, and the result does not
depend on the scheduling. Products run in the activations' dtype (x's, which dy shares),
as the forward shrink does, so float32 master weights are cast per tile; every
accumulation is float32.
"""

import triton
import triton.language as tl
import torch
from torch import Tensor

from .batch import LoRABatch, LoRAWeights
from .triton_sgmv import _block, _block_m, _precision


@triton.jit
def _grad_v_kernel(
    dy_ptr, b_ptr, dv_ptr, ranks_ptr, sorted_ptr, seg_slots_ptr, seg_starts_ptr, seg_lens_ptr,
    slice_starts_ptr, slice_widths_ptr,
    stride_dyt, stride_dyn, stride_bs, stride_bn, stride_br, stride_dvt, stride_dvr,
    MAX_RANK: tl.constexpr, NUM_R_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_slice = tl.program_id(1)
    pid_seg = tl.program_id(2)
    slot = tl.load(seg_slots_ptr + pid_seg)
    if slot < 0:
        return
    seg_len = tl.load(seg_lens_ptr + pid_seg)
    pid_r = pid % NUM_R_TILES
    pid_m = pid // NUM_R_TILES
    rank = tl.load(ranks_ptr + slot)
    if pid_m * BLOCK_M >= seg_len or pid_r * BLOCK_R >= rank:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < seg_len
    seg_start = tl.load(seg_starts_ptr + pid_seg)
    tokens = tl.load(sorted_ptr + seg_start + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    col0 = tl.load(slice_starts_ptr + pid_slice)
    width = tl.load(slice_widths_ptr + pid_slice)
    dy_rows = dy_ptr + tokens[:, None] * stride_dyt
    b_cols = b_ptr + slot.to(tl.int64) * stride_bs + offs_r[None, :] * stride_br

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, width, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < width
        cols = col0 + offs_n
        dy = tl.load(dy_rows + cols[None, :] * stride_dyn, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        b = tl.load(b_cols + cols[:, None] * stride_bn, mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        acc = tl.dot(dy, b.to(dy.dtype), acc, input_precision=PRECISION)

    dv = dv_ptr + tokens[:, None] * stride_dvt + (pid_slice * MAX_RANK + offs_r)[None, :] * stride_dvr
    tl.store(dv, acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _grad_x_kernel(
    dv_ptr, a_ptr, dx_ptr, ranks_ptr, sorted_ptr, seg_slots_ptr, seg_starts_ptr, seg_lens_ptr,
    in_features,
    stride_dvt, stride_dvr, stride_as, stride_ar, stride_ak, stride_dxt, stride_dxk,
    MAX_RANK: tl.constexpr, NUM_SLICES: tl.constexpr, NUM_K_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program per (token tile, in_features tile) of a segment; it reduces over every
    slice, so the grid's slice axis is 1. Rank 0 still writes its tokens' (zero) rows."""
    pid = tl.program_id(0)
    pid_seg = tl.program_id(2)
    slot = tl.load(seg_slots_ptr + pid_seg)
    if slot < 0:
        return
    seg_len = tl.load(seg_lens_ptr + pid_seg)
    pid_k = pid % NUM_K_TILES
    pid_m = pid // NUM_K_TILES
    if pid_m * BLOCK_M >= seg_len:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < seg_len
    seg_start = tl.load(seg_starts_ptr + pid_seg)
    tokens = tl.load(sorted_ptr + seg_start + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < in_features
    rank = tl.load(ranks_ptr + slot)
    dv_rows = dv_ptr + tokens[:, None] * stride_dvt
    a_cols = a_ptr + slot.to(tl.int64) * stride_as + offs_k[None, :] * stride_ak

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for s in range(NUM_SLICES):
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < rank
            rows = s * MAX_RANK + offs_r
            dv = tl.load(dv_rows + rows[None, :] * stride_dvr, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            a = tl.load(a_cols + rows[:, None] * stride_ar, mask=mask_r[:, None] & mask_k[None, :], other=0.0)
            acc = tl.dot(dv.to(dx_ptr.dtype.element_ty), a.to(dx_ptr.dtype.element_ty), acc,
                         input_precision=PRECISION)

    dx = dx_ptr + tokens[:, None] * stride_dxt + offs_k[None, :] * stride_dxk
    tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


@triton.jit
def _grad_a_kernel(
    dv_ptr, x_ptr, da_ptr, ranks_ptr, sorted_ptr, seg_slots_ptr, seg_starts_ptr, seg_lens_ptr,
    in_features,
    stride_dvt, stride_dvr, stride_xt, stride_xk, stride_das, stride_dar, stride_dak,
    MAX_RANK: tl.constexpr, NUM_K_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_slice = tl.program_id(1)
    pid_seg = tl.program_id(2)
    slot = tl.load(seg_slots_ptr + pid_seg)
    if slot < 0:
        return
    pid_k = pid % NUM_K_TILES
    pid_r = pid // NUM_K_TILES
    rank = tl.load(ranks_ptr + slot)
    if pid_r * BLOCK_R >= rank:
        return

    seg_len = tl.load(seg_lens_ptr + pid_seg)
    seg_start = tl.load(seg_starts_ptr + pid_seg)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    rows = pid_slice * MAX_RANK + offs_r
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < in_features

    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, seg_len, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < seg_len
        tokens = tl.load(sorted_ptr + seg_start + offs_m, mask=mask_m, other=0).to(tl.int64)
        dv = tl.load(dv_ptr + tokens[:, None] * stride_dvt + rows[None, :] * stride_dvr,
                     mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        x = tl.load(x_ptr + tokens[:, None] * stride_xt + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(tl.trans(dv.to(x.dtype)), x, acc, input_precision=PRECISION)

    da = da_ptr + slot.to(tl.int64) * stride_das + rows[:, None] * stride_dar + offs_k[None, :] * stride_dak
    tl.store(da, acc.to(da_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_k[None, :])


@triton.jit
def _grad_b_kernel(
    dy_ptr, v_ptr, db_ptr, ranks_ptr, sorted_ptr, seg_slots_ptr, seg_starts_ptr, seg_lens_ptr,
    slice_starts_ptr, slice_widths_ptr,
    stride_dyt, stride_dyn, stride_vt, stride_vr, stride_dbs, stride_dbn, stride_dbr,
    MAX_RANK: tl.constexpr, NUM_R_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_slice = tl.program_id(1)
    pid_seg = tl.program_id(2)
    slot = tl.load(seg_slots_ptr + pid_seg)
    if slot < 0:
        return
    pid_r = pid % NUM_R_TILES
    pid_n = pid // NUM_R_TILES
    width = tl.load(slice_widths_ptr + pid_slice)
    rank = tl.load(ranks_ptr + slot)
    if pid_n * BLOCK_N >= width or pid_r * BLOCK_R >= rank:
        return

    seg_len = tl.load(seg_lens_ptr + pid_seg)
    seg_start = tl.load(seg_starts_ptr + pid_seg)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < width
    cols = tl.load(slice_starts_ptr + pid_slice) + offs_n
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank

    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for m0 in range(0, seg_len, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < seg_len
        tokens = tl.load(sorted_ptr + seg_start + offs_m, mask=mask_m, other=0).to(tl.int64)
        dy = tl.load(dy_ptr + tokens[:, None] * stride_dyt + cols[None, :] * stride_dyn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        v = tl.load(v_ptr + tokens[:, None] * stride_vt + (pid_slice * MAX_RANK + offs_r)[None, :] * stride_vr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        acc = tl.dot(tl.trans(dy), v.to(dy.dtype), acc, input_precision=PRECISION)

    db = db_ptr + slot.to(tl.int64) * stride_dbs + cols[:, None] * stride_dbn + offs_r[None, :] * stride_dbr
    tl.store(db, acc.to(db_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_r[None, :])


def _block_r(max_rank: int) -> int:
    return _block(max_rank, 16, 32)


def grad_v_into(dy: Tensor, w: LoRAWeights, batch: LoRABatch, dv: Tensor) -> None:
    """Write dv[t, s * max_rank + j] for tokens with an adapter and j < their slot's rank.

    dy: [T, N]; dv: [T, S * max_rank] float32. Other elements of dv are not written.
    """
    num_tokens = batch.num_tokens
    if num_tokens == 0:
        return
    block_m, block_r = _block_m(num_tokens), _block_r(w.max_rank)
    num_r_tiles = triton.cdiv(w.max_rank, block_r)
    grid = (triton.cdiv(num_tokens, block_m) * num_r_tiles, w.num_slices, w.num_slots)
    _grad_v_kernel[grid](
        dy, w.b, dv, w.slot_ranks, batch.sorted_tokens, batch.seg_slots, batch.seg_starts, batch.seg_lens,
        w.slice_starts, w.slice_widths,
        dy.stride(0), dy.stride(1), w.b.stride(0), w.b.stride(1), w.b.stride(2), dv.stride(0), dv.stride(1),
        MAX_RANK=w.max_rank, NUM_R_TILES=num_r_tiles, BLOCK_M=block_m, BLOCK_N=_block(max(w.out_slices), 16, 64),
        BLOCK_R=block_r, PRECISION=_precision(dy.dtype),
    )


def grad_v(dy: Tensor, w: LoRAWeights, batch: LoRABatch) -> Tensor:
    """Same contract as reference_backward.grad_v: dv [T, S * max_rank] float32, zero elsewhere."""
    dv = torch.zeros((batch.num_tokens, w.num_slices * w.max_rank), dtype=torch.float32, device=dy.device)
    grad_v_into(dy, w, batch, dv)
    return dv


def grad_x_into(dv: Tensor, w: LoRAWeights, batch: LoRABatch, dx: Tensor) -> None:
    """Write dx[t] for every token with an adapter (zero where its slot's rank is 0).

    dv: [T, S * max_rank] (columns past a rank are not read); dx: [T, in_features] in x's
    dtype, the dtype its products run in. Rows of tokens without an adapter are not written.
    """
    num_tokens = batch.num_tokens
    if num_tokens == 0:
        return
    block_m, block_k = _block_m(num_tokens), _block(w.in_features, 16, 128)
    num_k_tiles = triton.cdiv(w.in_features, block_k)
    grid = (triton.cdiv(num_tokens, block_m) * num_k_tiles, 1, w.num_slots)
    _grad_x_kernel[grid](
        dv, w.a, dx, w.slot_ranks, batch.sorted_tokens, batch.seg_slots, batch.seg_starts, batch.seg_lens,
        w.in_features,
        dv.stride(0), dv.stride(1), w.a.stride(0), w.a.stride(1), w.a.stride(2), dx.stride(0), dx.stride(1),
        MAX_RANK=w.max_rank, NUM_SLICES=w.num_slices, NUM_K_TILES=num_k_tiles,
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=_block_r(w.max_rank), PRECISION=_precision(dx.dtype),
    )


def grad_x(dv: Tensor, w: LoRAWeights, batch: LoRABatch, dtype: torch.dtype) -> Tensor:
    """Same contract as reference_backward.grad_x: dx [T, in_features] in dtype, zero rows
    for tokens without an adapter."""
    dx = torch.zeros((batch.num_tokens, w.in_features), dtype=dtype, device=dv.device)
    grad_x_into(dv, w, batch, dx)
    return dx


def grad_a_into(dv: Tensor, x: Tensor, w: LoRAWeights, batch: LoRABatch, da: Tensor) -> None:
    """Write da[slot, s * max_rank + j] for the slots with tokens in the step and j < their rank.

    dv: [T, S * max_rank], x: [T, in_features]; da: like w.a. Other elements are not written.
    """
    if batch.num_tokens == 0:
        return
    block_k, block_r = _block(w.in_features, 16, 128), _block_r(w.max_rank)
    num_k_tiles = triton.cdiv(w.in_features, block_k)
    grid = (triton.cdiv(w.max_rank, block_r) * num_k_tiles, w.num_slices, w.num_slots)
    _grad_a_kernel[grid](
        dv, x, da, w.slot_ranks, batch.sorted_tokens, batch.seg_slots, batch.seg_starts, batch.seg_lens,
        w.in_features,
        dv.stride(0), dv.stride(1), x.stride(0), x.stride(1), da.stride(0), da.stride(1), da.stride(2),
        MAX_RANK=w.max_rank, NUM_K_TILES=num_k_tiles,
        BLOCK_M=_block_m(batch.num_tokens), BLOCK_K=block_k, BLOCK_R=block_r, PRECISION=_precision(x.dtype),
    )


def grad_a(dv: Tensor, x: Tensor, w: LoRAWeights, batch: LoRABatch) -> Tensor:
    """Same contract as reference_backward.grad_a: da like w.a, zero for slots without tokens
    and rows past a rank."""
    da = torch.zeros_like(w.a, memory_format=torch.contiguous_format)
    grad_a_into(dv, x, w, batch, da)
    return da


def grad_b_into(dy: Tensor, v: Tensor, w: LoRAWeights, batch: LoRABatch, db: Tensor) -> None:
    """Write db[slot, n, j] for the slots with tokens in the step, every n and j < their rank.

    dy: [T, N], v: [T, S * max_rank]; db: like w.b. Other elements are not written.
    """
    if batch.num_tokens == 0:
        return
    block_n, block_r = _block(max(w.out_slices), 16, 64), _block_r(w.max_rank)
    num_r_tiles = triton.cdiv(w.max_rank, block_r)
    grid = (triton.cdiv(max(w.out_slices), block_n) * num_r_tiles, w.num_slices, w.num_slots)
    _grad_b_kernel[grid](
        dy, v, db, w.slot_ranks, batch.sorted_tokens, batch.seg_slots, batch.seg_starts, batch.seg_lens,
        w.slice_starts, w.slice_widths,
        dy.stride(0), dy.stride(1), v.stride(0), v.stride(1), db.stride(0), db.stride(1), db.stride(2),
        MAX_RANK=w.max_rank, NUM_R_TILES=num_r_tiles,
        BLOCK_M=_block_m(batch.num_tokens), BLOCK_N=block_n, BLOCK_R=block_r, PRECISION=_precision(dy.dtype),
    )


def grad_b(dy: Tensor, v: Tensor, w: LoRAWeights, batch: LoRABatch) -> Tensor:
    """Same contract as reference_backward.grad_b: db like w.b, zero for slots without tokens
    and columns past a rank."""
    db = torch.zeros_like(w.b, memory_format=torch.contiguous_format)
    grad_b_into(dy, v, w, batch, db)
    return db
