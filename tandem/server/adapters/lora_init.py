"""The LoRA initialisation Tandem's trainer draws, reproducible from its seed.

PEFT's init: B = 0 and A as nn.Linear's default (Kaiming-uniform, a = sqrt(5), i.e.
uniform in +-1/sqrt(in_features)). The trainer draws every A from one
torch.Generator().manual_seed(seed), one tensor after another in draw order (layer by
layer, projections in PEFT's q, k, v, o, gate, up, down order). A trained adapter's A is
that draw plus what training moved, so a compressed adapter can store the move alone and
redraw the rest (compeft_format.py): the move is what compresses well, the draw does not.
"""

import math
from collections.abc import Iterable

import torch

from tandem.server.model.lora_targets import TARGETS


def draw_order(modules: Iterable[tuple[int, str]]) -> list[tuple[int, str]]:
    """(layer, PEFT projection name) pairs in the order the trainer draws their A."""
    return sorted(modules, key=lambda m: (m[0], TARGETS.index(m[1])))


def initial_a(shapes: Iterable[tuple[int, int]], seed: int) -> list[torch.Tensor]:
    """The float32 A [r, in] of each shape, drawn in the order given from the seed: what
    nn.init.kaiming_uniform_(a, a=sqrt(5), generator=...) draws, without its per-call
    bookkeeping (a slot load of a compressed adapter redraws a few hundred of these)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.empty(shape).uniform_(-initial_a_bound(shape[1]), initial_a_bound(shape[1]), generator=generator) for shape in shapes]


def initial_a_bound(in_features: int) -> float:
    """The largest |value| an initial A over in_features inputs can hold, computed as
    kaiming_uniform_ computes it (gain sqrt(2 / (1 + a^2)), bound sqrt(3) * gain / sqrt(fan_in))."""
    return math.sqrt(3.0) * (math.sqrt(2.0 / (1 + math.sqrt(5) ** 2)) / math.sqrt(in_features))
