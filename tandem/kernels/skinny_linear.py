"""A frozen bfloat16 linear over a few rows in one pass over its weight (skinny_linear_cpu.c),
for decode steps on CPUs with AVX512-BF16.

A decode step's linears see as many rows as running sequences, and at a few rows their time
is the weight's bytes: oneDNN's bf16 linear on its reordered weight streamed SmolLM2's at
15-40 GB/s on 2 Zen 4 cores, the C loop at 30-60 GB/s (bench/base_linears.py), and a decode
step of 1-16 sequences ran 1.3-1.5x faster, 1.16x at 32. Its copy of the weight, packed in
pairs of inputs for AVX512-BF16's dot product, is made beside oneDNN's (which keeps the rows
past MAX_ROWS: prefill chunks, training): one more copy of the base weights in memory.

Results are float32 sums of the bfloat16 products rounded once to bfloat16, as oneDNN's
(tests/kernels/test_skinny_linear.py compares them with float32 matmuls). pack returns None,
and linear None, where the kernel cannot serve: another dtype or device, an odd input width,
autograd, no AVX512-BF16, no library (TANDEM_NATIVE_SKINNY=0 or no C compiler).
"""

import ctypes
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native_build

SOURCE = Path(__file__).with_name("skinny_linear_cpu.c")
# The most rows a call takes; past it oneDNN's GEMM, which blocks for the caches, wins or
# ties. 2 Zen 4 cores, SmolLM2's shapes from memory: 1.5-2.0x oneDNN at 1-8 rows, 1.1-1.3x
# at 32, 0.99-1.3x at 64 (gate_up ties), at 96 the lm_head 0.91x.
MAX_ROWS = 64
# The most rows Prepacked routes to it. Where oneDNN runs bfloat16 GEMMs on AMX tiles, its
# linear wins from 8 rows: on a 2-core Xeon (Emerald Rapids) the kernel ran 1.2-1.7x oneDNN
# at 1-2 rows and 0.16-0.5x at 16-64 (bench/results/base_linears_cpu_intel_bf16.json), and
# SmolLM2 decode steps with the kernel up to 4 rows against up to 64 took 34.2 vs 34.6 ms at
# 4 sequences, 46.2 vs 51.1 at 8, 67.4 vs 105.8 at 32.
ROUTED_ROWS = 4 if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)() else MAX_ROWS


@functools.cache
def library() -> ctypes.CDLL | None:
    """The kernel's library, built if this machine has none yet; None where it cannot be or
    the CPU has no AVX512-BF16."""
    lib = native_build.build(SOURCE, "TANDEM_NATIVE_SKINNY")
    if lib is None:
        return None
    lib.tandem_skinny_tile_cols.restype = ctypes.c_int
    if lib.tandem_skinny_tile_cols() <= 0:
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.tandem_skinny_linear.argtypes = [p, p, p, p, ctypes.c_int, i64, i64]
    lib.tandem_skinny_linear.restype = None
    return lib


def pack(weight: Tensor) -> Tensor | None:
    """weight [N, K] as the kernel reads it, [ceil(N / 64), K / 2, 64, 2]; None where the
    kernel cannot take it."""
    if weight.dtype != torch.bfloat16 or not weight.is_cpu or weight.dim() != 2 or weight.shape[1] % 2:
        return None
    lib = library()
    if lib is None:
        return None
    cols = lib.tandem_skinny_tile_cols()
    n, k = weight.shape
    tiles = -(-n // cols)
    with torch.no_grad():
        padded = F.pad(weight.detach(), (0, 0, 0, tiles * cols - n))
        return padded.view(tiles, cols, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def linear(x: Tensor, packed: Tensor | None, out_features: int, bias: Tensor | None = None) -> Tensor | None:
    """x [T, K] -> [T, out_features] = x W^T (+ bias), W as pack() left it; None where the
    kernel does not take the call (no packed weight, more than MAX_ROWS rows, autograd,
    another dtype)."""
    if packed is None or not 0 < x.shape[0] <= MAX_ROWS or x.dtype != torch.bfloat16 or not x.is_cpu:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return None
    if bias is not None and (bias.dtype != torch.bfloat16 or not bias.is_contiguous()):
        return None
    if x.shape[1] != 2 * packed.shape[1] or out_features > packed.shape[0] * packed.shape[2]:
        raise ValueError(f"x [{x.shape[0]}, {x.shape[1]}] does not fit a packed weight of {tuple(packed.shape)}")
    x = x.contiguous()
    y = torch.empty(x.shape[0], out_features, dtype=torch.bfloat16)
    library().tandem_skinny_linear(
        x.data_ptr(), packed.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
        x.shape[0], out_features, x.shape[1],
    )
    return y
