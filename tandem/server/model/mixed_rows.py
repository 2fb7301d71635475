"""The fixed-weight pairs of a step that serves per-request mixtures.

A mixture's tokens are k (slot, weight) pairs whose weights do not change from layer to
layer (unlike a router's), so the step's pairs are grouped by slot once and shared by every
linear: plain-adapter tokens are one pair of weight 1, mixture tokens one pair per member,
base and routed tokens none. A routed linear starts its per-layer pairs from these.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from tandem.kernels.lora import LoRAPairs


@dataclass(frozen=True)
class MixedRows:
    """slots: [T, k] int32, -1 = no pair; weights: [T, k] float32; pairs: them grouped by slot."""

    slots: Tensor
    weights: Tensor
    pairs: LoRAPairs

    @property
    def k(self) -> int:
        return self.slots.shape[1]

    @classmethod
    def build(
        cls, token_slots: list[int], mixtures: list[tuple[tuple[int, ...], tuple[float, ...], int, int]],
        num_slots: int, device: torch.device,
    ) -> "MixedRows":
        """token_slots: [T] each plain token's slot (-1 none); mixtures: (member slots, their
        weights, first row, rows) of each mixture's chunk, whose rows are -1 in token_slots."""
        k = max(len(slots) for slots, _, _, _ in mixtures)
        slots = torch.full((len(token_slots), k), -1, dtype=torch.int32)
        weights = torch.zeros(len(token_slots), k, dtype=torch.float32)
        slots[:, 0] = torch.tensor(token_slots, dtype=torch.int32)
        weights[:, 0] = (slots[:, 0] >= 0).to(torch.float32)
        for member_slots, member_weights, start, n in mixtures:
            m = len(member_slots)
            slots[start : start + n, :m] = torch.tensor(member_slots, dtype=torch.int32)
            weights[start : start + n, :m] = torch.tensor(member_weights, dtype=torch.float32)
        slots, weights = slots.to(device), weights.to(device)
        return cls(slots, weights, LoRAPairs.build(slots, weights, num_slots))
