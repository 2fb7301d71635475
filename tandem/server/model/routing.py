"""Per-token routing over LoRA experts in a served step: at every gated linear a router's
gate over that linear's input picks each routed token's top-k experts and their weights.

Built once per step (RoutedRows). On CUDA the per-linear work (gate matmul, top-k, softmax,
the grouping of (token, expert) pairs by slot) runs on the device with no host sync, and
feeds the same batched-LoRA kernels as plain adapters: plain-adapter tokens are one pair of
weight 1, routed tokens k pairs, all in one LoRAPairs pass. On CPU the plain tokens keep
the plain path (its grids) and each router's tokens run dense over its experts
(mixture.lora_delta_mixture), which there costs less than grouping pairs by slot.
"""

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tandem.kernels.lora import LoRABatch, LoRAPairs, LoRAWeights, lora_delta, lora_delta_pairs, plain_pairs
from tandem.kernels.lora.mixture import lora_delta_mixture, uniform_rank
from tandem.server.model.mixed_rows import MixedRows


@dataclass(frozen=True)
class StepRouter:
    """One router as a step uses it: its gates (per (layer, group), [E, in] float32 on the
    device), its experts' slots in gate order, top_k and temperature."""

    gates: Mapping[tuple[int, str], Tensor]
    expert_slots: tuple[int, ...]
    top_k: int
    temperature: float


