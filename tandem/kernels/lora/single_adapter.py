"""Differentiable LoRA for the common training batch: every row trains the same adapter.

A fine-tuning micro-batch is one adapter over all of its rows, so the segment machinery of
the general path (reference / reference_backward: zero-filled buffers, row gathers, a
matmul per slice, the weights converted on every call) is pure overhead there: on SmolLM2
it made LoRA a quarter of a CPU training step for under 3% of its FLOPs. Here each fused
projection group is one shrink and one expand (the slices' B as one block-diagonal matrix,
whose zeros add nothing), the delta is added to the base output in the same op, and the
weights are converted to the compute dtype once per version of the weights, not per call.

Products run in the dtype the general path picks (reference._matmul_dtype), so gradients
are the same to rounding: a bf16 training batch of 128+ rows multiplies in bf16, its rows
split at a bucket (row_buckets.mm): micro-batches and co-served slices come in every row
count, and oneDNN compiles and keeps kernels for each one it meets.
"""

import weakref

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.utils.weak import WeakIdKeyDictionary

from .. import row_buckets
from .batch import LoRABatch, LoRAWeights
from .reference import _matmul_dtype

# w.a -> {compute dtype: (a's and b's versions, a weak reference to b, a [S * r, in] or None,
# block-diagonal b [N, S * r] or None)}: the conversions, made once per version of the weights
# (an optimizer step updates them in place). Whatever writes the weights without bumping their
# version must bump it (torch.autograd.graph.increment_version), or the old conversions go on
# serving: fused AdamW does not, so the trainer bumps each parameter after its step
# (Trainer._optimizer_step), as native_cpu.load_slot does after its C copy. Keyed weakly on the
# weights' own tensor, so an entry dies with them; None where w's own tensor serves as it is
# (a view of it in the entry would keep the key alive).
_converted = WeakIdKeyDictionary()


def applies(w: LoRAWeights, batch: LoRABatch) -> bool:
    """True when every row of the batch has w's only slot, at its full rank."""
    return (
        w.num_slots == 1
        and batch.num_lora_tokens == batch.num_tokens
        and batch.first_lora_token == 0
        and w.host_ranks[0] == w.max_rank
    )


def compute_weights(w: LoRAWeights, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(a [S * r, in], b [N, S * r] block-diagonal) of w's slot in dtype, without autograd;
    converted again only when w.a's or w.b's version changed (see _converted: a write that
    does not bump it is not seen)."""
    entry = _converted.setdefault(w.a, {})
    versions = (w.a._version, w.b._version)
    cached = entry.get(dtype)
    if cached is None or cached[0] != versions or cached[1]() is not w.b:
        with torch.no_grad():
            a = None if w.a.dtype == dtype else w.a[0].to(dtype)
            b = None if w.b.dtype == dtype and w.num_slices == 1 else _block_diagonal(w, dtype)
        cached = entry[dtype] = (versions, weakref.ref(w.b), a, b)
    a, b = cached[2], cached[3]
    return w.a[0].detach() if a is None else a, w.b[0].detach() if b is None else b


def _block_diagonal(w: LoRAWeights, dtype: torch.dtype) -> Tensor:
    """[N, S * r]: slice s's rows of b hold its r columns at s * r, zeros elsewhere."""
    b = w.b[0].to(dtype)
    if w.num_slices == 1:
        return b
    r = w.max_rank
    out = b.new_zeros((w.out_features, w.num_slices * r))
    start = 0
    for s, width in enumerate(w.out_slices):
        out[start : start + width, s * r : (s + 1) * r] = b[start : start + width]
        start += width
    return out


class SingleLoRAAdd(torch.autograd.Function):
    """y + LoRA(x) for a batch whose every row has w's one slot; differentiable in y, x, w.a, w.b.

    Saved: x in the compute dtype (for da) and v = x A^T (for db), each only when needed.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, y: Tensor, x: Tensor, a: Tensor, b: Tensor, w: LoRAWeights) -> Tensor:
        mdt = _matmul_dtype(x.dtype, w, x.shape[0], x.shape[0])
        a_c, b_c = compute_weights(w, mdt)
        xc = x.to(mdt)
        v = row_buckets.mm(xc, a_c.t())
        if y.dtype == mdt:
            out = row_buckets.addmm(y, v, b_c.t())
        else:
            out = row_buckets.mm(v, b_c.t()).to(y.dtype)
            out += y
        _, _, needs_a, needs_b = ctx.needs_input_grad[:4]
        # a and b are saved so that autograd refuses a backward after they change in place.
        ctx.save_for_backward(xc if needs_a else None, v if needs_b else None, a, b)
        ctx.w, ctx.x_dtype, ctx.mdt = w, x.dtype, mdt
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, dout: Tensor) -> tuple[Tensor | None, ...]:
        xc, v, a, b = ctx.saved_tensors
        _, needs_x, needs_a, needs_b = ctx.needs_input_grad[:4]
        w = ctx.w
        a_c, b_c = compute_weights(w, ctx.mdt)
        dy = dout.to(ctx.mdt)
        dx = da = db = None
        if needs_x or needs_a:
            dv = row_buckets.mm(dy, b_c)
            dx = row_buckets.mm(dv, a_c).to(ctx.x_dtype) if needs_x else None
            da = row_buckets.mm_over_rows(dv, xc).to(a.dtype).unsqueeze(0) if needs_a else None
        if needs_b:
            db = _diagonal_blocks(row_buckets.mm_over_rows(dy, v), w).to(b.dtype).unsqueeze(0)
        return dout, dx, da, db, None


def _diagonal_blocks(full: Tensor, w: LoRAWeights) -> Tensor:
    """[N, r] from [N, S * r]: each slice's rows at its own r columns."""
    if w.num_slices == 1:
        return full
    r, parts, start = w.max_rank, [], 0
    for s, width in enumerate(w.out_slices):
        parts.append(full[start : start + width, s * r : (s + 1) * r])
        start += width
    return torch.cat(parts)


def lora_add(y: Tensor, x: Tensor, w: LoRAWeights) -> Tensor:
    """y + LoRA(x) through SingleLoRAAdd; the caller checks applies(w, batch)."""
    return SingleLoRAAdd.apply(y, x, w.a, w.b, w)
