"""Plain-torch batched LoRA: the Triton kernels' twin, the oracle of the C kernel
(native_cpu.py), and the CPU path for every call that kernel does not take.

One loop over the segments (adapters present in the step), never over tokens: each segment
is one shrink matmul for all slices at once and one expand, trimmed to the slot's real rank.
Rows are gathered once with index_select and the deltas scattered once with index_add_.
Segment bounds and ranks come from host copies, so nothing here syncs with a device.

On CPU each small op costs ~5 us whatever its size, so lora_delta follows the batch's
CPU plan instead: the short segments (decode tokens) run as one bmm pair over a padded
[slots, tokens] grid, 2-4x faster than a matmul pair per segment for 8-64 adapters x 1-10
tokens each (SmolLM2 shapes, two threads), and only long segments (prefill chunks) run on
their own.

Small matmuls run in float32 even for bf16/fp16 inputs: on the CPUs we serve from, a
4 x 576 x 48 matmul takes ~4 us in fp32 and ~14 us in bf16, and the serving pool is
float32 on CPU. Large ones (prefill chunks) run in the activations' half precision, the
pool's weights converted per call: there float32 costs 3x more (see _matmul_dtype).
"""

import torch
from torch import Tensor

from .batch import Grid, LoRABatch, LoRAPairs, LoRAWeights, Loose, Segment, loose_segment

# When to multiply in the activations' half precision instead of float32 (measured on
# SmolLM2 shapes, two threads): with a half-precision pool past 32 rows; with a float32 pool,
# whose weights are then converted on every call, from 128 rows with at least 32 per weight
# matrix (a 512-token prefill chunk: 3.2x faster; a decode grid of 8 x 4 tokens: slower).
_HALF_POOL_MIN_ROWS = 33
_FP32_POOL_MIN_ROWS, _FP32_POOL_MIN_ROWS_PER_MATRIX = 128, 32


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def lora_rows(t: Tensor, batch: LoRABatch) -> Tensor:
    """[num_lora_tokens, ...]: t's rows of the tokens with an adapter, in sorted order; a view
    (no copy) when they are consecutive rows."""
    first, n = batch.first_lora_token, batch.num_lora_tokens
    return t[first : first + n] if first is not None else t.index_select(0, batch.sorted_tokens[:n])


def put_lora_rows(out: Tensor, batch: LoRABatch, values: Tensor, accumulate: bool = False) -> None:
    """out[rows of the tokens with an adapter] = values (+= with accumulate), values in sorted order."""
    first, n = batch.first_lora_token, batch.num_lora_tokens
    values = values.to(out.dtype)
    if first is None:
        index = batch.sorted_tokens[:n]
        out.index_add_(0, index, values) if accumulate else out.index_copy_(0, index, values)
    elif accumulate:
        out[first : first + n] += values
    else:
        out[first : first + n] = values


def _shrink_segment(xs: Tensor, a_slot: Tensor, rank: int, w: LoRAWeights) -> Tensor:
    """xs [n, in] (compute dtype), a_slot [S * max_rank, in] -> [n, S, rank]."""
    num_slices, in_features = w.num_slices, w.in_features
    a_r = a_slot.view(num_slices, w.max_rank, in_features)[:, :rank].to(xs.dtype)
    # Contiguous (a copy only when the rank is trimmed across several slices), so one mm.
    a_r = a_r.reshape(num_slices * rank, in_features)
    return torch.mm(xs, a_r.t()).view(xs.shape[0], num_slices, rank)


