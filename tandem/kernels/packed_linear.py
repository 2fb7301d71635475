"""Frozen weights reordered once for oneDNN, for the base model's matmuls on CPU.

`F.linear` in bfloat16 on CPU hands oneDNN the weight in its plain layout, and oneDNN
repacks it into the blocked layout its (AMX / AVX-512) kernels read on every call: for
SmolLM2's lm_head that is 56 MB copied per decode step. Reordering once, on first use, and
calling oneDNN's linear with the reordered weight skips that (bench/base_linears.py
measures it per shape and row count). oneDNN's linear has no backward, so a forward that
trains runs through _PackedLinear: the activation gradient dy W is oneDNN's linear on W^T,
reordered once more on the first backward (the frozen weight gets no gradient). The plain
weight stays the weight of record. Without oneDNN, on other devices or dtypes, prepack
returns None and every call is `F.linear`, so the engine runs the same everywhere.

float32 `F.linear` runs through MKL, which is fast on Intel CPUs and slow on others: on a
2-core AMD EPYC (AVX2) the reordered weight ran 1.0-4.2x faster on every SmolLM2 shape up to
64 rows (lm_head 1.2-4.2x at every row count) and within 11% either way at 128-512, on a
2-core Zen 5 EPYC (AVX-512) 2.2-2.4x faster at 512-1024 rows, on a 2-core Xeon it lost on
most (0.6-0.9x on o_proj and down_proj). So float32 weights are reordered where the CPU is
not Intel's (bench/results/base_linears_cpu_{amd,intel_bf16}.json).
"""

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from tandem.kernels import row_buckets, skinny_linear

# The most rows a call runs through the reordered weight, per dtype. bfloat16, measured on a
# 2-core Xeon with AMX over SmolLM2's shapes, weights streamed from memory
# (bench/results/base_linears_cpu_intel_bf16.json): up to 256 rows the reordered weight ran 1.2-1.6x
# faster than F.linear on every shape; at 512 it lost on two (0.76-0.81x) and tied over a
# layer, so rows past this (long prefill chunks, training batches) keep F.linear. float32 (only
# reordered off Intel): no limit. On a 2-core EPYC with AVX2 it was within 11% either way at 512
# rows (lm_head 1.18x); on a 2-core Zen 5 EPYC (AVX-512) it ran 420-450 GFLOP/s against MKL's
# 180-190 at 512 and 1024 rows, forward and transposed (bench/results/base_linears_cpu_amd*.json).
PACKED_MAX_ROWS = {torch.bfloat16: 256}


def max_rows(dtype: torch.dtype) -> int | float:
    return PACKED_MAX_ROWS.get(dtype, float("inf"))


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
    """One frozen weight's oneDNN copies (and, where it is routed rows, the skinny kernel's:
    kernels/skinny_linear.py), made on first use and then kept; made again if the
    weight passed in is another tensor (replaced, moved, recast). Lazy, so a layer rebuilt
    around the same weight (LoRA attaching) packs it only once, and the transposed copy that
    a training backward multiplies by exists only on a server that has trained."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._packed: torch.Tensor | None = None
        self._skinny: torch.Tensor | None = None
        self._transposed: torch.Tensor | None = None

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, in] -> [T, out] = x weight^T (+ bias). Without autograd, up to
        skinny_linear.ROUTED_ROWS[dtype] rows through the skinny kernel where it has a copy; else through
        the reordered weight when there is one and T <= max_rows(dtype), else F.linear; rows padded to their bucket either way
        (oneDNN keeps a kernel per shape). Under autograd the activation gradient runs through
        a reordered weight^T (the frozen weight itself gets none; a weight or bias that
        requires grad keeps F.linear)."""
        trainable = weight.requires_grad or (bias is not None and bias.requires_grad)
        if x.shape[0] > max_rows(x.dtype) or trainable or self._packed_for(weight) is None:
            return row_buckets.linear(x, weight, bias)
        if torch.is_grad_enabled() and x.requires_grad:
            return _PackedLinear.apply(x, weight, bias, self)
        if x.shape[0] <= skinny_linear.ROUTED_ROWS.get(x.dtype, 0) and (y := skinny_linear.linear(x, self._skinny, weight.shape[0], bias)) is not None:
            return y
        return _run(x, self._packed, bias)

    def _packed_for(self, weight: torch.Tensor) -> torch.Tensor | None:
        key = (weight.data_ptr(), weight.dtype, weight.device, weight.shape)
        if key != self._key:
            self._packed, self._transposed, self._key = prepack(weight), None, key
            routed = self._packed is not None and skinny_linear.ROUTED_ROWS.get(weight.dtype, 0) > 0
            self._skinny = skinny_linear.pack(weight) if routed else None
        return self._packed

    def prepare(self, weight: torch.Tensor, transposed: bool = False) -> None:
        """Make the reordered copy (and, transposed, that of weight^T) now rather than on
        first use: a first use inside a served iteration waits for it (SmolLM2's forward
        copies took 0.84 s on a 2-core Zen 5 EPYC, the transposed ones 0.65 s)."""
        if self._packed_for(weight) is not None and transposed and self._transposed is None:
            self._transposed = prepack(weight.t().contiguous())

    def replayed(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """y, the output of linear(x, weight) computed before, as if computed now: the
        activation gradient flows to x as it would from linear, without the forward GEMM.
        The result shares y's storage: a delta added into it in place lands in y too."""
        return _Replayed.apply(x, y, weight, self)

    def activation_grad(self, dy: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """dy [T, out] -> [T, in] = dy weight, by the path linear's backward takes for T rows."""
        if dy.shape[0] > max_rows(dy.dtype):
            return row_buckets.mm(dy, weight)
        return self.transposed_linear(dy, weight)

    def transposed_linear(self, dy: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """dy [T, out] -> [T, in] = dy weight, through weight^T reordered once (a plain
        matmul where the weight cannot be reordered)."""
        self.prepare(weight, transposed=True)
        if self._transposed is None:
            return dy @ weight
        return _run(dy.contiguous(), self._transposed, None)


class _PackedLinear(torch.autograd.Function):
    """x weight^T (+ bias) for a frozen weight, forward and activation gradient through oneDNN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: Prepacked) -> torch.Tensor:
        ctx.weight, ctx.packed = weight, packed
        # Detached: where rows were padded, _run returns a view of the padded output, and
        # autograd refuses any later use of a custom Function's view output that was added
        # into in place (served deltas go into it under no_grad). Shares the storage, no copy.
        return _run(x, packed._packed, bias).detach()

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return ctx.packed.transposed_linear(dy, ctx.weight), None, None, None


class _Replayed(torch.autograd.Function):
    """A frozen linear's output computed in an earlier forward, with its activation gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, packed: Prepacked) -> torch.Tensor:
        ctx.weight, ctx.packed = weight, packed
        # Not y itself: autograd would hand back a view of it, which then refuses any later
        # use once added into in place (as _PackedLinear's padded output would).
        return y.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return ctx.packed.activation_grad(dy, ctx.weight), None, None, None


def _run(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's linear on a reordered weight, x's rows padded to their bucket."""
    rows = x.shape[0]
    padded = row_buckets.bucket_rows(rows)
    if padded != rows:
        x = F.pad(x, (0, 0, 0, padded - rows))
    y = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return y if padded == rows else y[:rows]
