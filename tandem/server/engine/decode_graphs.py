"""CUDA graphs for decode iterations: the model's forward over a batch of decode rows,
captured once per batch-size bucket and replayed, so a step costs a few copies and one
launch instead of a launch per op (~20 per layer, ~150 more with LoRA on every linear).

On a GPU a decode step of a large model is bound by those launches, not by the GPU: an
8B model's 32 layers are ~700 launches at tens of microseconds of Python and driver time
each, against a few milliseconds of kernels. vLLM and SGLang capture decode the same way.

A captured forward reads every per-step value from static buffers, sized once for the
largest bucket: token ids, positions, KV write slots, each sequence's context slots and
length, and the LoRA grouping (LoRABatch's tensors, whose shapes depend only on the row
count and the slot count). A batch of n rows runs in the smallest bucket B >= n; rows n..B-1
are padding that writes its K/V into the cache's null slot, attends to that slot alone and
has no adapter. Decode attention must be the paged kernel (kernels/decode_attention.py),
which reads each context up to its length on the device.

What the launches bake in is the key of a graph besides B: whether the step has served
adapters, and per LoRA weight group the rank tile the kernels were launched with (a slot
loaded with a higher rank changes it, and the next step captures again). The engine
captures every bucket at start-up, with and without adapters (the empty pool's rank tile,
that of ranks up to 16); only a higher rank tile captures while serving. Steps with
prefills, training rows, routers or mixtures, or more rows than the largest bucket run
eagerly.
"""

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from tandem.kernels.lora import LoRABatch, LoRAWeights
from tandem.server.engine.kv_cache import KVCache
from tandem.server.model.batch import AttentionMetadata, ForwardBatch, LoRARows
from tandem.server.model.llama import LlamaModel

log = logging.getLogger(__name__)

# The largest bucket: decode batches past it run eagerly (their launches are a smaller
# share of a step that big).
MAX_BUCKET = 256