def _expand_segment(v: Tensor, b_slot: Tensor, rank: int, w: LoRAWeights) -> Tensor:
    """[n, N]: per-slice v[:, s] @ b_slot[slice rows, :rank].T, for v [n, S, rank].

    One matmul per slice, joined by one cat: cheaper than writing each into a slice of a
    buffer (a strided copy each) from a few tokens up (27 vs 60 us at 32 tokens, q/k/v)."""
    b_r = b_slot[:, :rank].to(v.dtype)
    parts, start = [], 0
    for s, width in enumerate(w.out_slices):
        parts.append(torch.mm(v[:, s], b_r[start : start + width].t()))
        start += width
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def lora_shrink(x: Tensor, w: LoRAWeights, batch: LoRABatch) -> Tensor:
    """v[t, s * max_rank + j] = x[t] . a[slot_t, s * max_rank + j] for j < rank of slot_t.

    x: [T, in_features]. Returns v: [T, S * max_rank] in float32 (float64 for float64 x);
    columns past a slot's rank and rows of tokens without an adapter are zero.
    """
    cdt = _compute_dtype(x.dtype)
    num_slices, max_rank = w.num_slices, w.max_rank
    v = x.new_zeros((batch.num_tokens, num_slices * max_rank), dtype=cdt)
    if batch.num_lora_tokens == 0:
        return v
    xs = lora_rows(x, batch)
    vs = v.new_zeros((batch.num_lora_tokens, num_slices, max_rank))
    for seg in batch.segments:
        rows = slice(seg.start, seg.start + seg.length)
        rank = w.host_ranks[seg.slot]
        mdt = _matmul_dtype(x.dtype, w, seg.length, seg.length)
        vs[rows, :, :rank] = _shrink_segment(xs[rows].to(mdt), w.a[seg.slot], rank, w)
    put_lora_rows(v, batch, vs.view(batch.num_lora_tokens, -1))
    return v


def lora_expand(v: Tensor, w: LoRAWeights, batch: LoRABatch, y: Tensor) -> None:
    """y[t, slice s] += v[t, s * max_rank : s * max_rank + rank] @ b[slot_t, slice s, :rank].T.

    v: [T, S * max_rank] (any float dtype; columns past a rank are not read),
    y: [T, N], updated in place; rows of tokens without an adapter are not touched.
    """
    if batch.num_lora_tokens == 0:
        return
    vs = lora_rows(v, batch).view(batch.num_lora_tokens, w.num_slices, w.max_rank)
    deltas = y.new_zeros((batch.num_lora_tokens, y.shape[1]))
    for seg in batch.segments:
        rows = slice(seg.start, seg.start + seg.length)
        rank = w.host_ranks[seg.slot]
        if rank:
            mdt = _matmul_dtype(y.dtype, w, seg.length, seg.length)
            deltas[rows] = _expand_segment(vs[rows, :, :rank].to(mdt), w.b[seg.slot], rank, w)
    put_lora_rows(y, batch, deltas, accumulate=True)


def lora_delta(x: Tensor, w: LoRAWeights, batch: LoRABatch, y: Tensor) -> None:
    """y += LoRA(x), following the batch's CPU plan.

    x: [T, in_features], y: [T, N] updated in place (rows without an adapter untouched).
    Each of the plan's grids runs as one bmm pair per rank among its segments in w (a rank
    with one segment runs it alone); loose segments (long ones, e.g. prefill chunks) one
    matmul pair each. Slots of rank 0 in w (adapters that leave this linear alone) cost nothing.
    """
    if batch.num_lora_tokens == 0:
        return
    plan = batch.cpu_plan
    loose = plan.loose
    for grid in plan.grids:
        ranks = tuple(w.host_ranks[seg.slot] for seg in grid.segments)
        if len(set(ranks)) == 1:
            if ranks[0]:
                _add_grid(x, w, grid, ranks[0], y)
            continue
        by_rank, alone = plan.by_rank(grid, ranks)
        for rank, sub in by_rank:
            if rank:
                _add_grid(x, w, sub, rank, y)
        loose = loose + alone
    for item in loose:
        if w.host_ranks[item.segment.slot]:
            _delta_loose(x, w, item, y)


def _add_grid(x: Tensor, w: LoRAWeights, grid: Grid, rank: int, y: Tensor) -> None:
    delta = _delta_grid(x, w, grid, rank, _matmul_dtype(x.dtype, w, grid.num_slots * grid.length, grid.length))
    y.index_add_(0, grid.row_tokens, delta.to(y.dtype))


def _matmul_dtype(dtype: torch.dtype, w: LoRAWeights, rows: int, rows_per_matrix: int) -> torch.dtype:
    """For activations of dtype: float32 for small matmuls, their half precision for large
    ones (see the constants)."""
    cdt = _compute_dtype(dtype)
    if dtype not in (torch.bfloat16, torch.float16):
        return cdt
    if w.a.dtype == dtype:
        return dtype if rows >= _HALF_POOL_MIN_ROWS else cdt
    if w.a.dtype == cdt and rows >= _FP32_POOL_MIN_ROWS and rows_per_matrix >= _FP32_POOL_MIN_ROWS_PER_MATRIX:
        return dtype
    return cdt


