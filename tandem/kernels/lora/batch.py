"""The two data types every batched-LoRA call takes: the step's token grouping and a slot pool."""

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor


@dataclass(frozen=True)
class Segment:
    """The tokens of one adapter slot in a step: sorted_tokens[start : start + length]."""

    slot: int
    start: int
    length: int


@dataclass(frozen=True)
class Grid:
    """Short segments of nearby slots as a [G, L] grid of token rows, for one bmm pair on
    the CPU path.

    Row g holds the tokens of slot first_slot + g (G = the span of slots from the first
    grid segment to the last), padded to L. Slots in the span with no grid tokens are
    computed and thrown away, which on CPU is cheaper than a matmul pair per segment.

    segments: the segments in the grid.
    tokens:   [G * L] int64, the token at each grid position (token 0 where padding).
    rows:     [n] int64, the grid positions holding real tokens.
    row_tokens: [n] int64, the token at each of rows (where its delta is added).
    """

    segments: tuple[Segment, ...]
    first_slot: int
    num_slots: int
    length: int
    tokens: Tensor
    rows: Tensor
    row_tokens: Tensor


@dataclass(frozen=True)
class Loose:
    """A segment computed on its own (one shrink and one expand): a long one, e.g. a prefill
    chunk, or every segment when no grid pays off. first_token: its tokens are
    first_token, first_token + 1, ... (no gather or scatter needed), else None."""

    segment: Segment
    tokens: Tensor
    first_token: int | None


@dataclass(frozen=True)
class CPUPlan:
    """How the CPU path computes a step: short segments in grids, the rest loose."""

    grids: tuple[Grid, ...]
    loose: tuple[Loose, ...]
    host_tokens: Tensor
    device: torch.device
    _by_rank: dict = field(default_factory=dict, repr=False, compare=False)

    def by_rank(self, grid: Grid, ranks: tuple[int, ...]) -> tuple[tuple[tuple[int, Grid], ...], tuple[Loose, ...]]:
        """A grid whose segments have these ranks (in one weight group) as one grid per rank,
        plus the segments alone in their rank; built once per step and rank pattern.

        Each grid spans its own rank's slots; other ranks' slots inside that span are
        computed at this rank and thrown away, so whatever their storage holds cannot leak."""
        key = (grid.first_slot, ranks)
        if key not in self._by_rank:
            classes: dict[int, list[Segment]] = {}
            for seg, rank in zip(grid.segments, ranks):
                classes.setdefault(rank, []).append(seg)
            self._by_rank[key] = (
                tuple(
                    (r, _grid(tuple(segs), self.host_tokens, grid.length, self.device))
                    for r, segs in classes.items()
                    if len(segs) > 1
                ),
                tuple(loose_segment(segs[0], self.host_tokens, self.device) for segs in classes.values() if len(segs) == 1),
            )
        return self._by_rank[key]


