"""The C batched-LoRA kernel for CPU serving (sgmv_cpu.c), and the slot load in one call:
built on first use, called through ctypes.

On 2 cores a decode step's 120 LoRA calls through torch cost 7-27 small ops each (MKL's
small GEMMs, casts, gathers, index_add_), and the step with one adapter ran at ~0.73x of the
base, with 8 at ~0.63x. The C kernel does a call in one pass over the weights, in torch's
OpenMP team (bench/lora_serving.py measures it). A slot load through torch was ~8 ms per
SmolLM2 adapter (420 copies, B transposed element by element); load_slot does it in ~3.7.

Built once per machine by kernels/native_build.py. Without a compiler, or where the build
fails, lora_delta returns False and the torch reference serves (the same results to float32
rounding). TANDEM_NATIVE_LORA=0 turns it off.
"""

import ctypes
import functools
import weakref
from pathlib import Path

import torch
from torch import Tensor

from .. import native_build
from . import reference
from .batch import LoRABatch, LoRAWeights

SOURCE = Path(__file__).with_name("sgmv_cpu.c")
_DTYPES = (torch.float32, torch.bfloat16)
# Segments longer than this go to torch, whose GEMMs (oneDNN, MKL) win on long ones: over one
# SmolLM2 layer's four calls (2 Zen 4 cores, bf16) the kernel took 0.83x torch's time at 256
# rows of one adapter and 1.07x at 384 (a 512-row prefill chunk: 1.2x); 0.3-0.7x up to 128
# rows. Where the kernel runs long segments on AMX tiles it takes them all: on a 2-core Xeon
# (Emerald Rapids) it took 0.19-0.25x torch's time from 16 to 1024 rows (_segment_rows).
MAX_SEGMENT_ROWS = 320
AMX_SEGMENT_ROWS = 1 << 30
_AVX512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")


@functools.cache
def library(floor: int = 0) -> ctypes.CDLL | None:
    """The kernel's library, built if this machine has none yet; None where it cannot be.
    floor: 1 or 2 build variants for bench/lora_floor.py whose calls do nothing, or only read
    the weights each item would."""
    lib = native_build.build(SOURCE, "TANDEM_NATIVE_LORA", (f"TANDEM_LORA_FLOOR={floor}",) if floor else ())
    if lib is None:
        return None
    fn = lib.tandem_lora_sgmv
    p = ctypes.c_void_p
    fn.argtypes = [p, p, ctypes.c_int, ctypes.POINTER(_Pool), ctypes.POINTER(_Step)]
    fn.restype = ctypes.c_int
    lib.tandem_lora_load.argtypes = [ctypes.POINTER(_Slice), ctypes.c_int, ctypes.c_int]
    lib.tandem_lora_load.restype = None
    for fn in (lib.tandem_lora_amx, lib.tandem_lora_avx2_f32):
        fn.argtypes = []
        fn.restype = ctypes.c_int
    return lib


def serves(x: Tensor, w: LoRAWeights, y: Tensor) -> bool:
    """Whether lora_delta sends this call here on this CPU: every call where it has AVX-512;
    without, only float32 ones, which take the kernel's 8-lane loops. Its 16-lane loops
    compile there to register pairs passed through the stack (a token's broadcast built from
    16 scalar stores): on a 2-core Zen 3 EPYC (AVX2) a SmolLM2 gate_up call took 2.8-10x the
    torch path's time at 1-32 tokens and 1-32 adapters (bfloat16 2-3.7x), where the 8-lane
    float32 loops take 0.25-0.4x (1 token: 24 against ~90 us; 32 tokens of 8 adapters: 118
    against ~290)."""
    return _AVX512 or (_avx2_f32() and x.dtype == w.a.dtype == y.dtype == torch.float32)


def serves_bf16() -> bool:
    """Whether bfloat16 calls come here on this CPU (with AVX-512 and the library built)."""
    return _AVX512 and library() is not None


def serves_float32() -> bool:
    """Whether float32 calls come here on this CPU (AVX-512, or AVX2's 8-lane loops)."""
    return serves_bf16() or _avx2_f32()


@functools.cache
def _avx2_f32() -> bool:
    lib = library()
    return lib is not None and lib.tandem_lora_avx2_f32() == 1


def applies(x: Tensor, w: LoRAWeights, batch: LoRABatch, y: Tensor) -> bool:
    """Whether the kernel can take this call: CPU tensors, x [T, in_features] and y [T,
    out_features] float32 or bfloat16 with contiguous rows, outside autograd, a float32 or
    bfloat16 pool whose b is stored transposed ([slots, max_rank, >= N] in memory, as the CPU
    slot pool keeps it), and a batch of T tokens on the CPU."""
    return _call_args(x, w, batch, y) is not None


class _Pool(ctypes.Structure):
    """sgmv_cpu.c's struct tandem_lora_pool."""

    _fields_ = [
        ("a", ctypes.c_void_p), ("bt", ctypes.c_void_p), ("ranks", ctypes.c_void_p), ("widths", ctypes.c_void_p),
        ("fin", ctypes.c_int64), ("N", ctypes.c_int64), ("ldb", ctypes.c_int64), ("w_bf16", ctypes.c_int32), ("S", ctypes.c_int32),
        ("R", ctypes.c_int32),
    ]


