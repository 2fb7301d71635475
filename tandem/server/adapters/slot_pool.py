"""The device tier: a fixed number of slots, each holding one adapter for every layer.

Slots are keyed by content hash, so two versions of an adapter under one name never share
a slot. A slot in use by a running sequence is pinned; a new adapter takes an unpinned slot:
on CPU one that keeps the pinned slots close together (the CPU path streams every slot
between the first and the last one a step uses), then an empty one, then the least
recently used. Storage is padded
to max_rank; compute is trimmed to each slot's real rank by the kernels, which never read
past it (so a load zeroes only up to the adapter's rank).

Prefetch: after an iteration's forward is queued, the scheduler hands the adapters the next
waiting sequences need to prefetch(), which loads them into unpinned slots. On CUDA those
copies run on a side stream from pinned host memory, so they overlap the iteration's
compute; an event per slot makes the compute stream wait for its copy before any kernel
reads the slot (at acquire, or before the slot is written again). A copy in flight reads
the adapter's host block, which the host slab hands to another read once nothing views it
(a waiting request aborted meanwhile drops the last view), so the pool holds the adapter
until its copy's event has completed. On CPU there is nothing
to overlap, so the engine leaves prefetch_ahead at 0 there.

A router (a mixture of expert adapters) holds a slot per expert: acquiring it pins every
expert's slot at once, and its "slot" is the tuple of them, in gate order. A per-request
mixture likewise holds a slot per adapter, in the request's order.
"""

import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from tandem.kernels.lora import LoRAWeights, native_cpu
from tandem.server.adapters.compeft_format import dense_slices
from tandem.server.adapters.mixture import Mixture
from tandem.server.adapters.peft_format import LoRAAdapter
from tandem.server.adapters.router_format import Router
from tandem.server.model.llama import LlamaModel
from tandem.server.model.lora_targets import group_linears


@dataclass
class PoolStats:
    num_slots: int
    slots_in_use: int
    loads: int
    evictions: int
    load_seconds_total: float
    prefetches: int