@dataclass(frozen=True)
class RoutedRows:
    """The routed tokens of a step, with what the per-linear routing needs per token, built
    once per step so that a gated linear costs a few ops (this runs 4 times per layer).

    tokens:  [R] int64, the rows of routed tokens; first_token: when they are consecutive
             rows first, first + 1, ... (one routed sequence, or all rows), that first row.
    routers: [R] int64, each routed token's router (index into step_routers).
    token_slots: [R, E] int64, the slot of each token's router's expert e (-1 past them).
    inv_temperature: [R, 1] float32.
    logit_bias: [R, E], -inf past a router's experts (they never win); None when every
             router has E experts.
    empty:   per gated (layer, group), [R, k] bool, the pairs that stay empty (past a
             router's top_k, or every pair of a router without a gate there); None when none.
    gates:   per (layer, group) gated by any router, [num_routers, E, in] float32 (zero for
             a router without a gate there).
    k:       the step's largest top_k (host).
    usage:   [R, E] float32, each token's gate weights summed over the gated linears, for
             reporting which expert the gate chose; updated by every routed layer.
    step_routers: the routers, with router_rows[i] the positions (in tokens) of router i's.
    labels:  training only: [R] int64, the expert each routed token's task calls for (-1 =
             none); aux_scale weighs the routing loss (see trained_delta).
    """

    tokens: Tensor
    first_token: int | None
    routers: Tensor
    token_slots: Tensor
    inv_temperature: Tensor
    logit_bias: Tensor | None
    empty: Mapping[tuple[int, str], Tensor | None]
    gates: Mapping[tuple[int, str], Tensor]
    k: int
    usage: Tensor
    step_routers: tuple[StepRouter, ...]
    router_rows: tuple[Tensor, ...]
    labels: Tensor | None = None
    aux_scale: float = 0.0

    @classmethod
    def build(
        cls, routers: list[StepRouter], token_routers: list[int], tokens: list[int], device: torch.device,
        labels: list[int] | None = None, aux_scale: float = 0.0,
    ) -> "RoutedRows":
        """token_routers[i]: the router (index into routers) of row tokens[i]; labels[i]
        (training): the expert its task calls for, -1 = none."""
        num_experts = max(len(r.expert_slots) for r in routers)
        k = max(r.top_k for r in routers)
        which = torch.tensor(token_routers, dtype=torch.int64)
        slots = torch.tensor([list(r.expert_slots) + [-1] * (num_experts - len(r.expert_slots)) for r in routers])[which]
        short = [i for i, r in enumerate(routers) if r.top_k < k]
        past_top_k = torch.arange(k)[None, :] >= torch.tensor([r.top_k for r in routers])[which][:, None]
        gates, empty = {}, {}
        for key in sorted({key for r in routers for key in r.gates}):
            present = [key in r.gates for r in routers]
            if len(routers) == 1:
                gates[key] = routers[0].gates[key].unsqueeze(0)  # a view: no copy per step
            else:
                in_features = next(r.gates[key].shape[1] for r in routers if key in r.gates)
                stack = torch.zeros(len(routers), num_experts, in_features, device=device)
                for i, r in enumerate(routers):
                    if key in r.gates:
                        stack[i, : len(r.expert_slots)] = r.gates[key]
                gates[key] = stack
            empty[key] = None
            if short or not all(present):
                empty[key] = (past_top_k | ~torch.tensor(present)[which][:, None]).to(device)
        first = tokens[0] if tokens == list(range(tokens[0], tokens[0] + len(tokens))) else None
        return cls(
            tokens=torch.tensor(tokens, dtype=torch.int64).to(device),
            first_token=first,
            routers=which.to(device),
            token_slots=slots.to(device),
            inv_temperature=torch.tensor([1 / r.temperature for r in routers], dtype=torch.float32)[which][:, None].to(device),
            logit_bias=torch.where(slots < 0, float("-inf"), 0.0).to(device) if (slots < 0).any() else None,
            empty=empty,
            gates=gates,
            k=k,
            usage=torch.zeros(len(tokens), num_experts, device=device),
            step_routers=tuple(routers),
            router_rows=tuple(
                torch.tensor([p for p, r in enumerate(token_routers) if r == i], dtype=torch.int64).to(device)
                for i in range(len(routers))
            ),
            labels=None if labels is None else torch.tensor(labels, dtype=torch.int64).to(device),
            aux_scale=aux_scale,
        )

    def rows_of(self, t: Tensor) -> Tensor:
        """t's rows of the routed tokens: a view when they are consecutive."""
        first = self.first_token
        return t[first : first + self.tokens.shape[0]] if first is not None else t.index_select(0, self.tokens)

    def route(self, x: Tensor, key: tuple[int, str]) -> tuple[Tensor, Tensor, Tensor | None]:
        """At the linear `key`, for routed rows' inputs x [R, in]: [R, k] expert indices and
        weights (softmax over the top-k gate logits / temperature, in float32), and which
        pairs stay empty (weight 0; None when none)."""
        gates = self.gates[key]
        num_routers, num_experts, _ = gates.shape
        if num_routers == 1:
            logits = x.to(torch.float32) @ gates[0].t()
        else:
            all_logits = (x.to(torch.float32) @ gates.reshape(num_routers * num_experts, -1).t()).view(-1, num_routers, num_experts)
            logits = all_logits.gather(1, self.routers.view(-1, 1, 1).expand(-1, 1, num_experts)).squeeze(1)
        logits = logits * self.inv_temperature
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        # Ties (zero gates: a uniform start) go to the lower expert index: topk's order among
        # equal values changed with the tensor's width, the step's widest router, so a token's
        # experts depended on which routers shared its batch.
        top_logits, experts = logits.sort(dim=1, descending=True, stable=True)
        top_logits, experts = top_logits[:, : self.k], experts[:, : self.k]
        empty = self.empty[key]
        if empty is None:
            return experts, torch.softmax(top_logits, dim=1), None
        weights = torch.softmax(top_logits.masked_fill(empty, float("-inf")), dim=1).nan_to_num(0.0)
        return experts, weights, empty

    def add_delta(
        self, x: Tensor, w: LoRAWeights, batch: LoRABatch, key: tuple[int, str], y: Tensor, mixed: MixedRows | None = None
    ) -> None:
        """y += the step's LoRA deltas at linear `key` (x: its input [T, in]): plain-adapter,
        mixture and routed tokens' alike; adds the routed weights to usage."""
        if x.device.type != "cpu":
            lora_delta_pairs(x, w, self.pairs(x, batch, key, w.num_slots, mixed), y)
            return
        ranks = [uniform_rank(w, r.expert_slots) for r in self.step_routers]
        if None in ranks:  # experts of different ranks here: no dense stack; pairs instead
            lora_delta_pairs(x, w, self.pairs(x, batch, key, w.num_slots, mixed), y)
            return
        if mixed is not None:
            lora_delta_pairs(x, w, mixed.pairs, y)
        elif batch.num_lora_tokens:
            lora_delta(x, w, batch, y)
        xs = self.rows_of(x)
        experts, weights, _ = self.route(xs, key)
        mix = torch.zeros_like(self.usage).scatter_add_(1, experts, weights)
        self.usage.add_(mix)
        if len(self.step_routers) == 1:
            router = self.step_routers[0]
            mix = mix[:, : len(router.expert_slots)]
            if self.first_token is not None:  # consecutive rows: added into y's own rows
                lora_delta_mixture(xs, w, router.expert_slots, ranks[0], mix, out=self.rows_of(y))
            else:
                _add_rows(y, lora_delta_mixture(xs, w, router.expert_slots, ranks[0], mix), self.tokens)
            return
        for router, rank, positions in zip(self.step_routers, ranks, self.router_rows):
            n = len(router.expert_slots)
            delta = lora_delta_mixture(xs.index_select(0, positions), w, router.expert_slots, rank, mix.index_select(0, positions)[:, :n])
            _add_rows(y, delta, self.tokens.index_select(0, positions))

    def trained_delta(self, x: Tensor, w: LoRAWeights, key: tuple[int, str], num_rows: int) -> Tensor:
        """The routed rows' delta at `key` as a new [num_rows, N] tensor, differentiable in x
        and in the gates (the experts' weights are frozen): how a router's gates train.

        With labels, the routing loss of this linear, aux_scale * (summed cross-entropy of the
        full softmax over experts against each labelled token's expert), joins the objective
        through the output (see _AddLoss). One router per training step."""
        (router,) = self.step_routers
        xs = self.rows_of(x)
        experts, weights, _ = self.route(xs, key)
        mix = torch.zeros(xs.shape[0], self.usage.shape[1], device=x.device).scatter(1, experts, weights)
        self.usage.add_(mix.detach())
        rank = uniform_rank(w, router.expert_slots)
        if rank is not None:
            delta = lora_delta_mixture(xs, w, router.expert_slots, rank, mix)
        else:  # experts of different ranks: one at a time (a training path, not a serving one)
            delta = None
            for e, slot in enumerate(router.expert_slots):
                part = lora_delta_mixture(xs, w, (slot,), w.host_ranks[slot], mix[:, e : e + 1])
                if part is not None:
                    delta = part if delta is None else delta + part
        out = torch.zeros(num_rows, w.out_features, dtype=x.dtype, device=x.device)
        if delta is not None:
            out = out.index_add(0, self.tokens, delta.to(x.dtype))
        if self.labels is not None and self.aux_scale:
            logits = (xs.to(torch.float32) @ self.gates[key][0].t()) * self.inv_temperature
            loss = F.cross_entropy(logits, self.labels, ignore_index=-1, reduction="sum")
            out = _AddLoss.apply(out, loss * self.aux_scale)
        return out

    def pairs(
        self, x: Tensor, batch: LoRABatch, key: tuple[int, str], num_slots: int, mixed: MixedRows | None = None
    ) -> LoRAPairs:
        """The step's (slot, weight) pairs at linear `key`: plain tokens' slots with weight 1,
        mixture tokens' fixed pairs, routed tokens' top-k experts; adds the routed weights to usage."""
        experts, weights, empty = self.route(self.rows_of(x), key)
        self.usage.scatter_add_(1, experts, weights)
        slots = self.token_slots.gather(1, experts)
        if empty is not None:
            slots = slots.masked_fill(empty, -1)
        if mixed is None:
            all_slots, all_weights = plain_pairs(batch, self.k)
        else:
            k = max(self.k, mixed.k)
            all_slots = F.pad(mixed.slots, (0, k - mixed.k), value=-1)
            all_weights = F.pad(mixed.weights, (0, k - mixed.k))
            slots = F.pad(slots, (0, k - self.k), value=-1)
            weights = F.pad(weights, (0, k - self.k))
        all_slots.index_copy_(0, self.tokens, slots.to(all_slots.dtype))
        all_weights.index_copy_(0, self.tokens, weights)
        return LoRAPairs.build(all_slots, all_weights, num_slots)


def _add_rows(y: Tensor, delta: Tensor | None, rows: Tensor) -> None:
    """y[rows] += delta; nothing when delta is None (experts of rank 0 at this linear)."""
    if delta is not None:
        y.index_add_(0, rows, delta.to(y.dtype))


class _AddLoss(torch.autograd.Function):
    """Identity on y whose backward also starts the gradient of a scalar `loss`, as if it were
    added to the objective: how an auxiliary loss computed inside the model reaches the
    backward that starts from the language-model loss (Megatron's MoE aux-loss scaler)."""

    @staticmethod
    def forward(ctx, y: Tensor, loss: Tensor) -> Tensor:
        ctx.save_for_backward(loss)
        return y.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        (loss,) = ctx.saved_tensors
        return grad, torch.ones_like(loss)
