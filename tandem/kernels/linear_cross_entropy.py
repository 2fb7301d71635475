"""The training loss through the output projection, without holding the logits.

sum over rows of cross_entropy(float(h W^T), target), as the model's logits and
F.cross_entropy compute it, but a block of rows at a time: each block's float32 logits
give its loss and, when h needs a gradient, at once its gradient (softmax - one-hot) W,
so neither the [rows, vocab] logits nor their gradient are ever held whole. On SmolLM2
(vocabulary 49152) a 1024-row micro-batch held 300 MB there, and the unfused backward spent
a tenth of a CPU training step zero-filling and re-reading them. The incoming gradient of
the loss (a scalar: the trainer's 1 / target tokens) scales the stored gradient in backward.
"""

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from tandem.kernels import row_buckets

# Rows per block: the float32 logits of a block are BLOCK_ROWS x vocab (50 MB for SmolLM2); 64
# to 1024 rows measured within 10% of each other, all 0.6x the unfused time at 1016 rows.
BLOCK_ROWS = 256


class LinearCrossEntropy(torch.autograd.Function):
    """Summed token cross-entropy of logits h W^T; differentiable in h (W is frozen)."""

    @staticmethod
    def forward(ctx: FunctionCtx, h: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
        needs_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(h) if needs_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], BLOCK_ROWS):
            rows = slice(start, start + BLOCK_ROWS)
            logits = row_buckets.linear(h[rows], weight).float()
            target = targets[rows, None]
            lse = torch.logsumexp(logits, 1, keepdim=True)
            loss += (lse - logits.gather(1, target)).sum()
            if needs_grad:
                probs = logits.sub_(lse).exp_()
                probs.scatter_add_(1, target, torch.full_like(target, -1, dtype=probs.dtype))
                grad[rows] = torch.mm(probs.to(h.dtype), weight)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, dloss: Tensor) -> tuple[Tensor | None, None, None]:
        (grad,) = ctx.saved_tensors
        return grad.float().mul_(dloss).to(grad.dtype), None, None


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """h: [n, hidden], weight: [vocab, hidden], targets: [n] int64 -> the summed loss, float32 scalar."""
    return LinearCrossEntropy.apply(h, weight, targets)
