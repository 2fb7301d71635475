"""Frozen weights reordered once for oneDNN, for inference matmuls on CPU.

`F.linear` in bfloat16 on CPU hands oneDNN the weight in its plain layout, and oneDNN
repacks it into the blocked layout its (AMX / AVX-512) kernels read on every call: for
SmolLM2's lm_head that is 56 MB copied per decode step. Reordering once, on first use, and
calling oneDNN's linear with the reordered weight skips that (bench/base_linears.py
measures it per shape and row count). The reordered copy serves only forwards without
autograd: oneDNN's linear has no backward, so a forward that trains (activation gradients
through the frozen base) keeps `F.linear` on the plain weight, which stays the weight of
record. Without oneDNN, on other devices or dtypes, prepack returns None and every call is
`F.linear`, so the engine runs the same everywhere.

float32 `F.linear` runs through MKL, which is fast on Intel CPUs and slow on others: on a
2-core AMD EPYC the reordered weight ran 1.0-4.2x faster on every SmolLM2 shape up to 64
rows (lm_head 1.2-4.2x at every row count) and within 7% either way at 128-512, on a 2-core
Xeon it lost on most (0.6-0.9x on o_proj and down_proj). So float32 weights are reordered
where the CPU is not Intel's (bench/results/base_linears_cpu_{amd,intel}.json).
"""

import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from tandem.kernels import row_buckets

# Measured on a 2-core Xeon with AMX over SmolLM2's shapes, weights streamed from memory
# (bench/results/base_linears_cpu_intel.json): up to 256 rows the reordered weight ran 1.2-1.6x
# faster than F.linear on every shape; at 512 it lost on two (0.76-0.81x) and tied over a
# layer, so rows past this (long prefill chunks) keep F.linear.
PACKED_MAX_ROWS = 256


def supported(weight: torch.Tensor) -> bool:
    """Whether this build and CPU run oneDNN's linear on a reordered weight of this dtype, and
    it pays: bfloat16 wherever oneDNN has it, float32 on CPUs that are not Intel's."""
    if weight.device.type != "cpu" or weight.dim() != 2 or not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return False
    if weight.dtype == torch.bfloat16:
        return ops._is_mkldnn_bf16_supported()
    return weight.dtype == torch.float32 and cpu_vendor() not in ("GenuineIntel", "")


@functools.cache
def cpu_vendor() -> str:
    """The CPU's vendor id ("GenuineIntel", "AuthenticAMD", ...), "" where Linux does not say."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("vendor_id")), "")


def prepack(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight [out, in] reordered for oneDNN, or None where the plain path must serve."""
    if not supported(weight):
        return None
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


class Prepacked:
    """One frozen weight's oneDNN copy, made on its first forward without autograd and then
    kept; made again if the weight passed in is another tensor (replaced, moved, recast).
    Lazy, so a layer rebuilt around the same weight (LoRA attaching) packs it only once."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._packed: torch.Tensor | None = None

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, in] -> [T, out] = x weight^T (+ bias). Through the reordered weight when there
        is one, T <= PACKED_MAX_ROWS and grad mode is off, else F.linear (a training forward
        runs F.linear throughout, even where an input needs no gradient, so its numbers are
        those of peft's forward on the same base); rows
        padded to their bucket either way (oneDNN keeps a kernel per shape)."""
        rows = x.shape[0]
        if rows > PACKED_MAX_ROWS or torch.is_grad_enabled():
            return row_buckets.linear(x, weight, bias)
        key = (weight.data_ptr(), weight.dtype, weight.device, weight.shape)
        if key != self._key:
            self._packed, self._key = prepack(weight), key
        if self._packed is None:
            return row_buckets.linear(x, weight, bias)
        padded = row_buckets.bucket_rows(rows)
        if padded != rows:
            x = F.pad(x, (0, 0, 0, padded - rows))
        y = torch.ops.mkldnn._linear_pointwise(x, self._packed, bias, "none", [], "")
        return y if padded == rows else y[:rows]