def buckets(max_rows: int) -> list[int]:
    """Batch sizes graphs are captured for: 1, 2, 4, 8, then every multiple of 8, up to max_rows."""
    sizes = [b for b in (1, 2, 4) if b < max_rows] + list(range(8, max_rows + 8, 8))
    return [b for b in sizes if b <= max(8, -(-max_rows // 8) * 8)]


@dataclass
class _Static:
    """The buffers every captured forward reads, [largest bucket] rows (or num_slots segments)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    decode_slots: torch.Tensor
    decode_lens: torch.Tensor
    token_slots: torch.Tensor
    sorted_tokens: torch.Tensor
    seg_slots: torch.Tensor
    seg_starts: torch.Tensor
    seg_lens: torch.Tensor
    rows: torch.Tensor  # 0 .. largest bucket - 1: padding rows' place in sorted_tokens


class DecodeGraphs:
    """Captures and replays decode forwards. capture=False runs the same static-buffer
    forward without a graph, for steps without adapters (the CPU LoRA path plans from the
    host's segments, which a static batch does not carry): how the CPU tests check the
    padding and copies."""

    def __init__(self, model: LlamaModel, kv_cache: KVCache, max_rows: int, max_model_len: int, num_slots: int, capture: bool = True):
        self.model = model
        self.kv_cache = kv_cache
        self.sizes = buckets(min(max_rows, MAX_BUCKET))
        self.max_model_len = max_model_len
        self.num_slots = num_slots
        self.capture = capture
        self._static: _Static | None = None
        # key -> (graph, its batch, its output); None where capturing ran out of memory.
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph | None, ForwardBatch, torch.Tensor | None] | None] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self.captures = 0

    def takes(self, batch: ForwardBatch, num_decodes: int) -> bool:
        """Whether this forward is all decode rows, with nothing a graph cannot hold."""
        attn, lora = batch.attn, batch.lora
        return (
            num_decodes == batch.input_ids.shape[0] <= self.sizes[-1] and attn.decode_lens is not None
            and not attn.prefills and not attn.fresh and batch.train_lora is None and batch.kept is None
            and (lora is None or (self.capture and lora.routing is None and lora.mixed is None and not lora.dropout))
            and not torch.is_grad_enabled()
        )

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """The model's hidden states for batch's rows (takes(batch) must hold), by replaying
        the graph of their bucket, captured first if this is its first use."""
        n = batch.input_ids.shape[0]
        size = next(b for b in self.sizes if b >= n)
        self._fill(batch, n, size)
        captures = self.captures
        recorded = self._graph(size, None if batch.lora is None else batch.lora.weights)
        if self.captures > captures:
            log.info("captured the decode graph of %d rows while serving: a slot's rank tile grew past those captured", size)
        if recorded is None:
            return self.model(batch)
        graph, static_batch, out = recorded
        if graph is None:
            return self.model(static_batch)[:n]
        graph.replay()
        return out[:n]

    def capture_all(self, device: torch.device, weights: Mapping[tuple[int, str], LoRAWeights] | None) -> None:
        """Capture every bucket now, without adapters and, given the slot pool's weights, with
        them at the rank tiles their slots have now: at start-up, as vLLM does, so that no
        request waits on a capture or on compiling the kernels it records. Largest first, so
        that the smaller buckets reuse the shared pool's memory. A slot loaded later with a
        higher rank tile than any before captures lazily, at its first step."""
        started = time.perf_counter()
        with torch.inference_mode():  # as the steps that replay them run
            self._buffers(device)
            for size in reversed(self.sizes):
                self._graph(size, None)
                if weights is not None:
                    self._graph(size, weights)
        log.info("captured %d decode graphs (%d batch sizes%s) in %.1f s", self.captures, len(self.sizes),
                 "" if weights is None else ", with and without adapters", time.perf_counter() - started)

    def _graph(
        self, size: int, weights: Mapping[tuple[int, str], LoRAWeights] | None
    ) -> tuple[torch.cuda.CUDAGraph | None, ForwardBatch, torch.Tensor | None] | None:
        """The recorded forward of size rows with these weights' launches, recorded now if it
        is not yet; None where capturing it ran out of memory."""
        key = (size, None if weights is None else self._launch_key(weights))
        if key not in self._graphs:
            try:
                self._graphs[key] = self._record(size, weights)
            except torch.cuda.OutOfMemoryError:
                # The KV cache and the slots may leave no room for a graph's activations:
                # this bucket then runs eagerly, as every step did before graphs.
                log.warning("no memory to capture the decode graph of %d rows; that bucket runs eagerly", size)
                self._graphs[key] = None
        return self._graphs[key]

    @staticmethod
    def _launch_key(weights: Mapping[tuple[int, str], LoRAWeights]) -> tuple:
        from tandem.kernels.lora.triton_sgmv import launch_key  # CPU serving never imports triton

        return launch_key(weights.values())

    def _buffers(self, device: torch.device) -> _Static:
        if self._static is None:
            rows, null = self.sizes[-1], self.kv_cache.null_slot
            long = dict(dtype=torch.long, device=device)
            i32 = dict(dtype=torch.int32, device=device)
            self._static = _Static(
                input_ids=torch.zeros(rows, **long),
                positions=torch.zeros(rows, **long),
                slot_mapping=torch.full((rows,), null, **long),
                decode_slots=torch.full((rows, self.max_model_len), null, **long),
                decode_lens=torch.ones(rows, **i32),
                token_slots=torch.full((rows,), -1, **i32),
                sorted_tokens=torch.arange(rows, **long),
                seg_slots=torch.full((self.num_slots,), -1, **i32),
                seg_starts=torch.zeros(self.num_slots, **i32),
                seg_lens=torch.zeros(self.num_slots, **i32),
                rows=torch.arange(rows, **long),
            )
        return self._static

    def _fill(self, batch: ForwardBatch, n: int, size: int) -> _Static:
        """Copy the step's values into the static buffers; rows n..size-1 become padding."""
        s = self._buffers(batch.input_ids.device)
        attn = batch.attn
        s.input_ids[:n].copy_(batch.input_ids)
        s.positions[:n].copy_(batch.positions)
        s.slot_mapping[:n].copy_(attn.slot_mapping)
        s.decode_slots[:n, : attn.decode_slots.shape[1]].copy_(attn.decode_slots)
        s.decode_lens[:n].copy_(attn.decode_lens)
        if size > n:
            s.input_ids[n:size].zero_()
            s.positions[n:size].zero_()
            s.slot_mapping[n:size].fill_(self.kv_cache.null_slot)
            s.decode_slots[n:size, 0].fill_(self.kv_cache.null_slot)
            s.decode_lens[n:size].fill_(1)
        if batch.lora is not None:
            tokens = batch.lora.tokens
            s.token_slots[:n].copy_(tokens.token_slots)
            s.token_slots[n:size].fill_(-1)
            s.sorted_tokens[:n].copy_(tokens.sorted_tokens)
            s.sorted_tokens[n:size].copy_(s.rows[n:size])
            s.seg_slots.copy_(tokens.seg_slots)
            s.seg_starts.copy_(tokens.seg_starts)
            s.seg_lens.copy_(tokens.seg_lens)
        return s

    def _static_batch(self, size: int, weights: Mapping[tuple[int, str], LoRAWeights] | None) -> ForwardBatch:
        s = self._static
        attn = AttentionMetadata(
            slot_mapping=s.slot_mapping[:size], num_decodes=size, decode_slots=s.decode_slots[:size],
            decode_mask=None, prefills=[], fresh=[], decode_lens=s.decode_lens[:size],
        )
        rows = None
        if weights is not None:
            # Every row counts as adapted so that the launches are recorded; rows whose slot is
            # -1 (in no segment) are left alone by the kernels.
            tokens = LoRABatch(
                token_slots=s.token_slots[:size], sorted_tokens=s.sorted_tokens[:size], seg_slots=s.seg_slots,
                seg_starts=s.seg_starts, seg_lens=s.seg_lens, segments=(), num_lora_tokens=size,
            )
            rows = LoRARows(tokens, weights)
        return ForwardBatch(
            input_ids=s.input_ids[:size], positions=s.positions[:size], attn=attn, kv_caches=self.kv_cache.layers,
            logits_indices=s.rows[:0], lora=rows,
        )

    def _record(
        self, size: int, weights: Mapping[tuple[int, str], LoRAWeights] | None
    ) -> tuple[torch.cuda.CUDAGraph | None, ForwardBatch, torch.Tensor | None]:
        """A bucket's graph: one eager run on a side stream first (Triton compiles, cuBLAS
        picks its kernels and workspaces), then the capture, into the memory pool all
        buckets share (one replay at a time)."""
        batch = self._static_batch(size, weights)
        if not self.capture:
            return None, batch, None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.model(batch)
        torch.cuda.current_stream().wait_stream(side)
        started = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        # thread_local: a capture while serving (a rank tile that grew) must not fail the
        # adapter reads other threads run meanwhile, which allocate page-locked memory; the
        # default global mode makes such calls (unsafe during a capture) error in any thread.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = self.model(batch)
        self.captures += 1
        log.debug("captured the decode graph of %d rows%s in %.2f s", size, "" if weights is None else " with adapters",
                  time.perf_counter() - started)
        return graph, batch, out
