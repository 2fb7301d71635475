"""The summed cross-entropy of hidden states through a frozen output projection, without
ever holding the [rows, vocab] logits or their gradient.

A training step's head is the largest GEMM pair of a small model (SmolLM2: 49152 x 576 per
row, twice) and, done the plain way, three more passes over a [rows, vocab] float32 tensor
each way (log-softmax, its backward, the one-hot fill): at 1024 rows that is 200 MB a pass,
~1.0 s of a ~5 s step on a 2-core EPYC. Here each chunk of rows' gradient (softmax minus
one-hot) is formed in the forward, in place of its logits, and multiplied straight back
through the weight, so the backward is one scale of a [rows, hidden] tensor. The logits are
computed outside autograd, so they may come from a reordered (oneDNN) copy of the weight:
the head ran 1.6-2x faster than the plain path on that EPYC (chunks of 128 rows; 64 and 256
were slower). Within a chunk the float32 passes go SUB_ROWS rows at a time through two
buffers that stay in cache: [128, 49152] in float32 is 25 MB, and the passes over it ran at
DRAM speed (a 2 x 512 bf16 step's head: ~450 ms with per-chunk tensors, ~290 ms so).

Numerics follow `compute_logits` + `F.cross_entropy` op for op (logits in the weight's dtype,
cast to float32, log-softmax, its exp minus the one-hot, cast back to the hidden states'
dtype before the GEMM): gradients through a 30-layer model amplify a head's rounding
several-fold, and another formula (logsumexp, or an exact float64 head) moved SmolLM2's
LoRA gradients 4x further from peft's than peft's own float32 rounding.
"""

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

CHUNK_ROWS = 128
SUB_ROWS = 16

Project = Callable[[Tensor], Tensor]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, hidden: Tensor, weight: Tensor, targets: Tensor, project: Project, project_back: Project | None) -> Tensor:
        loss, grad = _chunked(hidden, weight, targets, project, project_back, with_grad=True)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, dloss: Tensor) -> tuple[Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return grad * dloss.to(grad.dtype), None, None, None, None


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, project: Project, project_back: Project | None = None
) -> Tensor:
    """sum over rows of cross_entropy(hidden @ weight^T, targets), a float32 scalar,
    differentiable in hidden (weight is frozen: it gets no gradient).

    hidden: [N, H]; weight: [V, H]; targets: [N] class indices in [0, V). project(h) gives
    h @ weight^T for a chunk of rows (F.linear, or through a prepacked copy of the weight); it
    is called without autograd. project_back(g) gives g @ weight for a chunk's logit gradient
    (through a reordered copy of weight^T: SmolLM2's head at 96 rows took 9 ms so, 18 ms
    through torch.mm on a 2-core Zen 5 EPYC); None: torch.mm.
    """
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy computes no weight gradient: the weight must be frozen")
    if torch.is_grad_enabled() and hidden.requires_grad:
        return _LinearCrossEntropy.apply(hidden, weight, targets, project, project_back)
    with torch.no_grad():
        return _chunked(hidden, weight, targets, project, None, with_grad=False)[0]


def _chunked(
    hidden: Tensor, weight: Tensor, targets: Tensor, project: Project, project_back: Project | None, with_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """The summed loss and, with_grad, d(loss)/d(hidden), a chunk of rows at a time.

    The float32 passes (cast, log-softmax, exp, one-hot) run SUB_ROWS rows at a time in two
    buffers that stay in cache; only the chunk's logits and gradient in the weight's dtype go
    through memory. Every buffer is made once per call, not per chunk."""
    rows, vocab = min(CHUNK_ROWS, hidden.shape[0]), weight.shape[0]
    logits32 = torch.empty(min(SUB_ROWS, rows), vocab, dtype=torch.float32, device=hidden.device)
    logp = torch.empty_like(logits32)
    minus_one = torch.full((logits32.shape[0], 1), -1.0, device=hidden.device)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad = torch.empty_like(hidden) if with_grad else None
    probs = torch.empty(rows, vocab, dtype=hidden.dtype, device=hidden.device) if with_grad else None
    for start in range(0, hidden.shape[0], CHUNK_ROWS):
        logits = project(hidden[start : start + CHUNK_ROWS])
        for sub in range(0, logits.shape[0], SUB_ROWS):
            n = min(SUB_ROWS, logits.shape[0] - sub)
            t = targets[start + sub : start + sub + n, None]
            lp = torch.log_softmax(logits32[:n].copy_(logits[sub : sub + n]), dim=-1, out=logp[:n])
            loss -= lp.gather(1, t).sum()
            if probs is not None:
                lp.exp_().scatter_add_(1, t, minus_one[:n])
                probs[sub : sub + n].copy_(lp)
        if grad is not None and project_back is not None:
            grad[start : start + CHUNK_ROWS] = project_back(probs[: logits.shape[0]])
        elif grad is not None:
            torch.mm(probs[: logits.shape[0]], weight, out=grad[start : start + CHUNK_ROWS])
    return loss, grad