class _Step(ctypes.Structure):
    """sgmv_cpu.c's struct tandem_lora_step."""

    _fields_ = [
        ("seg_slot", ctypes.c_void_p), ("seg_start", ctypes.c_void_p), ("seg_len", ctypes.c_void_p),
        ("sorted", ctypes.c_void_p), ("nseg", ctypes.c_int32), ("max_len", ctypes.c_int32),
    ]


class _Slice(ctypes.Structure):
    """sgmv_cpu.c's struct tandem_lora_slice."""

    _fields_ = [
        ("a", ctypes.c_void_p), ("b", ctypes.c_void_p), ("a_dst", ctypes.c_void_p), ("bt_dst", ctypes.c_void_p),
        ("fin", ctypes.c_int64), ("w", ctypes.c_int64), ("r", ctypes.c_int64), ("n", ctypes.c_int64), ("scale", ctypes.c_float),
    ]


# The call's dtypes argument: bit 0 for a bfloat16 x, bit 1 for a bfloat16 y.
_DTYPE_BITS = {
    (x, y): (x == torch.bfloat16) | (y == torch.bfloat16) << 1 for x in (torch.float32, torch.bfloat16)
    for y in (torch.float32, torch.bfloat16)
}

# The served path makes ~120 calls a step, and every Python attribute read of a tensor costs
# ~0.15 us on the CPUs we serve from: what can be settled once is, per pool and per step.
# A pool's struct, made once per LoRAWeights (its tensors stay put: slots are written in
# place) and dropped with it, with its in/out features; None where the kernel cannot take
# it. Keyed by id, with the tensors it was made from: a call checks them by identity (a
# field may be replaced; the entry then holds the old tensor until the next call).
_pools: dict[int, tuple] = {}


def _pool_args(w: LoRAWeights) -> tuple | None:
    """(pool struct, in_features, out_features, slots) for w, or None."""
    entry = _pools.get(id(w))
    if entry is not None and entry[0] is w.a and entry[1] is w.b and entry[2] is w.slot_ranks and entry[3] is w.slice_widths:
        return entry[4]
    fits = (
        all(t.device.type == "cpu" for t in (w.a, w.b, w.slot_ranks, w.slice_widths)) and w.a.dtype in _DTYPES
        and w.b.dtype == w.a.dtype and w.a.is_contiguous() and _rows_of_b(w.b) is not None
    )
    args = (_Pool(
        w.a.data_ptr(), w.b.data_ptr(), w.slot_ranks.data_ptr(), w.slice_widths.data_ptr(), w.in_features,
        w.out_features, _rows_of_b(w.b), w.a.dtype == torch.bfloat16, w.num_slices, w.max_rank,
    ), w.in_features, w.out_features, w.a.shape[0]) if fits else None
    if entry is None:
        weakref.finalize(w, _pools.pop, id(w), None)
    _pools[id(w)] = (w.a, w.b, w.slot_ranks, w.slice_widths, args)
    return args


# The latest batches' structs, token counts and segments past their limit, newest first:
# a step's ~120 calls share one LoRABatch, and a co-served step alternates between a few
# (inference rows, training rows), which one remembered batch rebuilt at every call.
_recent_batches: list[tuple[weakref.ref, int, tuple | None]] = []
RECENT_BATCHES = 4


@functools.cache
def _amx() -> bool:
    """Whether the built kernel runs on AMX tiles here (compiled with them, and the kernel let
    this process use them): a CPU that has them is not enough."""
    lib = library()
    return lib is not None and lib.tandem_lora_amx() == 1


def _segment_rows(x: Tensor, w: LoRAWeights) -> int:
    """The longest segment the kernel takes in this call: all of them where it runs long ones
    on AMX tiles (bfloat16 x and weights, as the kernel requires), else MAX_SEGMENT_ROWS.
    Keyed on the CPU alone, float32 serving on an AMX host sent 2k-token prompts through the
    kernel's small blocks, which lose to torch past ~320 rows."""
    return AMX_SEGMENT_ROWS if x.dtype == w.a.dtype == torch.bfloat16 and _amx() else MAX_SEGMENT_ROWS


def _batch_args(batch: LoRABatch, max_rows: int) -> tuple | None:
    """(step struct, tokens, segments past max_rows, its highest slot + 1) for batch, or None."""
    for ref, rows, args in _recent_batches:
        if ref() is batch and rows == max_rows:
            return args
    args = (_Step(
        batch.seg_slots.data_ptr(), batch.seg_starts.data_ptr(), batch.seg_lens.data_ptr(),
        batch.sorted_tokens.data_ptr(), len(batch.segments), max_rows,
    ), batch.num_tokens, [s for s in batch.segments if s.length > max_rows], max((s.slot + 1 for s in batch.segments), default=0),
    ) if batch.sorted_tokens.is_cpu else None
    _recent_batches.insert(0, (weakref.ref(batch), max_rows, args))
    del _recent_batches[RECENT_BATCHES:]
    return args


