"""Per-token routing over LoRA experts in a served step: at every gated linear a router's
gate over that linear's input picks each routed token's top-k experts and their weights.

Built once per step (RoutedRows). On CUDA the per-linear work (gate matmul, top-k, softmax,
the grouping of (token, expert) pairs by slot) runs on the device with no host sync, and
feeds the same batched-LoRA kernels as plain adapters: plain-adapter tokens are one pair of
weight 1, routed tokens k pairs, all in one LoRAPairs pass. On CPU the plain tokens keep
the plain path (its grids) and each router's tokens run dense over its experts
(reference.lora_delta_mixture), which there costs less than grouping pairs by slot.
"""

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from tandem.kernels.lora import LoRABatch, LoRAPairs, LoRAWeights, lora_delta, lora_delta_pairs, plain_pairs
from tandem.kernels.lora.reference import lora_delta_mixture, uniform_rank


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
    """The routed tokens of a step.

    tokens:  [R] int64, the rows of routed tokens.
    routers: [R] int64, each routed token's router (index into the step's routers).
    expert_slots: [num_routers, E] int64, the slot of each router's expert e (-1 past its experts).
    top_k:   [num_routers] int64; temperature: [num_routers] float32.
    gates:   per (layer, group) gated by any of the step's routers, [num_routers, E, in]
             float32 (zero rows for a router without a gate there: its tokens get no delta).
    gated:   per (layer, group), [num_routers] bool, which routers gate it.
    k:       the step's largest top_k (host).
    usage:   [R, E] float32, each token's gate weights summed over the gated linears, for
             reporting which expert the gate chose; updated by every routed layer.
    step_routers: the routers, with router_rows[i] the positions (in tokens) of router i's.
    """

    tokens: Tensor
    routers: Tensor
    expert_slots: Tensor
    top_k: Tensor
    temperature: Tensor
    gates: Mapping[tuple[int, str], Tensor]
    gated: Mapping[tuple[int, str], Tensor]
    k: int
    usage: Tensor
    step_routers: tuple[StepRouter, ...]
    router_rows: tuple[Tensor, ...]

    @classmethod
    def build(cls, routers: list[StepRouter], token_routers: list[int], tokens: list[int], device: torch.device) -> "RoutedRows":
        """token_routers[i]: the router (index into routers) of row tokens[i]."""
        num_experts = max(len(r.expert_slots) for r in routers)
        slots = [list(r.expert_slots) + [-1] * (num_experts - len(r.expert_slots)) for r in routers]
        keys = sorted({key for r in routers for key in r.gates})
        gates, gated = {}, {}
        for key in keys:
            present = [key in r.gates for r in routers]
            if all(present) and len(routers) == 1:
                gates[key] = routers[0].gates[key].unsqueeze(0)  # a view: no copy per step
            else:
                in_features = next(r.gates[key].shape[1] for r in routers if key in r.gates)
                stack = torch.zeros(len(routers), num_experts, in_features, device=device)
                for i, r in enumerate(routers):
                    if key in r.gates:
                        stack[i, : len(r.expert_slots)] = r.gates[key]
                gates[key] = stack
            gated[key] = torch.tensor(present, device=device)
        return cls(
            tokens=torch.tensor(tokens, dtype=torch.int64).to(device),
            routers=torch.tensor(token_routers, dtype=torch.int64).to(device),
            expert_slots=torch.tensor(slots, dtype=torch.int64).to(device),
            top_k=torch.tensor([r.top_k for r in routers], dtype=torch.int64).to(device),
            temperature=torch.tensor([r.temperature for r in routers], dtype=torch.float32).to(device),
            gates=gates,
            gated=gated,
            k=max(r.top_k for r in routers),
            usage=torch.zeros(len(tokens), num_experts, device=device),
            step_routers=tuple(routers),
            router_rows=tuple(
                torch.tensor([p for p, r in enumerate(token_routers) if r == i], dtype=torch.int64).to(device)
                for i in range(len(routers))
            ),
        )

    def route(self, x: Tensor, key: tuple[int, str]) -> tuple[Tensor, Tensor, Tensor]:
        """At the linear `key`, for routed rows' inputs x [R, in]: [R, k] expert indices,
        slots (-1 = no pair) and weights. Logits in float32; experts past a router's count
        never win; pairs past a router's top_k, or of a router without a gate here, are empty."""
        gates = self.gates[key]
        num_routers, num_experts, _ = gates.shape
        if num_routers == 1:
            logits = x.to(torch.float32) @ gates[0].t()
        else:
            all_logits = (x.to(torch.float32) @ gates.reshape(num_routers * num_experts, -1).t()).view(-1, num_routers, num_experts)
            logits = all_logits.gather(1, self.routers.view(-1, 1, 1).expand(-1, 1, num_experts)).squeeze(1)
        expert_slots = self.expert_slots[self.routers]
        logits = logits / self.temperature[self.routers, None]
        logits = logits.masked_fill(expert_slots < 0, float("-inf"))
        top_logits, experts = logits.topk(self.k, dim=1)
        empty = torch.arange(self.k, device=x.device)[None, :] >= self.top_k[self.routers, None]
        empty = empty | ~self.gated[key][self.routers, None]
        weights = torch.softmax(top_logits.masked_fill(empty, float("-inf")), dim=1).nan_to_num(0.0)
        slots = expert_slots.gather(1, experts).masked_fill(empty, -1)
        return experts, slots, weights

    def add_delta(self, x: Tensor, w: LoRAWeights, batch: LoRABatch, key: tuple[int, str], y: Tensor) -> None:
        """y += the step's LoRA deltas at linear `key` (x: its input [T, in]): plain-adapter
        tokens' and routed tokens' alike; adds the routed weights to usage."""
        if x.device.type != "cpu":
            lora_delta_pairs(x, w, self.pairs(x, batch, key, w.num_slots), y)
            return
        ranks = [uniform_rank(w, r.expert_slots) for r in self.step_routers]
        if None in ranks:  # experts of different ranks here: no dense stack; pairs instead
            lora_delta_pairs(x, w, self.pairs(x, batch, key, w.num_slots), y)
            return
        if batch.num_lora_tokens:
            lora_delta(x, w, batch, y)
        experts, _, weights = self.route(x.index_select(0, self.tokens), key)
        mix = torch.zeros_like(self.usage).scatter_add_(1, experts, weights)
        self.usage.add_(mix)
        for router, rank, positions in zip(self.step_routers, ranks, self.router_rows):
            rows_mix = mix if len(self.step_routers) == 1 else mix.index_select(0, positions)
            rows = self.tokens if len(self.step_routers) == 1 else self.tokens.index_select(0, positions)
            lora_delta_mixture(x, w, router.expert_slots, rank, rows_mix[:, : len(router.expert_slots)], rows, y)

    def pairs(self, x: Tensor, batch: LoRABatch, key: tuple[int, str], num_slots: int) -> LoRAPairs:
        """The step's (slot, weight) pairs at linear `key`: plain tokens' slots with weight 1,
        routed tokens' top-k experts; adds the routed weights to usage."""
        experts, slots, weights = self.route(x.index_select(0, self.tokens), key)
        self.usage.scatter_add_(1, experts, weights)
        all_slots, all_weights = plain_pairs(batch, self.k)
        all_slots.index_copy_(0, self.tokens, slots.to(all_slots.dtype))
        all_weights.index_copy_(0, self.tokens, weights)
        return LoRAPairs.build(all_slots, all_weights, num_slots)
