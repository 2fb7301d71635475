"""FusedLinear plus a per-token LoRA delta from the device slot pool.

Attached after the model is built (the gpt-fast way): the model file knows nothing of LoRA.
Each token's adapter slot comes with the batch, so one call serves every adapter at once.
"""

import torch

from kernels.lora import LoRAWeights, lora_delta
from server.model.batch import ForwardBatch
from server.model.linear import FusedLinear


class LoRALinear(FusedLinear):
    def __init__(self, base: FusedLinear, lora: LoRAWeights):
        super().__init__(base.weight.data, None if base.bias is None else base.bias.data, base.out_slices)
        self.lora = lora

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        y = super().forward(x, batch)
        if batch.lora is not None and batch.lora.num_lora_tokens:
            lora_delta(x, self.lora, batch.lora, y)
        return y
