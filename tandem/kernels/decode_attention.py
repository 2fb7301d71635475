"""Paged decode attention: each decode token's query heads over its sequence's context,
read from the KV cache in place. On CUDA the Triton kernel of decode_attention_triton.py;
on CPU the C kernel of decode_attention_cpu.c, described here.

On a 2-core Zen 5 EPYC, SmolLM2 shapes (9 query over 3 KV heads of 64), bfloat16: in a
decode step of 24 sequences (~180 tokens of context) its 30 calls took 6-7 ms against ~15
for gathering the contexts and SDPA, and the step 31 against 38-43 ms (bench/
decode_attention.py); against a float64 reference its bfloat16 error stays within 1.25x of
SDPA's own (tests/kernels/test_decode_attention.py; below it in every shape measured). On
CPUs with AVX2 and no AVX-512 a variant that keeps its sums in registers serves head sizes
that are multiples of 32: on 2 Zen 3 cores, float32, 1.1-1.4x the generic loop per call
(32 sequences of 200 tokens: 0.78-0.82 against 1.05-1.12 ms), decode steps of 32 sequences
of ~215 tokens 97-117 against 108-142 ms. Built once per machine by kernels/native_build.py;
without it (no compiler, TANDEM_NATIVE_ATTENTION=0), or for what it does not take,
decode_attention returns None and the torch path serves.
"""

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from . import native_build

SOURCE = Path(__file__).with_name("decode_attention_cpu.c")
_DTYPES = (torch.float32, torch.bfloat16)
# decode_attention_cpu.c's MAX_D and MAX_HEADS.
_MAX_HEAD_DIM, _MAX_HEADS = 256, 64


@functools.cache
def library() -> ctypes.CDLL | None:
    """The kernel's library, built if this machine has none yet; None where it cannot be."""
    lib = native_build.build(SOURCE, "TANDEM_NATIVE_ATTENTION")
    if lib is None:
        return None
    p = ctypes.c_void_p
    fn = lib.tandem_decode_attention
    fn.argtypes = [p, p, p, p, p, p, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_int]
    fn.restype = ctypes.c_int
    return lib


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, lens: Tensor) -> Tensor | None:
    """q [N, H, D], one query row per sequence; k_cache, v_cache [num_slots, Hkv, D]; slots
    [N, W] int64 whose first lens[i] (int32, at most W) entries are sequence i's context
    slots, in order, each below num_slots (not checked: the runner builds them from block
    tables; the kernel reads the cache at them). Returns softmax(q k^T / sqrt(D)) v as
    [N, H * D] in q's dtype, or None where no kernel can take the call (mixed or other
    dtypes, shapes past the C kernel's limits, a graph to record, no library on CPU)."""
    if q.dim() != 3 or k_cache.dim() != 3 or slots.dim() != 2 or lens.dim() != 1:
        return None
    n, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    if q.is_cuda:
        return _on_cuda(q, k_cache, v_cache, slots, lens)
    fits = (
        all(t.is_cpu for t in (q, k_cache, v_cache, slots, lens))
        and q.dtype in _DTYPES and k_cache.dtype == v_cache.dtype == q.dtype
        and k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape == v_cache.shape
        and slots.dtype == torch.int64 and lens.dtype == torch.int32 and slots.is_contiguous() and lens.is_contiguous()
        and slots.shape[0] == lens.shape[0] == n
        and head_dim % 16 == 0 and head_dim <= _MAX_HEAD_DIM and k_cache.shape[2] == head_dim
        and num_heads % num_kv_heads == 0 and num_heads <= _MAX_HEADS
        and not (torch.is_grad_enabled() and q.requires_grad)
    )
    if not fits or (lib := library()) is None:
        return None
    q = q.contiguous()
    out = torch.empty(n, num_heads * head_dim, dtype=q.dtype)
    rc = lib.tandem_decode_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), slots.data_ptr(), lens.data_ptr(),
        slots.shape[1], n, num_heads, num_kv_heads, head_dim, head_dim**-0.5, q.dtype == torch.bfloat16,
    )
    return out if rc == 0 else None


def _on_cuda(q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, lens: Tensor) -> Tensor | None:
    n, num_heads, head_dim = q.shape
    fits = (
        all(t.device == q.device for t in (k_cache, v_cache, slots, lens))
        and q.dtype in (torch.float32, torch.bfloat16, torch.float16) and k_cache.dtype == v_cache.dtype == q.dtype
        and k_cache.shape == v_cache.shape and k_cache.shape[2] == head_dim
        and k_cache.stride(2) == 1 and v_cache.stride(2) == 1
        and slots.dtype == torch.int64 and lens.dtype == torch.int32 and slots.stride(1) == 1 and lens.is_contiguous()
        and slots.shape[0] == lens.shape[0] == n and num_heads % k_cache.shape[1] == 0
        and not (torch.is_grad_enabled() and q.requires_grad)
    )
    if not fits:
        return None
    from .decode_attention_triton import paged_decode  # CPU serving never imports triton

    return paged_decode(q, k_cache, v_cache, slots, lens)