@dataclass(frozen=True)
class LoRABatch:
    """How one engine step's tokens map to adapter slots; built once, shared by every layer.

    Tokens are grouped by slot through an index array; activations are never permuted.
    Segment tensors have a fixed length of num_slots so a kernel grid over them does not
    depend on the batch: the active segments come first, the rest have slot -1, length 0.

    token_slots:   [T] int32, slot of each token, -1 = no adapter.
    sorted_tokens: [T] int64, token indices grouped by slot in ascending slot order,
                   tokens without an adapter last (the first num_lora_tokens have one).
    seg_slots:     [num_slots] int32, slot of each segment, -1 past the active ones.
    seg_starts:    [num_slots] int32, start of each segment in sorted_tokens.
    seg_lens:      [num_slots] int32, tokens in each segment, 0 past the active ones.
    segments:      host copy of the active segments, so the CPU path never syncs.
    num_lora_tokens: number of tokens with an adapter (host int).
    first_lora_token: when the tokens with an adapter, in sorted order, are the consecutive
                   rows first, first + 1, ... (a training batch, a lone prefill chunk), that
                   first row, so the torch path slices them instead of gathering; else None.
    """

    token_slots: Tensor
    sorted_tokens: Tensor
    seg_slots: Tensor
    seg_starts: Tensor
    seg_lens: Tensor
    segments: tuple[Segment, ...]
    num_lora_tokens: int
    first_lora_token: int | None = None

    @property
    def num_tokens(self) -> int:
        return self.token_slots.shape[0]

    @cached_property
    def cpu_plan(self) -> CPUPlan:
        """How the torch path groups this step's segments into matmuls; built on first use."""
        return _cpu_plan(self.segments, self.sorted_tokens.cpu(), self.sorted_tokens.device)

    @classmethod
    def build(
        cls,
        token_slots: Tensor | Sequence[int],
        num_slots: int,
        device: torch.device | str | None = None,
    ) -> "LoRABatch":
        """Group a step's tokens by slot.

        token_slots: [T] slot per token (-1 = none), a host list or tensor. The grouping is
            computed on the host; pass host values (the scheduler has them) so building for a
            CUDA step costs one host-to-device copy and no sync. A CUDA tensor is accepted
            but costs one sync here, once per step.
        device: where the tensors go; defaults to token_slots' device (CPU for a list).
        """
        if isinstance(token_slots, Tensor):
            device = token_slots.device if device is None else device
            host = token_slots.detach().to("cpu", torch.int64).reshape(-1)
        else:
            host = torch.tensor(list(token_slots), dtype=torch.int64)
        if host.numel() and (int(host.min()) < -1 or int(host.max()) >= num_slots):
            raise ValueError(f"token slots must lie in [-1, {num_slots}), got {host.min()}..{host.max()}")
        # Tokens without an adapter sort after every slot.
        key = torch.where(host < 0, num_slots, host)
        sorted_tokens = torch.argsort(key, stable=True)
        counts = torch.bincount(key, minlength=num_slots + 1)[:num_slots]
        starts = torch.cumsum(counts, 0) - counts
        active = torch.nonzero(counts).reshape(-1)
        num_active = active.numel()
        seg_slots = torch.full((num_slots,), -1, dtype=torch.int32)
        seg_starts = torch.zeros(num_slots, dtype=torch.int32)
        seg_lens = torch.zeros(num_slots, dtype=torch.int32)
        seg_slots[:num_active] = active.to(torch.int32)
        seg_starts[:num_active] = starts[active].to(torch.int32)
        seg_lens[:num_active] = counts[active].to(torch.int32)
        segments = tuple(
            Segment(slot, start, length)
            for slot, start, length in zip(active.tolist(), starts[active].tolist(), counts[active].tolist())
        )
        num_lora_tokens = int(counts.sum())
        lora_rows = sorted_tokens[:num_lora_tokens]
        run = num_lora_tokens and torch.equal(lora_rows, torch.arange(int(lora_rows[0]), int(lora_rows[0]) + num_lora_tokens))
        device = torch.device("cpu" if device is None else device)
        return cls(
            token_slots=host.to(device=device, dtype=torch.int32),
            sorted_tokens=sorted_tokens.to(device),
            seg_slots=seg_slots.to(device),
            seg_starts=seg_starts.to(device),
            seg_lens=seg_lens.to(device),
            segments=segments,
            num_lora_tokens=num_lora_tokens,
            first_lora_token=int(lora_rows[0]) if run else None,
        )


@dataclass(frozen=True)
class LoRAPairs:
    """Up to k (slot, weight) pairs per token: y[t] += sum_i weight[t, i] * B_slot(A_slot x[t]).

    What a routed step computes (a router mixes k experts per token; a plain-adapter token is
    one pair of weight 1, a base token none). Routing changes at every layer, so this is
    built once per layer, entirely on the tensors' device: no host value is read, so a CUDA
    step never syncs for it. Entries are the (token, pair) positions grouped by slot; the
    segment tensors are indexed by slot (not compacted, since compacting needs the count of
    active slots on the host), an unused slot being slot -1 with length 0.

    sorted_tokens: [T * k] int64, the token of each entry, grouped by slot in ascending
                   order, entries without a slot last.
    weights:       [T * k] float32, the weight of each entry, in the same order.
    seg_slots:     [num_slots] int32, s at index s when slot s has entries, else -1.
    seg_starts:    [num_slots] int32, start of slot s's entries in sorted_tokens.
    seg_lens:      [num_slots] int32, number of entries of slot s.
    num_tokens:    T (host int).
    """

    sorted_tokens: Tensor
    weights: Tensor
    seg_slots: Tensor
    seg_starts: Tensor
    seg_lens: Tensor
    num_tokens: int

    @property
    def num_entries(self) -> int:
        return self.sorted_tokens.shape[0]

    @classmethod
    def build(cls, slots: Tensor, weights: Tensor, num_slots: int) -> "LoRAPairs":
        """Group the pairs by slot. slots: [T, k] integer, -1 = no pair (its weight is
        ignored); weights: [T, k]. Slots must lie in [-1, num_slots): they are not checked,
        since checking would read them on the host."""
        num_tokens, k = slots.shape
        flat = slots.reshape(-1).to(torch.int64)
        key = torch.where(flat < 0, num_slots, flat)
        order = torch.argsort(key, stable=True)
        # scatter_add_ rather than bincount: bincount sizes its output from the data (a sync).
        counts = torch.zeros(num_slots + 1, dtype=torch.int64, device=key.device)
        counts = counts.scatter_add_(0, key, torch.ones_like(key))[:num_slots]
        all_slots = torch.arange(num_slots, dtype=torch.int32, device=key.device)
        return cls(
            sorted_tokens=order // k,
            weights=weights.reshape(-1).to(torch.float32)[order],
            seg_slots=torch.where(counts > 0, all_slots, -1).to(torch.int32),
            seg_starts=(torch.cumsum(counts, 0) - counts).to(torch.int32),
            seg_lens=counts.to(torch.int32),
            num_tokens=num_tokens,
        )