def _delta_loose(x: Tensor, w: LoRAWeights, item: Loose, y: Tensor) -> None:
    """y[tokens of one segment] += its LoRA delta: one shrink and one expand."""
    seg = item.segment
    rank = w.host_ranks[seg.slot]
    first = item.first_token
    xs = x.index_select(0, item.tokens) if first is None else x[first : first + seg.length]
    v = _shrink_segment(xs.to(_matmul_dtype(x.dtype, w, seg.length, seg.length)), w.a[seg.slot], rank, w)
    delta = _expand_segment(v, w.b[seg.slot], rank, w)
    if first is None:
        y.index_add_(0, item.tokens, delta.to(y.dtype))
    else:
        y[first : first + seg.length] += delta


def add_segment(x: Tensor, w: LoRAWeights, batch: LoRABatch, segment: Segment, y: Tensor) -> None:
    """y[tokens of one segment] += its LoRA delta: one shrink and one expand (the segments a
    caller leaves to torch, e.g. native_cpu's long ones)."""
    if w.host_ranks[segment.slot]:
        _delta_loose(x, w, loose_segment(segment, batch.sorted_tokens, batch.sorted_tokens.device), y)


def _delta_grid(x: Tensor, w: LoRAWeights, grid: Grid, rank: int, cdt: torch.dtype) -> Tensor:
    """[n, N] deltas of the grid's tokens (in grid.rows order), from bmm over the [G, L] grid.

    The slots of the grid that no token uses (between active ones) are computed and thrown
    away; their weights may hold anything. Every used slot has exactly `rank`.
    """
    num_slices, max_rank, in_features = w.num_slices, w.max_rank, w.in_features
    slots = slice(grid.first_slot, grid.first_slot + grid.num_slots)
    xs = x.index_select(0, grid.tokens).to(cdt).view(grid.num_slots, grid.length, in_features)
    a = w.a[slots].view(grid.num_slots, num_slices, max_rank, in_features)[:, :, :rank].to(cdt)
    a = a.reshape(grid.num_slots, num_slices * rank, in_features)
    v = torch.bmm(xs, a.transpose(1, 2)).view(grid.num_slots, grid.length, num_slices, rank)
    b = w.b[slots, :, :rank].to(cdt)
    parts, start = [], 0
    for s, width in enumerate(w.out_slices):
        parts.append(torch.bmm(v[:, :, s], b[:, start : start + width].transpose(1, 2)))
        start += width
    delta = parts[0] if num_slices == 1 else torch.cat(parts, 2)
    return delta.view(grid.num_slots * grid.length, w.out_features).index_select(0, grid.rows)


def lora_delta_pairs(x: Tensor, w: LoRAWeights, pairs: LoRAPairs, y: Tensor) -> None:
    """y[t] += sum_i weight[t, i] * LoRA_slot(t, i)(x[t]) for every pair: one shrink and
    one expand per slot with entries (the same loop over slots as the plain path, never
    one over tokens or pairs), then one weighted index_add_.

    Reads the segment bounds on the host: on CPU tensors (this path's use) that is free.
    """
    lens = pairs.seg_lens.tolist()
    num_entries = sum(lens)
    if num_entries == 0:
        return
    tokens = pairs.sorted_tokens[:num_entries]
    xs = x.index_select(0, tokens)
    deltas = torch.zeros((num_entries, y.shape[1]), dtype=_compute_dtype(y.dtype), device=y.device)
    for slot, (start, length) in enumerate(zip(pairs.seg_starts.tolist(), lens)):
        rank = w.host_ranks[slot]
        if length and rank:
            mdt = _matmul_dtype(x.dtype, w, length, length)
            rows = slice(start, start + length)
            v = _shrink_segment(xs[rows].to(mdt), w.a[slot], rank, w)
            deltas[rows] = _expand_segment(v, w.b[slot], rank, w)
    deltas *= pairs.weights[:num_entries, None].to(deltas.dtype)
    y.index_add_(0, tokens, deltas.to(y.dtype))
