"""The one linear layer every projection of the model goes through.

Fusing q/k/v and gate/up into one weight halves the number of GEMM launches; the output
is split into named slices afterwards. Forwards without autograd run through a copy of the
weight reordered once for oneDNN where the CPU has it (tandem/kernels/packed_linear.py).
Batched LoRA (issue 2) attaches here and only here: it wraps `forward` to add a per-token
delta to each slice, so the model code never changes.
"""

from typing import TYPE_CHECKING

import torch
from torch import nn

from tandem.kernels.packed_linear import Prepacked

if TYPE_CHECKING:
    from tandem.server.model.batch import ForwardBatch


class FusedLinear(nn.Module):
    """y = x W^T (+ b) for a weight made of stacked output slices.

    weight: [sum(out_slices), in_features]; bias: [sum(out_slices)] or None.
    out_slices names the widths of the stacked projections, e.g. (q, k, v) widths.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, out_slices: tuple[int, ...]):
        super().__init__()
        if weight.shape[0] != sum(out_slices):
            raise ValueError(f"weight has {weight.shape[0]} rows, slices sum to {sum(out_slices)}")
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.out_slices = out_slices
        self.packed = Prepacked()

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def forward(self, x: torch.Tensor, batch: "ForwardBatch") -> torch.Tensor:
        """x: [T, in_features] -> [T, sum(out_slices)]; batch carries per-token adapter ids for LoRA."""
        return self.packed.linear(x, self.weight, self.bias)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(y, self.out_slices, dim=-1)
