"""Plain-torch gradients of batched LoRA: the Triton backward kernels' twin and the CPU training path.

With v = x A^T (per slice, saved by the forward) and dy the gradient of the delta:
    dv = dy_s B_s           (per slice: a "shrink by B")
    dx = dv A               (reduced over slices and ranks)
    dA = dv^T x,  dB_s = dy_s^T v_s   (per slot, reduced over its segment's tokens)
As in reference.py: one loop over the segments, never over tokens, each segment's work
trimmed to its slot's real rank; the rows with an adapter sliced when consecutive (a
training batch) and gathered once otherwise; segment bounds and ranks read from host
copies, so nothing here syncs with a device. Products run where the forward's do: float32
(float64 for float64 inputs) for small segments, the activations' half precision for
large ones (a training batch in bf16), accumulated into float32 gradients.
"""

from collections.abc import Iterator

import torch
from torch import Tensor

from .batch import LoRABatch, LoRAWeights
from .reference import _compute_dtype, _matmul_dtype, lora_rows, put_lora_rows


def _slices(w: LoRAWeights) -> Iterator[tuple[int, slice]]:
    """(s, output columns of slice s) for each slice."""
    start = 0
    for s, width in enumerate(w.out_slices):
        yield s, slice(start, start + width)
        start += width


def _segments(w: LoRAWeights, batch: LoRABatch) -> Iterator[tuple[slice, int, int]]:
    """(its rows among the sorted tokens, slot, rank) of each segment whose slot has a rank here."""
    for seg in batch.segments:
        rank = w.host_ranks[seg.slot]
        if rank:
            yield slice(seg.start, seg.start + seg.length), seg.slot, rank


def grad_v(dy: Tensor, w: LoRAWeights, batch: LoRABatch) -> Tensor:
    """dv[t, s * max_rank + j] = dy[t, slice s] . b[slot_t, slice s, j] for j < rank of slot_t.

    dy: [T, N]. Returns dv: [T, S * max_rank] in float32 (float64 for float64 dy); columns
    past a slot's rank and rows of tokens without an adapter are zero.
    """
    dv = dy.new_zeros((batch.num_tokens, w.num_slices * w.max_rank), dtype=_compute_dtype(dy.dtype))
    dys = lora_rows(dy, batch)
    dvs = dv.new_zeros((batch.num_lora_tokens, w.num_slices, w.max_rank))
    for rows, slot, rank in _segments(w, batch):
        mdt = _matmul_dtype(dy.dtype, w, rows.stop - rows.start, rows.stop - rows.start)
        b_r = w.b[slot, :, :rank].to(mdt)
        for s, cols in _slices(w):
            dvs[rows, s, :rank] = torch.mm(dys[rows, cols].to(mdt), b_r[cols])
    put_lora_rows(dv, batch, dvs.view(batch.num_lora_tokens, w.num_slices * w.max_rank))
    return dv


def grad_x(dv: Tensor, w: LoRAWeights, batch: LoRABatch, dtype: torch.dtype) -> Tensor:
    """dx[t] = sum over slices s and j < rank of slot_t of dv[t, s * max_rank + j] * a[slot_t, s * max_rank + j].

    dv: [T, S * max_rank] as grad_v returns it (columns past a rank are not read).
    Returns dx: [T, in_features] in dtype (x's); rows of tokens without an adapter are zero.
    """
    dx = dv.new_zeros((batch.num_tokens, w.in_features), dtype=dtype)
    dvs = lora_rows(dv, batch).view(batch.num_lora_tokens, w.num_slices, w.max_rank)
    grads = dv.new_zeros((batch.num_lora_tokens, w.in_features), dtype=dtype)
    for rows, slot, rank in _segments(w, batch):
        mdt = _matmul_dtype(dtype, w, rows.stop - rows.start, rows.stop - rows.start)
        grads[rows] = torch.mm(_trim(dvs[rows], rank).to(mdt), _a_rows(w, slot, rank).to(mdt))
    put_lora_rows(dx, batch, grads)
    return dx


def _trim(dvs: Tensor, rank: int) -> Tensor:
    """[n, S * rank]: the columns of dvs [n, S, max_rank] below the rank, every slice."""
    return dvs[:, :, :rank].reshape(dvs.shape[0], -1)


def _a_rows(w: LoRAWeights, slot: int, rank: int) -> Tensor:
    """[S * rank, in_features]: the rows of a[slot] below the rank, every slice."""
    a = w.a[slot].view(w.num_slices, w.max_rank, w.in_features)[:, :rank]
    return a.reshape(w.num_slices * rank, w.in_features)


def grad_a(dv: Tensor, x: Tensor, w: LoRAWeights, batch: LoRABatch) -> Tensor:
    """da[slot, s * max_rank + j] = sum over the slot's tokens t of dv[t, s * max_rank + j] * x[t], j < rank.

    dv: [T, S * max_rank], x: [T, in_features]. Returns da: like w.a, in its dtype; zero
    for slots without tokens and rows past a slot's rank.
    """
    da = w.a.new_zeros(w.a.shape)
    da_slices = da.view(w.num_slots, w.num_slices, w.max_rank, w.in_features)
    xs = lora_rows(x, batch)
    dvs = lora_rows(dv, batch).view(batch.num_lora_tokens, w.num_slices, w.max_rank)
    for rows, slot, rank in _segments(w, batch):
        mdt = _matmul_dtype(x.dtype, w, rows.stop - rows.start, rows.stop - rows.start)
        da_r = torch.mm(_trim(dvs[rows], rank).to(mdt).t(), xs[rows].to(mdt))
        da_slices[slot, :, :rank] = da_r.view(w.num_slices, rank, w.in_features)
    return da


def grad_b(dy: Tensor, v: Tensor, w: LoRAWeights, batch: LoRABatch) -> Tensor:
    """db[slot, n, j] = sum over the slot's tokens t of dy[t, n] * v[t, s * max_rank + j], n in slice s, j < rank.

    dy: [T, N], v: [T, S * max_rank] as the forward's shrink returns it. Returns db: like
    w.b, in its dtype; zero for slots without tokens and columns past a slot's rank.
    """
    db = w.b.new_zeros(w.b.shape)
    dys = lora_rows(dy, batch)
    vs = lora_rows(v, batch).view(batch.num_lora_tokens, w.num_slices, w.max_rank)
    for rows, slot, rank in _segments(w, batch):
        mdt = _matmul_dtype(dy.dtype, w, rows.stop - rows.start, rows.stop - rows.start)
        for s, cols in _slices(w):
            db[slot, cols, :rank] = torch.mm(dys[rows, cols].to(mdt).t(), vs[rows, s, :rank].to(mdt))
    return db
