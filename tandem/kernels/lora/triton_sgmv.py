"""Triton batched-LoRA kernels (segmented gather matrix-vector, "SGMV") and their launchers.

Every kernel's grid is (tiles of T x tiles of the N or rank dim, slices, segments), the
segments being min(num_slots, T) for a plain batch and num_slots for pairs: it depends on
the shapes of the step, never on its content, so a launch can be captured in a CUDA graph.
A program finds its segment through LoRABatch.seg_*, gathers its tokens' rows through
sorted_tokens, and exits at once when its segment is empty, its token tile lies past the
segment, or its rank tile lies past the slot's real rank.

Three kernels: shrink (v = x A^T per slice, optionally split over K), expand (y += v B^T
per slice, the reduction stopping at the real rank) and, for decode-sized steps, a fused
shrink+expand that keeps each token tile's v on chip. The two-launch path keeps v in
float32 in global memory; every matmul accumulates in float32.
"""

import functools
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import triton
import triton.language as tl
import torch
from torch import Tensor

from .batch import LoRABatch, LoRAPairs, LoRAWeights


@triton.jit
def _add_into(y, delta, mask, weight_ptrs, mask_m, PAIRS: tl.constexpr):
    """y[mask] += delta (float32). A plain batch gives each token one segment, so one program
    owns its rows: load, add, store. With pairs a token's entries sit in several segments,
    i.e. programs running at once: each adds its weighted share atomically (y is float32
    then; the launchers pass a float32 buffer for half-precision outputs)."""
    if PAIRS:
        weight = tl.load(weight_ptrs, mask=mask_m, other=0.0)
        tl.atomic_add(y, delta * weight[:, None], mask=mask)
    else:
        out = tl.load(y, mask=mask, other=0.0).to(tl.float32) + delta
        tl.store(y, out.to(y.dtype.element_ty), mask=mask)


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, v_ptr, ranks_ptr, sorted_ptr, seg_slots_ptr, seg_starts_ptr, seg_lens_ptr,
    in_features,
    stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_vt, stride_vr,
    MAX_RANK: tl.constexpr, NUM_N_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, PRECISION: tl.constexpr, PAIRS: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_slice = tl.program_id(1)
    pid_seg = tl.program_id(2)
    slot = tl.load(seg_slots_ptr + pid_seg)
    if slot < 0:
        return
    seg_len = tl.load(seg_lens_ptr + pid_seg)
    pid_k = pid % SPLIT_K
    pid_n = (pid // SPLIT_K) % NUM_N_TILES
    pid_m = pid // (SPLIT_K * NUM_N_TILES)
    rank = tl.load(ranks_ptr + slot)
    if pid_m * BLOCK_M >= seg_len or pid_n * BLOCK_N >= rank:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < seg_len
    seg_start = tl.load(seg_starts_ptr + pid_seg)
    tokens = tl.load(sorted_ptr + seg_start + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < rank
    rows = pid_slice * MAX_RANK + offs_n
    x_rows = x_ptr + tokens[:, None] * stride_xt
    a_rows = a_ptr + slot.to(tl.int64) * stride_as + rows[None, :] * stride_ar

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, in_features, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < in_features
        x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        # Rows past the rank are masked, never read: they may hold anything.
        a = tl.load(a_rows + offs_k[:, None] * stride_ak, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(x, a.to(x.dtype), acc, input_precision=PRECISION)

    # Pairs: a token has a row of v per pair, at its entry's position.
    v_row = (seg_start + offs_m).to(tl.int64) if PAIRS else tokens
    v = v_ptr + v_row[:, None] * stride_vt + rows[None, :] * stride_vr
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(v, acc, mask=mask)
    else:
        tl.atomic_add(v, acc, mask=mask)


@triton.jit
def _expand_kernel(
    v_ptr, b_ptr, y_ptr, ranks_ptr, sorted_ptr, seg_slots_ptr, seg_starts_ptr, seg_lens_ptr,
    slice_starts_ptr, slice_widths_ptr, weights_ptr,
    stride_vt, stride_vr, stride_bs, stride_bn, stride_br, stride_yt, stride_yn,
    MAX_RANK: tl.constexpr, NUM_N_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    PAIRS: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_slice = tl.program_id(1)
    pid_seg = tl.program_id(2)
    slot = tl.load(seg_slots_ptr + pid_seg)
    if slot < 0:
        return
    seg_len = tl.load(seg_lens_ptr + pid_seg)
    pid_n = pid % NUM_N_TILES
    pid_m = pid // NUM_N_TILES
    width = tl.load(slice_widths_ptr + pid_slice)
    rank = tl.load(ranks_ptr + slot)
    # Rank 0: the slot's adapter does not touch this linear; y stays as it is.
    if pid_m * BLOCK_M >= seg_len or pid_n * BLOCK_N >= width or rank == 0:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < seg_len
    seg_start = tl.load(seg_starts_ptr + pid_seg)
    tokens = tl.load(sorted_ptr + seg_start + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < width
    cols = tl.load(slice_starts_ptr + pid_slice) + offs_n
    v_row = (seg_start + offs_m).to(tl.int64) if PAIRS else tokens
    v_rows = v_ptr + v_row[:, None] * stride_vt
    b_rows = b_ptr + slot.to(tl.int64) * stride_bs + cols[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # The reduction stops at the slot's real rank, not at max_rank.
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        v = tl.load(v_rows + (pid_slice * MAX_RANK + offs_r)[None, :] * stride_vr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        b = tl.load(b_rows + offs_r[:, None] * stride_br, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(v.to(b.dtype), b, acc, input_precision=PRECISION)

    y = y_ptr + tokens[:, None] * stride_yt + cols[None, :] * stride_yn
    mask = mask_m[:, None] & mask_n[None, :]
    _add_into(y, acc, mask, weights_ptr + seg_start + offs_m, mask_m, PAIRS)


@triton.jit
def _fused_kernel(
    x_ptr, a_ptr, b_ptr, y_ptr, ranks_ptr, sorted_ptr, seg_slots_ptr, seg_starts_ptr, seg_lens_ptr,
    slice_starts_ptr, slice_widths_ptr, weights_ptr,
    in_features,
    stride_xt, stride_xk, stride_as, stride_ar, stride_ak,
    stride_bs, stride_bn, stride_br, stride_yt, stride_yn,
    MAX_RANK: tl.constexpr, NUM_N_GROUPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr, PAIRS: tl.constexpr,
):
    """Shrink and expand in one program: the [BLOCK_M, rank] tile of v never leaves the chip.

    BLOCK_R covers every slot's rank; loads past the slot's rank are masked, so memory traffic is
    proportional to the real rank. Program group g expands the slice's column tiles
    g, g + NUM_N_GROUPS, ...; each group recomputes the (cheap) shrink.
    """
    pid = tl.program_id(0)
    pid_slice = tl.program_id(1)
    pid_seg = tl.program_id(2)
    slot = tl.load(seg_slots_ptr + pid_seg)
    if slot < 0:
        return
    seg_len = tl.load(seg_lens_ptr + pid_seg)
    pid_g = pid % NUM_N_GROUPS
    pid_m = pid // NUM_N_GROUPS
    width = tl.load(slice_widths_ptr + pid_slice)
    rank = tl.load(ranks_ptr + slot)
    if pid_m * BLOCK_M >= seg_len or pid_g * BLOCK_N >= width or rank == 0:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < seg_len
    seg_start = tl.load(seg_starts_ptr + pid_seg)
    tokens = tl.load(sorted_ptr + seg_start + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    slot64 = slot.to(tl.int64)
    x_rows = x_ptr + tokens[:, None] * stride_xt
    a_rows = a_ptr + slot64 * stride_as + (pid_slice * MAX_RANK + offs_r)[None, :] * stride_ar

    v = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < in_features
        x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        a = tl.load(a_rows + offs_k[:, None] * stride_ak, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        v = tl.dot(x, a.to(x.dtype), v, input_precision=PRECISION)

    col0 = tl.load(slice_starts_ptr + pid_slice)
    b_rows = b_ptr + slot64 * stride_bs + offs_r[:, None] * stride_br
    y_rows = y_ptr + tokens[:, None] * stride_yt
    v = v.to(b_ptr.dtype.element_ty)
    for n0 in range(pid_g * BLOCK_N, width, NUM_N_GROUPS * BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < width
        cols = col0 + offs_n
        b = tl.load(b_rows + cols[None, :] * stride_bn, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        delta = tl.dot(v, b, input_precision=PRECISION)
        y = y_rows + cols[None, :] * stride_yn
        mask = mask_m[:, None] & mask_n[None, :]
        _add_into(y, delta, mask, weights_ptr + seg_start + offs_m, mask_m, PAIRS)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 products rather than TF32 ones.
    return "ieee" if dtype == torch.float32 else "tf32"


def _block(n: int, lo: int, hi: int) -> int:
    # Plain Python: triton.next_power_of_2 is a jitted call, ~2 us, and launch_key makes
    # one per LoRA linear per graph step.
    return max(lo, min(hi, 1 << max(n - 1, 0).bit_length()))


def _block_m(num_tokens: int) -> int:
    # Decode-sized steps spread few tokens over many segments: keep the token tile at the
    # tensor-core minimum so a 4-token segment does not pay for a 64-row tile.
    return 16 if num_tokens <= 128 else 64


def _shrink_split_k(num_tokens: int, in_features: int) -> int:
    # Decode-sized steps launch few programs per segment; splitting K keeps SMs busy.
    # Not yet tuned on a GPU.
    if num_tokens > 64:
        return 1
    return max(1, min(8, in_features // 512))


def _entries(batch: LoRABatch | LoRAPairs) -> int:
    """Rows of sorted_tokens: T for a plain batch, T * k for pairs (the bound on a segment)."""
    return batch.sorted_tokens.shape[0]


def _segments(batch: LoRABatch | LoRAPairs, w: LoRAWeights) -> int:
    """The grid's segment dimension. A plain batch lists its active segments first and has
    at most one per row, so min(slots, rows) programs cover them (a decode step of 8 rows in
    a 64-slot pool launched 8x fewer programs than one per slot; the bound depends on shapes
    only). Pairs index their segments by slot: every slot."""
    if isinstance(batch, LoRAPairs):
        return w.num_slots
    return min(w.num_slots, _entries(batch))


def _pair_args(batch: LoRABatch | LoRAPairs) -> tuple[Tensor, bool]:
    """The weights pointer and PAIRS flag (a plain batch passes any tensor; it is never read)."""
    if isinstance(batch, LoRAPairs):
        return batch.weights, True
    return batch.sorted_tokens, False


def shrink_into(
    x: Tensor, w: LoRAWeights, batch: LoRABatch | LoRAPairs, v: Tensor, split_k: int = 1, num_warps: int = 4
) -> None:
    """Write v[t, s * max_rank + j] for tokens with an adapter and j < their slot's rank
    (with pairs: v[e, ...] for each entry e of batch.sorted_tokens, in slot order).

    x: [T, in_features]; v: [T (or T * k), S * max_rank] float32. Other elements are not
    written. With split_k > 1 the partial sums are atomically added, so v must start at zero.
    """
    rows = _entries(batch)
    if rows == 0:
        return
    block_m = _block_m(rows)
    block_n = _block(w.max_rank, 16, 32)
    block_k = _block(w.in_features, 16, 128)
    num_n_tiles = triton.cdiv(w.max_rank, block_n)
    grid = (triton.cdiv(rows, block_m) * num_n_tiles * split_k, w.num_slices, _segments(batch, w))
    _shrink_kernel[grid](
        x, w.a, v, w.slot_ranks, batch.sorted_tokens, batch.seg_slots, batch.seg_starts, batch.seg_lens,
        w.in_features,
        x.stride(0), x.stride(1), w.a.stride(0), w.a.stride(1), w.a.stride(2), v.stride(0), v.stride(1),
        MAX_RANK=w.max_rank, NUM_N_TILES=num_n_tiles, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        SPLIT_K=split_k, PRECISION=_precision(x.dtype), PAIRS=isinstance(batch, LoRAPairs), num_warps=num_warps,
    )


def lora_shrink(x: Tensor, w: LoRAWeights, batch: LoRABatch | LoRAPairs) -> Tensor:
    """Same contract as reference.lora_shrink: v [T, S * max_rank] float32, zero elsewhere
    (with pairs [T * k, ...], a row per entry)."""
    v = torch.zeros((_entries(batch), w.num_slices * w.max_rank), dtype=torch.float32, device=x.device)
    shrink_into(x, w, batch, v, split_k=_shrink_split_k(_entries(batch), w.in_features))
    return v


def lora_expand(
    v: Tensor, w: LoRAWeights, batch: LoRABatch | LoRAPairs, y: Tensor, block_n: int | None = None, num_warps: int = 4
) -> None:
    """Same contract as reference.lora_expand: y [T, N] += per-slice v_s @ b_s[:, :rank].T
    (with pairs weighted by each entry's weight, y float32: adds are atomic). block_n: the
    output column tile (default: the widest slice's, up to 128)."""
    rows = _entries(batch)
    if rows == 0:
        return
    weights, pairs = _pair_args(batch)
    block_m = _block_m(rows)
    block_n = block_n or _block(max(w.out_slices), 16, 128)
    block_r = _block(w.max_rank, 16, 32)
    num_n_tiles = triton.cdiv(max(w.out_slices), block_n)
    grid = (triton.cdiv(rows, block_m) * num_n_tiles, w.num_slices, _segments(batch, w))
    _expand_kernel[grid](
        v, w.b, y, w.slot_ranks, batch.sorted_tokens, batch.seg_slots, batch.seg_starts, batch.seg_lens,
        w.slice_starts, w.slice_widths, weights,
        v.stride(0), v.stride(1), w.b.stride(0), w.b.stride(1), w.b.stride(2), y.stride(0), y.stride(1),
        MAX_RANK=w.max_rank, NUM_N_TILES=num_n_tiles,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, PRECISION=_precision(w.b.dtype), PAIRS=pairs,
        num_warps=num_warps,
    )


def fused_delta(
    x: Tensor, w: LoRAWeights, batch: LoRABatch | LoRAPairs, y: Tensor, num_n_groups: int | None = None,
    block_k: int | None = None, num_warps: int = 4, num_stages: int = 3,
) -> None:
    """y += LoRA(x) in one launch, v kept on chip (decode-sized steps); with pairs, each
    entry's weighted delta, added atomically (y float32).

    Grid (tiles of T x num_n_groups, slices, segments); each program shrinks its token
    tile for its slice (K in steps of block_k), then expands into every num_n_groups-th
    column tile of the slice. The tiling defaults are untuned; DecodeConfig carries tuned ones.
    """
    rows = _entries(batch)
    if rows == 0:
        return
    weights, pairs = _pair_args(batch)
    block_m = _block_m(rows)
    block_n = _block(max(w.out_slices), 16, 64)
    if num_n_groups is None:
        num_n_groups = max(1, min(8, triton.cdiv(max(w.out_slices), 4 * block_n)))
    grid = (triton.cdiv(rows, block_m) * num_n_groups, w.num_slices, _segments(batch, w))
    _fused_kernel[grid](
        x, w.a, w.b, y, w.slot_ranks, batch.sorted_tokens, batch.seg_slots, batch.seg_starts, batch.seg_lens,
        w.slice_starts, w.slice_widths, weights,
        w.in_features,
        x.stride(0), x.stride(1), w.a.stride(0), w.a.stride(1), w.a.stride(2),
        w.b.stride(0), w.b.stride(1), w.b.stride(2), y.stride(0), y.stride(1),
        MAX_RANK=w.max_rank, NUM_N_GROUPS=num_n_groups,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k or _block(w.in_features, 16, 64),
        BLOCK_R=_block(_top_rank(w), 16, 128), PRECISION=_precision(x.dtype), PAIRS=pairs,
        num_warps=num_warps, num_stages=num_stages,
    )


def _top_rank(w: LoRAWeights) -> int:
    """The highest real rank of any slot: the fused kernel's rank tile must cover it, and
    only it. The slots are padded to --max-lora-rank (256 by default), but the adapters in
    them are usually of rank 8-64: tiling by the padding would keep them off the fused path."""
    return w.top_rank


def _fuses(entries: int, w: LoRAWeights) -> bool:
    return entries <= FUSED_MAX_TOKENS and _top_rank(w) <= FUSED_MAX_RANK


# Steps up to this many tokens (or pair entries) take the fused kernel. Chosen without GPU
# measurements: bench/lora_kernels.py on a GPU compares both paths.
FUSED_MAX_TOKENS = 64
# The largest rank tile the fused kernel keeps on chip ([BLOCK_M, rank] of v).
FUSED_MAX_RANK = 128


@dataclass(frozen=True)
class DecodeConfig:
    """How a decode-sized step runs, as bench/lora_tune.py measured best on a device for a
    linear's shape: one fused launch with its tiling, or a shrink split over K then expand."""

    fused: bool
    block_k: int = 64
    num_n_groups: int = 8
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1
    block_n: int = 128  # the two-launch path's expand column tile

    def run(self, x: Tensor, w: LoRAWeights, batch: LoRABatch, y: Tensor) -> None:
        if self.fused:
            fused_delta(x, w, batch, y, self.num_n_groups, self.block_k, self.num_warps, self.num_stages)
        else:
            v = torch.zeros((_entries(batch), w.num_slices * w.max_rank), dtype=torch.float32, device=x.device)
            shrink_into(x, w, batch, v, self.split_k, self.num_warps)
            lora_expand(v, w, batch, y, self.block_n, self.num_warps)


# Per device, the tuned decode configs: TUNED_DIR / "<device name>.json" (spaces as "_"),
# written by bench/lora_tune.py on that device. {"configs": {shape_key: [entries]}}, each
# entry a DecodeConfig's fields plus max_tokens, entries in ascending max_tokens.
TUNED_DIR = Path(__file__).with_name("tuned")


def shape_key(in_features: int, out_slices: tuple[int, ...]) -> str:
    """A linear group's shape as the tuned tables name it: "in_features:out,out,..."."""
    return f"{in_features}:{','.join(map(str, out_slices))}"


def tuned_table_path(device: torch.device) -> Path:
    return TUNED_DIR / f"{torch.cuda.get_device_name(device).replace(' ', '_')}.json"


@functools.cache
def _tuned_tables(device: torch.device) -> dict[str, list[tuple[int, DecodeConfig]]]:
    path = tuned_table_path(device)
    if not path.is_file():
        return {}
    configs = json.loads(path.read_text())["configs"]
    return {
        key: [(e["max_tokens"], DecodeConfig(**{k: v for k, v in e.items() if k != "max_tokens"})) for e in entries]
        for key, entries in configs.items()
    }


def config_entry(config: DecodeConfig, max_tokens: int) -> dict:
    """A tuned table's entry (the inverse of _tuned_tables' reading)."""
    return {"max_tokens": max_tokens, **asdict(config)}


def decode_config(device: torch.device, w: LoRAWeights, num_tokens: int) -> DecodeConfig | None:
    """The tuned config for a step of num_tokens through w on a CUDA device, if its table has
    one (a fused one only where the slots' ranks fit on chip)."""
    if device.type != "cuda":
        return None
    for max_tokens, config in _tuned_tables(device).get(shape_key(w.in_features, w.out_slices), ()):
        if num_tokens <= max_tokens:
            return None if config.fused and _top_rank(w) > FUSED_MAX_RANK else config
    return None


def launch_key(weights: Iterable[LoRAWeights]) -> tuple[int, ...]:
    """What lora_delta decides on the host for a plain step through each of these weight
    groups, besides the step's row count: the fused kernel's rank tile, or 0 where the
    slots' ranks keep the step off the fused kernel. A CUDA graph that recorded the launches
    replays correctly while this is unchanged (slot loads change the ranks)."""
    return tuple(_block(top, 16, 128) if (top := _top_rank(w)) <= FUSED_MAX_RANK else 0 for w in weights)


def lora_delta(x: Tensor, w: LoRAWeights, batch: LoRABatch, y: Tensor) -> None:
    """y += LoRA(x): a decode-sized step as its device's tuned table says, else the fused
    kernel for decode-sized steps, else shrink then expand (two launches, v through global
    memory as float32)."""
    if (config := decode_config(x.device, w, batch.num_tokens)) is not None:
        config.run(x, w, batch, y)
    elif _fuses(batch.num_tokens, w):
        fused_delta(x, w, batch, y)
    else:
        lora_expand(lora_shrink(x, w, batch), w, batch, y)


def lora_delta_pairs(x: Tensor, w: LoRAWeights, pairs: LoRAPairs, y: Tensor) -> None:
    """y[t] += sum_i weight[t, i] * LoRA_slot(t, i)(x[t]) in the launches of a plain step
    (fused, or shrink then expand), never one per expert. The weighted adds are atomic and
    in float32: a half-precision y gets them through a float32 buffer, added once."""
    out = y if y.dtype == torch.float32 else torch.zeros(y.shape, dtype=torch.float32, device=y.device)
    if _fuses(pairs.num_entries, w):
        fused_delta(x, w, pairs, out)
    else:
        lora_expand(lora_shrink(x, w, pairs), w, pairs, out)
    if out is not y:
        y += out.to(y.dtype)
