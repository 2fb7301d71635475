"""A decoder layer's elementwise ops in one C call each on CPU (fused_elementwise_cpu.c):
RMSNorm after the residual add, rotary embedding of q and k, SiLU(gate) * up.

Through torch these are ~40 ops a layer, each a dispatch and a pass over a few kB: in a
SmolLM2 bf16 decode step of 16 sequences on 2 Zen 4 cores they took ~7 ms of 34. Results
are torch's op for op (tests/kernels/test_fused_elementwise.py): float32 rope and adds
bit-equal, the norm's sum of squares and SiLU's exponential within float32 rounding.

Each function returns None where the kernel cannot take the call (autograd must see the op,
not CPU, other dtypes, widths off the kernel's multiples, no library): the caller's torch
path serves, as it does everywhere with TANDEM_NATIVE_ELEMENTWISE=0 or no C compiler.
Built once per machine by kernels/native_build.py.
"""

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from . import native_build

SOURCE = Path(__file__).with_name("fused_elementwise_cpu.c")
_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The kernels' library, built if this machine has none yet; None where it cannot be."""
    lib = native_build.build(SOURCE, "TANDEM_NATIVE_ELEMENTWISE")
    if lib is None:
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.tandem_rms_norm.argtypes = [p, p, p, p, p, i64, i64, ctypes.c_float, i32]
    lib.tandem_rope.argtypes = [p, i64, p, p, p, p, i64, i32, i32, i32, i32]
    lib.tandem_silu_mul.argtypes = [p, p, i64, i64, i32]
    for fn in (lib.tandem_rms_norm, lib.tandem_rope, lib.tandem_silu_mul):
        fn.restype = None
    return lib


def _takes(*tensors: Tensor) -> ctypes.CDLL | None:
    """The library, where every tensor is a contiguous CPU float32 or bfloat16 one of the
    first's dtype and autograd needs none of them."""
    dtype = tensors[0].dtype
    grad = torch.is_grad_enabled()
    for t in tensors:
        if not t.is_cpu or t.dtype != dtype or not t.is_contiguous() or (grad and t.requires_grad):
            return None
    return library() if dtype in _DTYPES else None


def rms_norm(x: Tensor, weight: Tensor, eps: float, delta: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
    """(weight * norm(s), s) with s = x + delta, or x without delta, over x's last dimension,
    as kernels.rms_norm computes it; None where the kernel cannot take it."""
    d = x.shape[-1]
    if d % 16 or weight.shape != (d,) or (delta is not None and delta.shape != x.shape):
        return None
    lib = _takes(x, weight) if delta is None else _takes(x, weight, delta)
    if lib is None:
        return None
    out = torch.empty_like(x)
    s = x if delta is None else torch.empty_like(x)
    lib.tandem_rms_norm(
        x.data_ptr(), None if delta is None else delta.data_ptr(), s.data_ptr(), weight.data_ptr(), out.data_ptr(),
        x.numel() // d, d, eps, x.dtype == torch.bfloat16,
    )
    return out, s


def rope(qkv: Tensor, cos: Tensor, sin: Tensor, num_heads: int, num_kv_heads: int) -> tuple[Tensor, Tensor] | None:
    """Rotate-half RoPE of the q and k heads at the front of each qkv row [T, (H + 2 Hkv) D]
    by cos, sin [T, 1, D] -> q [T, H, D], k [T, Hkv, D]; None where the kernel cannot take it."""
    t, head_dim = qkv.shape[0], cos.shape[-1]
    if (
        head_dim % 32 or qkv.dim() != 2 or qkv.shape[1] < (num_heads + num_kv_heads) * head_dim
        or cos.shape != (t, 1, head_dim) or sin.shape != cos.shape or (lib := _takes(qkv, cos, sin)) is None
    ):
        return None
    q = qkv.new_empty(t, num_heads, head_dim)
    k = qkv.new_empty(t, num_kv_heads, head_dim)
    lib.tandem_rope(
        qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), q.data_ptr(), k.data_ptr(), t,
        num_heads, num_kv_heads, head_dim, qkv.dtype == torch.bfloat16,
    )
    return q, k


def silu_mul(gate_up: Tensor) -> Tensor | None:
    """silu(gate) * up for gate_up [T, 2 I] holding gate then up in each row -> [T, I]; None
    where the kernel cannot take it."""
    inter = gate_up.shape[-1] // 2
    if gate_up.dim() != 2 or inter % 16 or gate_up.shape[-1] != 2 * inter or (lib := _takes(gate_up)) is None:
        return None
    out = gate_up.new_empty(gate_up.shape[0], inter)
    lib.tandem_silu_mul(gate_up.data_ptr(), out.data_ptr(), gate_up.shape[0], inter, gate_up.dtype == torch.bfloat16)
    return out
