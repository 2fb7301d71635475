"""A frozen linear over a few rows in one pass over its weight per group of rows
(skinny_linear_cpu.c), for decode steps: bfloat16 on CPUs with AVX512-BF16, float32 on CPUs
with AVX2 and FMA.

A decode step's linears see as many rows as running sequences, and at a few rows their time
is the weight's bytes: oneDNN's bf16 linear on its reordered weight streamed SmolLM2's at
15-40 GB/s on 2 Zen 4 cores, the C loop at 30-60 GB/s (bench/base_linears.py), and a decode
step of 1-16 sequences ran 1.3-1.5x faster, 1.16x at 32. In float32 on 2 Zen 3 cores (AVX2,
no AVX-512) the loop ran 1.0-1.5x oneDNN's reordered weight at every SmolLM2 shape from 1
to 256 rows (the lm_head 1.0-1.24x), 115-150 GFLOP/s at 32 rows. Its copy of the weight,
packed for the kernel, is made beside oneDNN's (which keeps the rows past the routed limit
and training's forwards): one more copy of the base weights in memory.

Results are float32 sums (bfloat16's rounded once to bfloat16, as oneDNN's), in another
order than oneDNN's (tests/kernels/test_skinny_linear.py compares them with float64
matmuls). pack returns None, and linear None, where the kernel cannot serve: another dtype or
device, an odd bfloat16 input width, autograd, no AVX512-BF16 (bfloat16) or AVX2 and FMA
(float32), no library (TANDEM_NATIVE_SKINNY=0 or no C compiler).
"""

import ctypes
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native_build

SOURCE = Path(__file__).with_name("skinny_linear_cpu.c")
# The most rows a call takes, per dtype. bfloat16: past it oneDNN's GEMM, which blocks for
# the caches, wins or ties; 2 Zen 4 cores, SmolLM2's shapes from memory: 1.5-2.0x oneDNN at
# 1-8 rows, 1.1-1.3x at 32, 0.99-1.3x at 64 (gate_up ties), at 96 the lm_head 0.91x.
# float32, 2 Zen 3 cores (bench/results/base_linears_cpu_amd.json): 1.0-1.5x oneDNN at every
# shape from 1 to 256 rows (1.03-1.16x at 256); at 512 the lm_head fell to 0.86x, its x (1.2 MB)
# no longer held in the core's cache across 3072 tiles.
MAX_ROWS = {torch.bfloat16: 64, torch.float32: 256}
_AMX = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
_AVX512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
# The most rows Prepacked routes to it (0: none). Where oneDNN runs bfloat16 GEMMs on AMX
# tiles, its linear wins from 8 rows: on a 2-core Xeon (Emerald Rapids) the kernel ran 1.2-1.7x oneDNN
# at 1-2 rows and 0.16-0.5x at 16-64 (bench/results/base_linears_cpu_intel_bf16.json), and
# SmolLM2 decode steps with the kernel up to 4 rows against up to 64 took 34.2 vs 34.6 ms at
# 4 sequences, 46.2 vs 51.1 at 8, 67.4 vs 105.8 at 32. The float32 kernel is AVX2's, measured
# against oneDNN's AVX2 kernels only: where oneDNN has AVX-512's, twice as wide, it keeps them.
ROUTED_ROWS = {torch.bfloat16: 4 if _AMX else MAX_ROWS[torch.bfloat16], torch.float32: 0 if _AVX512 else MAX_ROWS[torch.float32]}
# Per dtype: the library's function that says its tile width (0: no kernel), and the one
# that runs it.
_KERNELS = {
    torch.bfloat16: ("tandem_skinny_tile_cols", "tandem_skinny_linear"),
    torch.float32: ("tandem_skinny_f32_tile_cols", "tandem_skinny_linear_f32"),
}


@functools.cache
def library() -> ctypes.CDLL | None:
    """The kernels' library, built if this machine has none yet; None where it cannot be."""
    lib = native_build.build(SOURCE, "TANDEM_NATIVE_SKINNY")
    if lib is None:
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    for cols_fn, run_fn in _KERNELS.values():
        getattr(lib, cols_fn).restype = ctypes.c_int
        if getattr(lib, cols_fn)() > 0:
            getattr(lib, run_fn).argtypes = [p, p, p, p, ctypes.c_int, i64, i64]
            getattr(lib, run_fn).restype = None
    return lib


def tile_cols(dtype: torch.dtype) -> int:
    """The output columns of one packed tile for this dtype's kernel; 0 where it has none."""
    lib = library()
    return getattr(lib, _KERNELS[dtype][0])() if lib is not None and dtype in _KERNELS else 0


def pack(weight: Tensor) -> Tensor | None:
    """weight [N, K] as the kernel reads it (bfloat16 [ceil(N / 64), K / 2, 64, 2], float32
    [ceil(N / 16), K, 16]); None where the kernel cannot take it."""
    if not weight.is_cpu or weight.dim() != 2 or (weight.dtype == torch.bfloat16 and weight.shape[1] % 2):
        return None
    cols = tile_cols(weight.dtype)
    if cols == 0:
        return None
    n, k = weight.shape
    tiles = -(-n // cols)
    with torch.no_grad():
        padded = F.pad(weight.detach(), (0, 0, 0, tiles * cols - n))
        if weight.dtype == torch.bfloat16:
            return padded.view(tiles, cols, k // 2, 2).permute(0, 2, 1, 3).contiguous()
        return padded.view(tiles, cols, k).permute(0, 2, 1).contiguous()


def linear(x: Tensor, packed: Tensor | None, out_features: int, bias: Tensor | None = None) -> Tensor | None:
    """x [T, K] -> [T, out_features] = x W^T (+ bias), W as pack() left it; None where the
    kernel does not take the call (no packed weight, more than MAX_ROWS rows, autograd,
    another dtype than the packed weight's)."""
    if packed is None or x.dtype != packed.dtype or not 0 < x.shape[0] <= MAX_ROWS[x.dtype] or not x.is_cpu:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return None
    if bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous() or not bias.is_cpu or bias.shape != (out_features,)):
        return None  # the kernel reads out_features values from its pointer: torch's path says what is wrong
    in_features = packed.shape[1] * (2 if x.dtype == torch.bfloat16 else 1)
    if x.shape[1] != in_features or out_features > packed.shape[0] * tile_cols(x.dtype):
        raise ValueError(f"x [{x.shape[0]}, {x.shape[1]}] does not fit a packed weight of {tuple(packed.shape)}")
    x = x.contiguous()
    y = torch.empty(x.shape[0], out_features, dtype=x.dtype)
    getattr(library(), _KERNELS[x.dtype][1])(
        x.data_ptr(), packed.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
        x.shape[0], out_features, x.shape[1],
    )
    return y
