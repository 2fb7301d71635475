"""Batched multi-LoRA: y += B_slot(A_slot x) for a ragged batch where each token has a slot,
or y += sum_i w_i B_slot_i(A_slot_i x) where a token has k weighted (slot, weight) pairs
(routed steps: a router mixes k experts per token; see LoRAPairs).

The model's LoRA layer calls lora_delta once per linear group per step; the engine builds
one LoRABatch per step and shares it across layers. The Triton kernels run when the
tensors are on CUDA; on CPU lora_delta runs native_cpu.py's C kernel where it is built and
the layout fits (the CPU slot pool's), the torch reference otherwise (and for every other
call). backend="triton" forces the kernels, e.g. on CPU tensors when they were imported with
TRITON_INTERPRET=1 (tests); backend="torch" forces the reference.

lora_delta_autograd is the differentiable form, for fine-tuning on the serving model;
lora_add_autograd adds it to the base output, through single_adapter.py's dense path when
every row trains one adapter (a fine-tuning micro-batch).
"""

from torch import Tensor

from . import autograd, native_cpu, reference, single_adapter
from .batch import LoRABatch, LoRAPairs, LoRAWeights, Segment, plain_pairs

__all__ = [
    "LoRABatch", "LoRAPairs", "LoRAWeights", "Segment", "lora_add_autograd", "lora_delta", "lora_delta_autograd", "lora_delta_pairs",
    "lora_expand", "lora_shrink", "plain_pairs",
]


def _backend(x: Tensor, backend: str | None) -> str:
    if backend is None:
        return "triton" if x.is_cuda else "torch"
    if backend in ("torch", "triton"):
        return backend
    raise ValueError(f"backend must be None, 'torch' or 'triton', got {backend!r}")


def _impl(x: Tensor, backend: str | None):
    if _backend(x, backend) == "torch":
        return reference
    # Imported on first use: CPU serving never needs triton.
    from . import triton_sgmv

    return triton_sgmv


def lora_shrink(x: Tensor, w: LoRAWeights, batch: LoRABatch, *, backend: str | None = None) -> Tensor:
    """v[t, s * max_rank + j] = x[t] . a[slot_t, s * max_rank + j] for j < rank of slot_t.

    x: [T, in_features]. Returns v: [T, S * max_rank], float32 (float64 for float64 x on
    the torch path); columns past a slot's rank and rows without an adapter are zero.
    """
    return _impl(x, backend).lora_shrink(x, w, batch)


def lora_expand(
    v: Tensor, w: LoRAWeights, batch: LoRABatch, y: Tensor, *, backend: str | None = None
) -> None:
    """y[t, slice s] += v[t, s * max_rank : s * max_rank + rank] @ b[slot_t, slice s, :rank].T.

    v: [T, S * max_rank] as lora_shrink returns it; y: [T, sum(out_slices)], updated in
    place in its own dtype. Rows of tokens without an adapter are left bit-identical.
    """
    _impl(v, backend).lora_expand(v, w, batch, y)


def lora_delta(
    x: Tensor, w: LoRAWeights, batch: LoRABatch, y: Tensor, *, backend: str | None = None
) -> None:
    """y += LoRA(x) for every token with an adapter: lora_shrink then lora_expand.

    x: [T, in_features]; y: [T, sum(out_slices)] (the base layer's output), updated in place;
    rows of tokens without an adapter are left bit-identical. On Triton, steps of up to
    triton_sgmv.FUSED_MAX_TOKENS tokens whose slots hold ranks up to FUSED_MAX_RANK take one
    fused launch; on CPU the C kernel takes the
    call where it serves (native_cpu.serves) and applies (native_cpu.applies), else the torch path picks between a segment
    loop and one batched matmul pair (see reference). Forward only: lora_delta_autograd is
    the differentiable form.
    """
    if backend is None and not x.is_cuda and native_cpu.serves(x, w, y) and native_cpu.lora_delta(x, w, batch, y):
        return
    _impl(x, backend).lora_delta(x, w, batch, y)


def lora_delta_pairs(
    x: Tensor, w: LoRAWeights, pairs: LoRAPairs, y: Tensor, *, backend: str | None = None
) -> None:
    """y[t] += sum_i weight[t, i] * LoRA_slot(t, i)(x[t]) for every (slot, weight) pair.

    x: [T, in_features]; y: [T, sum(out_slices)], updated in place; rows of tokens without a
    pair are left bit-identical. On Triton, one pass over the entries grouped by slot (the
    same launches as lora_delta, the weighted adds atomic); no loop or launch per slot.
    Plain steps should keep using lora_delta: its CPU plan is faster for one slot per token.
    """
    _impl(x, backend).lora_delta_pairs(x, w, pairs, y)


def lora_delta_autograd(x: Tensor, w: LoRAWeights, batch: LoRABatch, *, backend: str | None = None) -> Tensor:
    """LoRA(x) as a new tensor, differentiable in x, w.a and w.b (whichever require grad).

    x: [T, in_features]. Returns delta: [T, sum(out_slices)] in x's dtype, zero rows for
    tokens without an adapter. Forward: lora_shrink then lora_expand, keeping v (float32) for
    the backward. Gradients come back in each input's dtype (w.a / w.b may be float32 master
    weights under bfloat16 activations), zero for slots without tokens and past each rank.
    """
    return autograd.lora_delta(x, w, batch, _backend(x, backend))


def lora_add_autograd(y: Tensor, x: Tensor, w: LoRAWeights, batch: LoRABatch, *, backend: str | None = None) -> Tensor:
    """y + LoRA(x) as a new tensor, differentiable in y, x, w.a and w.b.

    y: [T, sum(out_slices)] (the base layer's output), x: [T, in_features]. On the torch path,
    a batch whose every row has w's one slot at its full rank (single_adapter.applies) takes
    one shrink and one expand, with the weights converted once per version; any other batch
    is y + lora_delta_autograd(x, w, batch).
    """
    if _backend(x, backend) == "torch" and single_adapter.applies(w, batch):
        return single_adapter.lora_add(y, x, w)
    return y + lora_delta_autograd(x, w, batch, backend=backend)
