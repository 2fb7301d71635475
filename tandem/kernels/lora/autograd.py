"""Batched LoRA as an autograd.Function: the forward's shrink and expand, the backward's four
gradient ops (reference_backward / triton_sgmv_backward), each run only when needed."""

from types import ModuleType

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from . import reference, reference_backward
from .batch import LoRABatch, LoRAWeights


def _modules(backend: str) -> tuple[ModuleType, ModuleType]:
    """The forward and backward modules of a backend ("torch" or "triton")."""
    if backend == "torch":
        return reference, reference_backward
    # Imported on first use: CPU training never needs triton.
    from . import triton_sgmv, triton_sgmv_backward

    return triton_sgmv, triton_sgmv_backward


class LoRADelta(torch.autograd.Function):
    """delta = LoRA(x) [T, N] in x's dtype, differentiable in x, a and b.

    a and b are passed on their own (they must be w.a and w.b) so that autograd tracks them;
    the kernels read them through w. Saved per token: x (for da) and v = x A^T in float32
    (for db), each only when that gradient is needed.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, a: Tensor, b: Tensor, w: LoRAWeights, batch: LoRABatch, backend: str
    ) -> Tensor:
        forward_impl, ctx.backward_impl = _modules(backend)
        v = forward_impl.lora_shrink(x, w, batch)
        delta = x.new_zeros((batch.num_tokens, w.out_features))
        forward_impl.lora_expand(v, w, batch, delta)
        _, needs_a, needs_b = ctx.needs_input_grad[:3]
        # a and b are saved so that autograd refuses a backward after they change in place
        # (e.g. an optimizer step between forward and backward).
        ctx.save_for_backward(x if needs_a else None, v if needs_b else None, a, b)
        ctx.w, ctx.batch, ctx.x_dtype = w, batch, x.dtype
        return delta

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, v, _, _ = ctx.saved_tensors
        needs_x, needs_a, needs_b = ctx.needs_input_grad[:3]
        impl, w, batch = ctx.backward_impl, ctx.w, ctx.batch
        dx = da = db = None
        if needs_x or needs_a:
            dv = impl.grad_v(dy, w, batch)
            dx = impl.grad_x(dv, w, batch, ctx.x_dtype) if needs_x else None
            da = impl.grad_a(dv, x, w, batch) if needs_a else None
        if needs_b:
            db = impl.grad_b(dy, v, w, batch)
        return dx, da, db, None, None, None


def lora_delta(x: Tensor, w: LoRAWeights, batch: LoRABatch, backend: str) -> Tensor:
    """LoRADelta.apply on w's own a and b; backend: "torch" or "triton"."""
    return LoRADelta.apply(x, w.a, w.b, w, batch, backend)
