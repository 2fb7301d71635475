"""What a co-served micro-batch's backward needs from its forward chunks, for its rows only.

The forward chunks run beside inference without a graph (server/engine/coserve.py); a
backward slice then rebuilds each layer's graph over the micro-batch's whole sequences.
Rebuilding it from the layer's input alone multiplies by every frozen weight again: on a
2-core EPYC (SmolLM2, bfloat16, 512 tokens) that recompute was 18 of a layer's 43 ms, the
backward proper 25. So the forward also keeps each frozen linear's output for these rows,
and the slice replays it: the linear hands back what the forward computed, with the
linear's activation gradient attached (Prepacked.replayed), and only the cheap parts run
again (norms, RoPE, attention, SiLU, the trained adapter's rank-r GEMMs).
"""

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class KeptActivations:
    """inputs: [num_layers + 1, tokens, hidden], each layer's input (the last: the top
    layer's output, where the head starts). outputs: per LoRA-able linear (layer, group),
    [tokens, out_features], the frozen weight's output before any LoRA delta.
    rows, dest: in a forward chunk, the batch rows of the micro-batch's tokens and where they
    go here, each one contiguous run (the chunks follow one another in both); None in a
    backward slice, which replays what is here instead of computing it."""

    inputs: torch.Tensor
    outputs: Mapping[tuple[int, str], torch.Tensor]
    rows: slice | None = None
    dest: slice | None = None

    @classmethod
    def empty(
        cls, num_layers: int, tokens: int, hidden: int, widths: Mapping[tuple[int, str], int], dtype: torch.dtype, device: torch.device
    ) -> "KeptActivations":
        """Room for a micro-batch of `tokens`; widths: each linear's out_features."""
        outputs = {key: torch.empty(tokens, width, dtype=dtype, device=device) for key, width in widths.items()}
        return cls(torch.empty(num_layers + 1, tokens, hidden, dtype=dtype, device=device), outputs)

    @property
    def replaying(self) -> bool:
        return self.rows is None

    def keeping(self, rows: slice, dest: slice) -> "KeptActivations":
        """The same storage, kept into by a forward whose rows `rows` are its rows `dest`."""
        return replace(self, rows=rows, dest=dest)

    def rows_between(self, start: int, stop: int) -> "KeptActivations":
        """Its rows [start, stop), for a backward slice over some of its sequences."""
        return KeptActivations(self.inputs[:, start:stop], {key: t[start:stop] for key, t in self.outputs.items()})

    # Slices, not index tensors: 32 rows of 3072 bfloat16 took 8 us to copy where
    # index_select + index_copy_ took 35 (2-core EPYC), and a chunk keeps 5 per layer.
    def keep_input(self, layer: int, x: torch.Tensor) -> None:
        self.inputs[layer][self.dest].copy_(x[self.rows])

    def keep_output(self, key: tuple[int, str], y: torch.Tensor) -> None:
        self.outputs[key][self.dest].copy_(y[self.rows])