def plain_pairs(batch: LoRABatch, k: int) -> tuple[Tensor, Tensor]:
    """A plain batch as [T, k] (slots, weights) for LoRAPairs.build: each token's slot with
    weight 1, then k - 1 empty pairs; a routed step starts from these and overwrites the
    rows of its routed tokens."""
    slots = torch.full((batch.num_tokens, k), -1, dtype=torch.int32, device=batch.token_slots.device)
    slots[:, 0] = batch.token_slots
    weights = torch.zeros((batch.num_tokens, k), dtype=torch.float32, device=slots.device)
    weights[:, 0] = 1.0
    return slots, weights


# Costs of the CPU path in units of one grid row (~0.6 us), measured on SmolLM2 shapes with
# two threads and weights not in cache: a shrink/expand pair costs ~30 us whatever its
# size, and streaming one slot's weights through it ~6 us, whether or not a token uses it.
_PAIR_COST = 45
_SLOT_COST = 10


def _cpu_plan(segments: tuple[Segment, ...], sorted_tokens: Tensor, device: torch.device) -> CPUPlan:
    """Pick the grid length L, and where to split the grids, that cost the least.

    Segments up to L tokens go in grids (one per run of nearby slots), longer ones (prefill
    chunks) run loose, so one long prompt does not pad every decode token's row to its
    length and a wide gap between slots does not stream the unused slots' weights.
    """
    best_cost = sum(_PAIR_COST + _SLOT_COST + seg.length for seg in segments)
    best: tuple[int, list[list[Segment]]] = (0, [])
    for length in sorted({seg.length for seg in segments}):
        runs = _runs([seg for seg in segments if seg.length <= length], length)
        cost = sum(_PAIR_COST + (run[-1].slot - run[0].slot + 1) * (_SLOT_COST + length) for run in runs)
        in_grids = {seg for run in runs for seg in run}
        cost += sum(_PAIR_COST + _SLOT_COST + seg.length for seg in segments if seg not in in_grids)
        if cost < best_cost:
            best_cost, best = cost, (length, runs)
    length, runs = best
    in_grids = {seg for run in runs for seg in run}
    return CPUPlan(
        tuple(_grid(tuple(run), sorted_tokens, length, device) for run in runs),
        tuple(loose_segment(seg, sorted_tokens, device) for seg in segments if seg not in in_grids),
        sorted_tokens,
        device,
    )


def _runs(short: list[Segment], length: int) -> list[list[Segment]]:
    """Short segments (in slot order) split where the empty slots between two cost more
    than another matmul pair; runs of one segment are left out (they run loose)."""
    runs: list[list[Segment]] = []
    for seg in short:
        if runs and (seg.slot - runs[-1][-1].slot - 1) * (_SLOT_COST + length) <= _PAIR_COST:
            runs[-1].append(seg)
        else:
            runs.append([seg])
    return [run for run in runs if len(run) > 1]


def loose_segment(segment: Segment, sorted_tokens: Tensor, device: torch.device) -> Loose:
    """A segment to compute on its own; sorted_tokens on the host, the result on device."""
    tokens = sorted_tokens[segment.start : segment.start + segment.length]
    contiguous = bool(torch.all(tokens.diff() == 1))
    return Loose(segment, tokens.to(device), int(tokens[0]) if contiguous else None)


def _grid(segments: tuple[Segment, ...], sorted_tokens: Tensor, length: int, device: torch.device) -> Grid:
    """The grid of these segments; sorted_tokens on the host, the index tensors on device."""
    first_slot = segments[0].slot
    num_slots = segments[-1].slot - first_slot + 1
    rows = torch.cat([torch.arange(seg.length) + (seg.slot - first_slot) * length for seg in segments])
    row_tokens = torch.cat([sorted_tokens[seg.start : seg.start + seg.length] for seg in segments])
    tokens = torch.zeros(num_slots * length, dtype=torch.int64)
    tokens[rows] = row_tokens
    return Grid(segments, first_slot, num_slots, length, tokens.to(device), rows.to(device), row_tokens.to(device))


