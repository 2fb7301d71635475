"""What a co-served micro-batch's backward needs from its forward chunks, for its rows only.

The forward chunks run beside inference without a graph (server/engine/coserve.py); a
backward slice then rebuilds each layer's graph over the micro-batch's whole sequences.
Rebuilding it from the layer's input alone multiplies by every frozen weight again: on a
2-core EPYC (SmolLM2, bfloat16, 512 tokens) that recompute was 18 of a layer's 43 ms, the
backward proper 25. So the forward also keeps each frozen linear's output for these rows,
and the slice replays it: the linear hands back what the forward computed, with the
linear's activation gradient attached (Prepacked.replayed), and only the cheap parts run
again (norms, RoPE, attention, SiLU, the trained adapter's rank-r GEMMs).

A micro-batch that starts with no inference running has no one to share its forward with:
it runs whole, in one iteration, with autograd, cut at every layer's input (KeptGraph), and
its backward slices run those graphs instead of replaying, as a time-sliced step would. The
replay cost that (2-core EPYC, SmolLM2, bfloat16, 4 x 128 tokens, r 16 on every linear) 1.41 s
a micro-batch alone against 1.21 s time-sliced. It keeps the activations above as well: a
slice over some of a layer's sequences (beside inference, where not one whole layer fits)
cannot run part of a graph, and replays them instead.
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
    # detach: a forward with a graph (KeptGraph) keeps values, not the graph.
    def keep_input(self, layer: int, x: torch.Tensor) -> None:
        self.inputs[layer][self.dest].copy_(x[self.rows].detach())

    def keep_output(self, key: tuple[int, str], y: torch.Tensor) -> None:
        self.outputs[key][self.dest].copy_(y[self.rows].detach())


@dataclass
class KeptGraph:
    """A micro-batch's forward with autograd, cut at each layer's input: inputs[l] is layer
    l's input as a leaf, outputs[l] its output, whose graph reaches back to inputs[l] and to
    the trained adapter. A layer's entries are dropped once its backward ran (None), which
    frees its saved activations."""

    inputs: list[torch.Tensor | None]
    outputs: list[torch.Tensor | None]

    def backward(self, layer: int, grad: torch.Tensor) -> torch.Tensor:
        """Backpropagate grad (at layer's output) through layer; the gradient at its input."""
        x, y = self.inputs[layer], self.outputs[layer]
        if x is None or y is None:
            raise RuntimeError(f"layer {layer}'s graph was already used or dropped")
        y.backward(grad)
        self.drop(layer)
        return x.grad

    def drop(self, layer: int) -> None:
        self.inputs[layer] = self.outputs[layer] = None