class SlotPool:
    def __init__(self, model: LlamaModel, num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device):
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = device
        self.weights: dict[tuple[int, str], LoRAWeights] = {}
        for key, linear in group_linears(model).items():
            s = len(linear.out_slices)
            self.weights[key] = LoRAWeights(
                a=torch.zeros(num_slots, s * max_rank, linear.in_features, dtype=dtype, device=device),
                b=b_pool(num_slots, sum(linear.out_slices), max_rank, dtype, device),
                slot_ranks=torch.zeros(num_slots, dtype=torch.int32, device=device),
                out_slices=linear.out_slices,
            )
        # Each group's first output column per slice, for loads.
        self._starts = {key: [sum(w.out_slices[:s]) for s in range(w.num_slices)] for key, w in self.weights.items()}
        self._owner: list[str | None] = [None] * num_slots
        self._slot_of: dict[str, int] = {}
        self._pins = [0] * num_slots
        self._lru: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_slots))
        self.loads = 0
        self.evictions = 0
        self.load_seconds = 0.0
        self.prefetches = 0
        # How many upcoming adapters to load ahead each iteration; 0 turns prefetch off.
        self.prefetch_ahead = 4 if device.type == "cuda" else 0
        # Keep the slots in use together (the CPU path's grids stream whole slot spans; the
        # Triton kernels read only the slots a step uses).
        self.compact_slots = device.type == "cpu"
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pending: dict[int, torch.cuda.Event] = {}
        # (event, adapter) of each side-stream copy that may still be reading the adapter's host memory.
        self._in_flight: list[tuple[torch.cuda.Event, LoRAAdapter]] = []

    @staticmethod
    def slot_bytes(model: LlamaModel, max_rank: int, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        per_slot = sum(
            (len(l.out_slices) * l.in_features + sum(l.out_slices)) * max_rank for l in group_linears(model).values()
        )
        return per_slot * itemsize

    def resident(self, content_hash: str) -> bool:
        return content_hash in self._slot_of

    def can_acquire(self, adapter: LoRAAdapter | Router | Mixture) -> bool:
        """Whether acquire can pin the slots now: one per adapter missing from the pool must
        be free of pins (a router's resident experts are pinned first, so none is evicted)."""
        needed = {a.content_hash for a in _experts(adapter)}
        missing = sum(not self.resident(h) for h in needed)
        free = sum(1 for s, pins in enumerate(self._pins) if pins == 0 and self._owner[s] not in needed)
        return missing <= free

    def acquire(self, adapter: LoRAAdapter | Router | Mixture) -> int | tuple[int, ...]:
        """Pin the adapter's slot, loading it first if needed (a router or a mixture: its
        adapters' slots, resident ones first); call can_acquire before."""
        if isinstance(adapter, (Router, Mixture)):
            order = sorted(adapter.adapters, key=lambda a: not self.resident(a.content_hash))
            acquired: list[int] = []
            try:
                for expert in order:
                    acquired.append(self.acquire(expert))
            except BaseException:  # a load that failed: unpin the experts pinned before it
                self.release(tuple(acquired))
                raise
            slots = {a.content_hash: slot for a, slot in zip(order, acquired)}
            return tuple(slots[a.content_hash] for a in adapter.adapters)
        slot = self._slot_of.get(adapter.content_hash)
        if slot is None:
            slot = self._victim(set())
            self._load(slot, adapter)
        self._wait_for(slot)
        self._pins[slot] += 1
        self._lru.move_to_end(slot)
        return slot

    def prefetch(self, upcoming: list[LoRAAdapter | Router | Mixture]) -> int:
        """Load the adapters of upcoming sequences (soonest first; a router's experts) that
        are not resident, without evicting a pinned slot or one that holds another upcoming
        adapter. Returns how many were loaded."""
        self._retire()
        upcoming = [a for item in upcoming for a in _experts(item)]
        keep = {self._slot_of[a.content_hash] for a in upcoming if a.content_hash in self._slot_of}
        loaded = 0
        for adapter in upcoming:
            if self.resident(adapter.content_hash):
                continue
            slot = self._victim(keep)
            if slot is None:
                break
            self._load(slot, adapter, self._stream)
            self._lru.move_to_end(slot)
            keep.add(slot)
            loaded += 1
        self.prefetches += loaded
        return loaded

    def _victim(self, keep: set[int]) -> int | None:
        """The unpinned slot not in keep to load into, None when every slot is pinned or kept:
        an empty one before one holding an adapter, least recently used first; on CPU first
        of all the one that widens the span of pinned slots least (there a step streams every
        slot in that span, so an adapter worth keeping may go to keep the span tight)."""
        pinned = [s for s, pins in enumerate(self._pins) if pins]
        lo, hi = (min(pinned), max(pinned)) if pinned else (0, 0)

        def cost(slot: int) -> tuple[int, bool]:
            widening = max(hi, slot) - min(lo, slot) - (hi - lo) if pinned and self.compact_slots else 0
            return widening, self._owner[slot] is not None

        # min() keeps the first of equals, and _lru iterates least recently used first.
        return min((s for s in self._lru if self._pins[s] == 0 and s not in keep), key=cost, default=None)

    def _retire(self) -> None:
        """Let go of the adapters whose copies have run (their host bytes may be reused)."""
        self._in_flight = [(event, adapter) for event, adapter in self._in_flight if not event.query()]

    def _wait_for(self, slot: int, stream: "torch.cuda.Stream | None" = None) -> None:
        """Order `stream` (default: the current one) after a prefetch into the slot, no host sync."""
        event = self._pending.pop(slot, None)
        if event is not None:
            (stream or torch.cuda.current_stream()).wait_event(event)

    def release(self, slot: int | tuple[int, ...]) -> None:
        """Unpin what acquire pinned (a router's tuple: each expert's slot)."""
        for s in slot if isinstance(slot, tuple) else (slot,):
            self._pins[s] -= 1

    def stats(self) -> PoolStats:
        return PoolStats(
            self.num_slots, sum(o is not None for o in self._owner), self.loads, self.evictions, self.load_seconds,
            self.prefetches,
        )

    def _load(self, slot: int, adapter: LoRAAdapter, stream: "torch.cuda.Stream | None" = None) -> None:
        """Copy an adapter into a slot, on `stream` or the current one (on CUDA recorded as
        pending either way, until its copies have run)."""
        start = time.perf_counter()
        self._retire()
        self._wait_for(slot, stream)
        old = self._owner[slot]
        if old is not None:
            del self._slot_of[old]
            # Empty until the copy is done: a copy that raises (out of memory) left the slot
            # named for the adapter it no longer held, and the next eviction of it a KeyError.
            self._owner[slot] = None
            self.evictions += 1
        # No wait on the compute stream: the iteration in flight reads only pinned slots, and
        # every earlier one has finished (the engine syncs once per step, in the sampler).
        # Overlapping iterations (async scheduling) would need the side stream to wait here.
        try:
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                # A compressed adapter's packed bits unpack on the slot's device, all in one pass.
                dense = dense_slices(adapter, self.device)
                slices = []
                for key, w in self.weights.items():
                    delta = adapter.groups.get(key)
                    if delta is None:
                        w.set_rank(slot, 0)
                        continue
                    # What the kernels read is up to the group's rank: zeroed unless every slice
                    # is there at that rank (the copies then cover all of it).
                    if len(delta.slices) < w.num_slices or any(a.shape[0] < delta.rank for a, _, _ in delta.slices.values()):
                        w.a[slot].view(w.num_slices, self.max_rank, -1)[:, : delta.rank].zero_()
                        w.b[slot][:, : delta.rank].zero_()
                    starts = self._starts[key]
                    slices += [(w, s, starts[s], *dense[(key, s)], scale) for s, (_, _, scale) in delta.slices.items()]
                    w.set_rank(slot, delta.rank)
                if not native_cpu.load_slot(slot, slices):
                    # On CPU a staged copy would be one more pass over the adapter's bytes.
                    for w, s, col, a, b, scale in slices if self.device.type == "cpu" else staged(slices, self.device):
                        w.a[slot].view(w.num_slices, self.max_rank, -1)[s, : a.shape[0]].copy_(a, non_blocking=True)
                        b_dst = w.b[slot][col : col + b.shape[0], : b.shape[1]]
                        if b.dtype == torch.float32 and b.device == b_dst.device:  # scaled in float32, rounded once
                            torch.mul(b, scale, out=b_dst)
                        elif b_dst.dtype == torch.float32:
                            b_dst.copy_(b, non_blocking=True).mul_(scale)
                        else:  # scaled in float32 on the device, then rounded once into the slot
                            b_dst.copy_(b.to(b_dst.device, torch.float32, non_blocking=True, copy=True).mul_(scale))
        finally:
            if self.device.type == "cuda":
                # Every load's copies, those queued before one raised (out of memory) too: the
                # slot's next writer on another stream waits for them, and its host bytes stay
                # alive until they have run. Recorded for prefetches only, a prefetch that failed
                # halfway (or a load on the compute stream before a failed acquire) left copies
                # that the slot's next load raced.
                event = self._pending[slot] = torch.cuda.Event()
                event.record(stream or torch.cuda.current_stream(self.device))
                self._in_flight.append((event, adapter))
        self._owner[slot] = adapter.content_hash
        self._slot_of[adapter.content_hash] = slot
        self.loads += 1
        self.load_seconds += time.perf_counter() - start


# Larger spans are copied slice by slice rather than doubled on the device for a moment.
STAGE_MAX_BYTES = 1 << 30


def staged(slices: list[tuple], device: torch.device) -> list[tuple]:
    """The load's slices (w, s, col, A, B, scale) with A and B on device, from one copy when
    they are views of one host buffer, as a PEFT adapter's tensors are of its file's bytes:
    the span they cover crosses once, not as two transfers per slice (~450 for an 8B model's
    adapter on every linear, each a launch). Slices that are not (a compressed adapter's,
    unpacked on the device; tensors pinned one by one) come back as they are."""
    tensors = [t for _, _, _, a, b, _ in slices for t in (a, b)]
    if not tensors or any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        return slices
    storage = tensors[0].untyped_storage()
    if any(t.untyped_storage().data_ptr() != storage.data_ptr() for t in tensors):
        return slices
    starts = [t.storage_offset() * t.element_size() for t in tensors]
    lo = min(starts)
    hi = max(start + t.numel() * t.element_size() for start, t in zip(starts, tensors))
    if hi - lo > STAGE_MAX_BYTES or any((start - lo) % t.element_size() for start, t in zip(starts, tensors)):
        return slices
    host = torch.empty(0, dtype=torch.uint8).set_(storage, lo, (hi - lo,))
    span = torch.empty(hi - lo, dtype=torch.uint8, device=device)
    span.copy_(host, non_blocking=True)

    def on_device(t: torch.Tensor, start: int) -> torch.Tensor:
        return span[start - lo : start - lo + t.numel() * t.element_size()].view(t.dtype).view(t.shape)

    moved = iter(on_device(t, start) for t, start in zip(tensors, starts))
    return [(w, s, col, next(moved), next(moved), scale) for w, s, col, _, _, scale in slices]


def slot_dtype(device: torch.device, serving_dtype: torch.dtype) -> torch.dtype:
    """The slots' dtype: the serving dtype on CUDA. On CPU bfloat16 when serving in bfloat16
    where the C kernel takes bfloat16 calls (it reads slots at half float32's bytes and
    computes in float32), else float32 (torch's small LoRA matmuls run faster in float32 than
    in bf16 on CPU; on an AVX2 CPU, where the kernel takes float32 only, bf16 slots were
    converted at every call)."""
    if device.type != "cpu":
        return serving_dtype
    if serving_dtype == torch.bfloat16 and native_cpu.serves_bf16():
        return torch.bfloat16
    return torch.float32


def b_pool(num_slots: int, out_features: int, max_rank: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The pool's B, [num_slots, out_features, max_rank]; on CPU a transposed view of
    [num_slots, max_rank, b_row(out_features)] storage, the layout the C kernel's expand reads
    as rows (kernels/lora/native_cpu.py)."""
    if device.type == "cpu":
        rows = torch.zeros(num_slots, max_rank, b_row(out_features, dtype), dtype=dtype, device=device)
        return rows[:, :, :out_features].transpose(1, 2)
    return torch.zeros(num_slots, out_features, max_rank, dtype=dtype, device=device)


def b_row(out_features: int, dtype: torch.dtype) -> int:
    """Elements from one rank row of a CPU slot's B to the next: out_features, one cache line
    more where the row's lines are a multiple of 8. The C kernel's expand reads a line of
    every rank row at a time; rows 4 KiB apart (SmolLM2's gate_up, 3072 floats) map to one
    set of an 8-way L1 and evict each other. Padded to 3088, gate_up's calls for 30 layers (8
    adapters, 32 tokens, weights past the caches, alternated in one process on a Zen 3) took
    0.88x the time on 2 cores (3.42 -> 3.02 ms, 3.57 -> 3.16) and 0.90-0.92x on one."""
    per_line = 64 // torch.empty((), dtype=dtype).element_size()
    lines = -(-out_features // per_line)
    return out_features + per_line if lines % 8 == 0 else out_features


def _experts(adapter: LoRAAdapter | Router | Mixture) -> tuple[LoRAAdapter, ...]:
    """The adapters that must sit in slots for this one to run."""
    return adapter.adapters if isinstance(adapter, (Router, Mixture)) else (adapter,)