def _rows_of_b(b: Tensor) -> int | None:
    """The elements from one rank row of b's storage to the next where b [slots, N, R] is the
    transposed view of [slots, R, row >= N] storage (slot_pool.b_pool's layout), else None."""
    slots, n, rank = b.shape
    # A dimension of size 1 may carry any stride.
    row = b.stride(2) if rank > 1 else b.stride(0) if slots > 1 else n
    fits = (b.stride(1) == 1 or n == 1) and row >= n and (slots == 1 or b.stride(0) == rank * row)
    return row if fits else None


def _call_args(x: Tensor, w: LoRAWeights, batch: LoRABatch, y: Tensor) -> tuple | None:
    """(dtypes, pool struct, step args) for a call the kernel can take, else None."""
    pool, step = _pool_args(w), _batch_args(batch, _segment_rows(x, w))
    dtypes = _DTYPE_BITS.get((x.dtype, y.dtype))
    if pool is None or step is None or dtypes is None:
        return None
    xs, ys = x.shape, y.shape
    # The kernel reads each segment's slot where the pool's pointers say: a batch grouped for
    # a larger pool would read past this one (torch's path raises an IndexError instead).
    if not (xs == (step[1], pool[1]) and ys == (step[1], pool[2]) and x.is_contiguous() and y.is_contiguous()
            and x.is_cpu and y.is_cpu and step[3] <= pool[3]) or x.requires_grad or y.requires_grad:
        return None
    return dtypes, pool[0], step


def lora_delta(x: Tensor, w: LoRAWeights, batch: LoRABatch, y: Tensor) -> bool:
    """y += LoRA(x) for every token with an adapter, in place, if the kernel applies (see
    applies) and is built (segments past _segment_rows through the torch reference);
    False, with y untouched, otherwise."""
    args = _call_args(x, w, batch, y)
    lib = library()
    if args is None or lib is None:
        return False
    dtypes, pool, (step, _, long_segments, _) = args
    if batch.num_lora_tokens and lib.tandem_lora_sgmv(x.data_ptr(), y.data_ptr(), dtypes, pool, step):
        raise MemoryError("the native LoRA kernel could not allocate its scratch memory")
    for segment in long_segments:
        reference.add_segment(x, w, batch, segment, y)
    return True


def _fits(w: LoRAWeights, slot: int, s: int, col: int, a: Tensor, b: Tensor) -> bool:
    """Whether a [r, fin] and b [width, r] fit slice s of slot `slot` at column col: the kernel
    writes where the pointers say, where torch's copies would raise."""
    rank = a.shape[0]
    return (0 <= slot < w.a.shape[0] and 0 <= s < w.num_slices and rank <= w.max_rank and a.shape[1] == w.in_features
            and b.shape[1] == rank and 0 <= col and col + b.shape[0] <= w.b.shape[1])


def load_slot(slot: int, slices: list[tuple[LoRAWeights, int, int, Tensor, Tensor, float]]) -> bool:
    """Copy an adapter into slot `slot` of its pools in one call: per slice (pool, slice index,
    its first output column, a [r, fin], b [w, r], scale), a and b float32 and contiguous on
    the CPU, b scaled into the pool's transposed b, every value rounded once into the pool's
    dtype as torch's copies round it. False, with nothing written, where the kernel cannot
    take them (the caller copies through torch)."""
    if not slices or not slices[0][0].a.is_cpu or (lib := library()) is None:
        return False
    dtype = slices[0][0].a.dtype
    structs, dst_of = [], {}
    for w, s, col, a, b, scale in slices:
        dst = dst_of.get(id(w))
        if dst is None:
            if _pool_args(w) is None or w.a.dtype != dtype:
                return False
            item, rows, fin, n = w.a.element_size(), w.max_rank, w.in_features, _rows_of_b(w.b)
            # Slot `slot`'s A rows, and its B^T (b's storage is [slots, max_rank, n >= N]).
            dst = dst_of[id(w)] = (w.a.data_ptr() + slot * w.num_slices * rows * fin * item, rows * fin * item,
                                   w.b.data_ptr() + slot * rows * n * item, item, fin, n)
        if not (_is_cpu_float32_rows(a) and _is_cpu_float32_rows(b) and _fits(w, slot, s, col, a, b)):
            return False
        a_dst, slice_bytes, bt_dst, item, fin, n = dst
        structs.append(_Slice(a.data_ptr(), b.data_ptr(), a_dst + s * slice_bytes, bt_dst + col * item, fin, b.shape[0], a.shape[0], n, scale))
    lib.tandem_lora_load((_Slice * len(structs))(*structs), len(structs), dtype == torch.bfloat16)
    # Written behind torch's back: bump the pools' versions as its copies would, or whatever
    # is cached by version (a mixture's stacked weights) goes on serving the evicted adapter.
    written = {id(w): w for w, *_ in slices}.values()
    torch.autograd.graph.increment_version([t for w in written for t in (w.a, w.b)])
    return True


def _is_cpu_float32_rows(t: Tensor) -> bool:
    return t.is_cpu and t.dtype == torch.float32 and t.dim() == 2 and t.is_contiguous()
