"""FusedLinear plus per-token LoRA deltas: served adapters from device slots, and adapters
being trained, whose weights carry autograd. For a co-served micro-batch it also keeps the
frozen weight's output of its rows in a forward chunk and replays it in the backward slice
(server/model/kept_activations.py).

Attached after the model is built (the gpt-fast way): the model file knows nothing of LoRA.
Each linear knows only its (layer, group) key; the weights and each token's slot come with
the batch, so one call serves every adapter at once and the layer holds no state.
"""

import torch

from tandem.kernels.lora import LoRAWeights, lora_add_autograd, lora_delta, lora_delta_autograd, lora_delta_pairs
from tandem.server.model.batch import ForwardBatch, LoRARows
from tandem.server.model.linear import FusedLinear
from tandem.server.model.llama import LlamaModel
from tandem.server.model.lora_targets import replace_linears


class LoRALinear(FusedLinear):
    def __init__(self, base: FusedLinear, key: tuple[int, str]):
        super().__init__(base.weight.data, None if base.bias is None else base.bias.data, base.out_slices)
        self.key = key

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        kept = batch.kept
        if kept is not None and kept.replaying:
            y = self.packed.replayed(x, kept.outputs[self.key], self.weight)
        else:
            y = super().forward(x, batch)
            if kept is not None:  # before any delta lands in y in place
                kept.keep_output(self.key, y)
        served = batch.lora
        if served is not None and self.key in served.weights:
            self.add_served(x, served, y)
        trained = batch.train_lora
        if trained is not None and trained.routing is not None:  # a router's gates train
            if self.key in trained.routing.gates:
                y = y + trained.routing.trained_delta(_dropout(x, trained), trained.weights[self.key], self.key, x.shape[0])
        elif trained is not None and self.key in trained.weights:
            w = trained.weights[self.key]
            if trained.dropout and w.num_slices > 1:
                y = y + _dropped_per_slice(x, w, trained)
            elif torch.is_grad_enabled():
                y = lora_add_autograd(y, _dropout(x, trained), w, trained.tokens)
            else:  # a co-served forward chunk keeps no graph: the served path's in-place add
                lora_delta(_dropout(x, trained), w, trained.tokens, y)
        return y

    def add_served(self, x: torch.Tensor, served: LoRARows, y: torch.Tensor) -> None:
        """y += the served adapters' deltas, in place and outside any graph (served adapters
        are frozen); one method so that a profiler can time every served LoRA call."""
        if torch.is_grad_enabled():  # a forward that also trains: these rows stay out of its graph
            with torch.no_grad():
                self._add_served(x.detach(), served, y)
        else:  # inference: no graph to keep out of (a no_grad context costs ~1.5 us a call)
            self._add_served(x, served, y)

    def _add_served(self, x: torch.Tensor, served: LoRARows, y: torch.Tensor) -> None:
        w, routing = served.weights[self.key], served.routing
        if routing is not None and self.key in routing.gates:
            routing.add_delta(x, w, served.tokens, self.key, y, served.mixed)
        elif served.mixed is not None:
            lora_delta_pairs(x, w, served.mixed.pairs, y)
        elif served.tokens.num_lora_tokens:
            lora_delta(x, w, served.tokens, y)


def _dropped_per_slice(x: torch.Tensor, w: LoRAWeights, rows: LoRARows) -> torch.Tensor:
    """The trained delta of a fused group (q/k/v, gate/up) under lora_dropout: PEFT draws a
    mask per module, so each slice gets its own mask and shrink (one shared mask would drop
    the same input features for q, k and v alike)."""
    return torch.cat([lora_delta_autograd(_dropout(x, rows), w.slice(s), rows.tokens) for s in range(w.num_slices)], dim=1)


def _dropout(x: torch.Tensor, rows: LoRARows) -> torch.Tensor:
    """PEFT's lora_dropout on the LoRA input of one module."""
    if not rows.dropout:
        return x
    keep = torch.empty_like(x).bernoulli_(1 - rows.dropout, generator=rows.generator)
    return x * keep / (1 - rows.dropout)


def attach_lora(model: LlamaModel) -> None:
    """Make every LoRA-able linear of the model a LoRALinear (idempotent)."""
    replace_linears(model, lambda key, linear: linear if isinstance(linear, LoRALinear) else LoRALinear(linear, key))