@dataclass
class LoRAWeights:
    """One slot pool for a group of linears that share an input (e.g. fused q/k/v).

    S = len(out_slices) output slices share one shrink; N = sum(out_slices).

    a: [num_slots, S * max_rank, in_features]. Slice s of slot i uses rows
       s * max_rank : s * max_rank + rank_i; rows past the rank are never read.
    b: [num_slots, N, max_rank]. Slice s owns rows offset_s : offset_s + out_slices[s];
       only the first rank_i columns are read. The LoRA scale (alpha / r, or alpha / sqrt(r)
       for rsLoRA) is folded into b when the adapter is loaded; the kernels never scale.
    slot_ranks: [num_slots] int32 on a's device, the real rank of each slot (0..max_rank;
       0 = the slot's adapter does not adapt this linear, so its tokens are skipped).
    host_ranks: host copy of slot_ranks (the CPU path reads it without a device sync);
       whoever writes a slot keeps both in step, e.g. through set_rank.
    out_slices: output width of each slice, e.g. (q_dim, kv_dim, kv_dim).
    """

    a: Tensor
    b: Tensor
    slot_ranks: Tensor
    out_slices: tuple[int, ...]
    host_ranks: list[int] = field(default_factory=list)
    # [S] int32 start column and width of each slice.
    slice_starts: Tensor = field(init=False, repr=False)
    slice_widths: Tensor = field(init=False, repr=False)
    # max(host_ranks): what a launch's rank tile must cover, read per linear per step.
    top_rank: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.out_slices = tuple(int(w) for w in self.out_slices)
        num_slots, n_out, max_rank = self.b.shape
        if not self.out_slices or min(self.out_slices) <= 0:
            raise ValueError(f"out_slices must be positive widths, got {self.out_slices}")
        if n_out != sum(self.out_slices):
            raise ValueError(f"b has {n_out} output rows, out_slices sum to {sum(self.out_slices)}")
        if self.a.dim() != 3 or self.a.shape[:2] != (num_slots, self.num_slices * max_rank):
            raise ValueError(
                f"a must be [{num_slots}, {self.num_slices} * {max_rank}, in_features], got {tuple(self.a.shape)}"
            )
        if self.a.dtype != self.b.dtype:
            raise ValueError(f"a and b must share a dtype, got {self.a.dtype} and {self.b.dtype}")
        if tuple(self.slot_ranks.shape) != (num_slots,) or self.slot_ranks.dtype != torch.int32:
            # int32: the kernels read it so (an int64 one read ranks [4, 4] as [4, 0]).
            raise ValueError(f"slot_ranks must be int32 [{num_slots}], got {self.slot_ranks.dtype} {tuple(self.slot_ranks.shape)}")
        if not self.host_ranks:
            self.host_ranks = self.slot_ranks.tolist()
        if len(self.host_ranks) != num_slots or not all(0 <= r <= max_rank for r in self.host_ranks):
            raise ValueError(f"slot ranks must lie in [0, {max_rank}], got {self.host_ranks}")
        self.top_rank = max(self.host_ranks, default=0)
        starts = [sum(self.out_slices[:s]) for s in range(self.num_slices)]
        self.slice_starts = torch.tensor(starts, dtype=torch.int32, device=self.b.device)
        self.slice_widths = torch.tensor(self.out_slices, dtype=torch.int32, device=self.b.device)

    @property
    def num_slots(self) -> int:
        return self.b.shape[0]

    @property
    def num_slices(self) -> int:
        return len(self.out_slices)

    @property
    def max_rank(self) -> int:
        return self.b.shape[2]

    @property
    def in_features(self) -> int:
        return self.a.shape[2]

    @property
    def out_features(self) -> int:
        return self.b.shape[1]

    def slice(self, s: int) -> "LoRAWeights":
        """Slice s alone (views of a and b: gradients flow back to them), e.g. v_proj of a
        fused q/k/v group."""
        start, r = sum(self.out_slices[:s]), self.max_rank
        b = self.b[:, start : start + self.out_slices[s]]
        return LoRAWeights(self.a[:, s * r : (s + 1) * r], b, self.slot_ranks, (self.out_slices[s],), list(self.host_ranks))

    def set_rank(self, slot: int, rank: int) -> None:
        """Record the real rank of a slot just written (device tensor and host copy)."""
        if not 0 <= rank <= self.max_rank:
            raise ValueError(f"rank must lie in [0, {self.max_rank}], got {rank}")
        self.slot_ranks[slot] = rank
        self.host_ranks[slot] = rank
        self.top_rank = max(self.host_ranks)
