"""The device tier: a fixed number of slots, each holding one adapter for every layer.

Slots are keyed by content hash, so two versions of an adapter under one name never share
a slot. A slot in use by a running sequence is pinned; a new adapter takes an unpinned slot
that keeps the pinned slots close together (the CPU path streams every slot between the
first and the last one a step uses), the least recently used of those. Storage is padded
to max_rank; compute is trimmed to each slot's real rank by the kernels.
"""

import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from kernels.lora import LoRAWeights
from server.adapters.peft_format import LoRAAdapter, group_linears
from server.model.llama import LlamaModel
from server.model.lora_linear import LoRALinear


@dataclass
class PoolStats:
    num_slots: int
    slots_in_use: int
    loads: int
    evictions: int
    load_seconds_total: float


class SlotPool:
    def __init__(self, model: LlamaModel, num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device):
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.weights: dict[tuple[int, str], LoRAWeights] = {}
        for key, linear in group_linears(model).items():
            s = len(linear.out_slices)
            self.weights[key] = LoRAWeights(
                a=torch.zeros(num_slots, s * max_rank, linear.in_features, dtype=dtype, device=device),
                b=torch.zeros(num_slots, sum(linear.out_slices), max_rank, dtype=dtype, device=device),
                slot_ranks=torch.ones(num_slots, dtype=torch.int32, device=device),
                out_slices=linear.out_slices,
            )
        self._owner: list[str | None] = [None] * num_slots
        self._slot_of: dict[str, int] = {}
        self._pins = [0] * num_slots
        self._lru: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_slots))
        self.loads = 0
        self.evictions = 0
        self.load_seconds = 0.0

    @staticmethod
    def slot_bytes(model: LlamaModel, max_rank: int, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        per_slot = sum(
            (len(l.out_slices) * l.in_features + sum(l.out_slices)) * max_rank for l in group_linears(model).values()
        )
        return per_slot * itemsize

    def attach(self, model: LlamaModel) -> None:
        """Swap every LoRA-able linear of the model for one that reads this pool."""
        for i, layer in enumerate(model.layers):
            layer.attn.qkv = LoRALinear(layer.attn.qkv, self.weights[(i, "qkv")])
            layer.attn.o_proj = LoRALinear(layer.attn.o_proj, self.weights[(i, "o")])
            layer.mlp.gate_up = LoRALinear(layer.mlp.gate_up, self.weights[(i, "gate_up")])
            layer.mlp.down = LoRALinear(layer.mlp.down, self.weights[(i, "down")])

    def resident(self, content_hash: str) -> bool:
        return content_hash in self._slot_of

    def can_acquire(self, adapter: LoRAAdapter) -> bool:
        return self.resident(adapter.content_hash) or any(p == 0 for p in self._pins)

    def acquire(self, adapter: LoRAAdapter) -> int:
        """Pin the adapter's slot, loading it first if needed; call can_acquire before."""
        slot = self._slot_of.get(adapter.content_hash)
        if slot is None:
            slot = self._victim()
            self._load(slot, adapter)
        self._pins[slot] += 1
        self._lru.move_to_end(slot)
        return slot

    def _victim(self) -> int:
        """The unpinned slot that widens the span of pinned slots least; LRU among those."""
        pinned = [s for s, pins in enumerate(self._pins) if pins]
        lo, hi = (min(pinned), max(pinned)) if pinned else (0, 0)

        def widening(slot: int) -> int:
            return 0 if not pinned else max(hi, slot) - min(lo, slot) - (hi - lo)

        # min() keeps the first of equals, and _lru iterates least recently used first.
        return min((s for s in self._lru if self._pins[s] == 0), key=widening)

    def release(self, slot: int) -> None:
        self._pins[slot] -= 1

    def stats(self) -> PoolStats:
        return PoolStats(self.num_slots, sum(o is not None for o in self._owner), self.loads, self.evictions, self.load_seconds)

    def _load(self, slot: int, adapter: LoRAAdapter) -> None:
        start = time.perf_counter()
        old = self._owner[slot]
        if old is not None:
            del self._slot_of[old]
            self.evictions += 1
        for key, w in self.weights.items():
            delta = adapter.groups.get(key)
            s = w.num_slices
            w.a[slot].zero_()
            w.b[slot].zero_()
            if delta is None:
                w.set_rank(slot, 1)
                continue
            w.a[slot].view(s, self.max_rank, -1)[:, : delta.rank] = delta.a.view(s, delta.rank, -1)
            w.b[slot][:, : delta.rank] = delta.b
            w.set_rank(slot, delta.rank)
        self._owner[slot] = adapter.content_hash
        self._slot_of[adapter.content_hash] = slot
        self.loads += 1
        self.load_seconds += time.perf_counter() - start
