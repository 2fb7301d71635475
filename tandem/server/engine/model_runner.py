"""Run one scheduled iteration through the model: build the ragged batch, return logits and,
for training rows, their loss.

The runner has no policy: the scheduler decided who runs and how many tokens each computes.
A chunk of one token is a decode (batched into one attention call); longer chunks are
prefills (one attention call each); co-served training chunks run like prefills through
blocks of their own, keeping their rows' activations on the way (each layer's input by a
forward pre-hook per layer, and one on the final norm for the top layer's output; each
frozen linear's output in the linear); time-sliced training sequences come last and attend
to their own rows only. Only rows that finish a sequence's known tokens get logits, since only those sample;
training rows get logits only where a label asks for them. `backward` runs a co-served
head block (some rows' loss, back to the top layer's output) or backward slice (layers
rebuilt from their kept activations, or their kept graphs, then backpropagated);
`forward_graph` a co-served micro-batch's whole forward with autograd, when nothing else runs.
"""

import time
import weakref
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tandem.kernels.lora import LoRABatch
from tandem.server.adapters.mixture import Mixture
from tandem.server.adapters.slot_pool import SlotPool
from tandem.server.engine.decode_graphs import DecodeGraphs
from tandem.server.engine.iteration import (
    HEAD_BLOCK_ROWS,
    IGNORE_INDEX,
    BackwardResult,
    ModelRunnerOutput,
    SchedulerOutput,
    TrainingBackward,
    TrainingForward,
    TrainingGraph,
    TrainingHead,
    TrainingSequence,
    TrainingWork,
)
from tandem.server.engine.kv_cache import KVCache
from tandem.server.engine.sequence import Sequence
from tandem.server.model.batch import AttentionMetadata, ForwardBatch, FreshChunk, LoRARows, PrefillChunk
from tandem.server.model.kept_activations import KeptActivations, KeptGraph
from tandem.server.model.llama import LlamaModel
from tandem.server.model.mixed_rows import MixedRows
from tandem.server.model.routing import RoutedRows, StepRouter


@dataclass
class _TrainingRows:
    """Where the training rows' loss comes from: hidden rows [M] predict targets [M]."""

    rows: torch.Tensor
    targets: torch.Tensor


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, block_size: int, device: torch.device, pool: SlotPool | None = None):
        self.model = model
        self.pool = pool
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = device
        # The co-served rows' activations the forward in progress keeps, if any.
        self._keeping: KeptActivations | None = None
        # Captured decode forwards (CUDA), set by the engine; None runs every forward eagerly.
        self.graphs: DecodeGraphs | None = None
        # The last forward's routing, until record_top_experts reads it.
        self._routed: tuple[RoutedRows, list[tuple[Sequence, int, int]]] | None = None
        # (router, expert) -> routed tokens whose top expert it was, since start.
        self.router_expert_tokens: Counter[tuple[str, str]] = Counter()
        for i, module in enumerate([*model.layers, model.norm]):
            self._add_keep_hook(module, i)

    def _add_keep_hook(self, module: torch.nn.Module, layer: int) -> None:
        """A pre-hook on module that keeps its input rows while a forward keeps any. It holds
        the runner weakly and removes itself once the runner is gone: a model outlives the
        engines built on it (a benchmark builds dozens), whose KV caches it must not keep."""
        runner = weakref.ref(self)

        def hook(module: torch.nn.Module, args: tuple) -> None:
            me = runner()
            if me is None:
                handle.remove()
            elif me._keeping is not None:
                me._keeping.keep_input(layer, args[0])

        handle = module.register_forward_pre_hook(hook)

    def execute(self, scheduled: SchedulerOutput) -> ModelRunnerOutput:
        """One forward. Run it under inference_mode unless scheduled.training is set; then
        train_loss carries the graph back to the trained weights."""
        # No routing until this forward's: one that computes no rows (below) left the last
        # forward's, whose record_top_experts had not run (its step failed after it), to be
        # counted again by this step's.
        self._routed = None
        if not scheduled.num_tokens:  # a co-served backward slice alone
            return ModelRunnerOutput([], torch.empty(0, self.model.shape.vocab_size, device=self.device))
        if scheduled.block_copies:
            self.kv_cache.copy_blocks(scheduled.block_copies, self.block_size)
        batch, sampled, training = self.prepare(scheduled)
        self._keeping = batch.kept
        try:
            if self.graphs is not None and self.graphs.takes(batch, len(scheduled.decodes)):
                hidden = self.graphs.forward(batch)
            else:
                hidden = self.model(batch)
        finally:
            self._keeping = None
        out = ModelRunnerOutput(sampled, self.model.compute_logits(hidden[batch.logits_indices]))
        out.prompt_rows, rows = self._prompt_positions(scheduled)
        if rows:
            out.prompt_logits = self.model.compute_logits(hidden[self._index(rows)])
        if training is not None:
            out.train_loss = self.model.token_loss(hidden[training.rows], training.targets)
            out.train_targets = int(training.targets.numel())
        return out

    def _prompt_positions(self, scheduled: SchedulerOutput) -> tuple[list[tuple[Sequence, int]], list[int]]:
        """The batch rows whose logits score a prompt token, for sequences that asked for
        prompt log-probabilities (a completion group's first only), each position once even
        when a preempted sequence computes its prompt again: ([(seq, count)], rows)."""
        owners: list[tuple[Sequence, int]] = []
        rows: list[int] = []
        row = 0
        for chunk in scheduled.inference:
            seq, start = chunk.seq, chunk.seq.num_computed
            if seq.params.prompt_logprobs is not None and seq.index == 0:
                first = max(start, len(seq.prompt_logprobs))
                end = min(start + chunk.num_tokens, seq.prompt_len - 1)
                if end > first:
                    owners.append((seq, end - first))
                    rows.extend(range(row + first - start, row + end - start))
            row += chunk.num_tokens
        return owners, rows

    def backward(self, work: TrainingHead | TrainingBackward) -> BackwardResult:
        """A co-served head block or backward slice. A slice: layers work.last .. work.first,
        each backpropagated through the graph its forward kept (work.graph) or rebuilt from
        its kept activations over the slice's sequences (fresh attention, trained LoRA with
        autograd, frozen linears replayed), down to work.first or to where work.deadline
        stops it (none, where work.first_seconds says the first would end past it); the LoRA
        masters accumulate gradients."""
        if isinstance(work, TrainingHead):
            return self._head(work)
        if work.first_seconds is not None and time.perf_counter() + work.first_seconds > work.deadline:
            return BackwardResult(work.grad, None, 0, first=work.last + 1)
        graph = work.graph
        if graph is None:
            batch = self._fresh_batch(work, work.kept)
            rope = self.model.rotary.table(batch.positions)
        grad = work.grad
        layer = work.last
        with torch.enable_grad():
            while True:
                started = time.perf_counter()
                if graph is not None:
                    grad = graph.backward(layer, grad)
                else:
                    x = work.kept.inputs[layer].detach().requires_grad_()
                    self.model.layers[layer](x, batch, rope).backward(grad)
                    grad = x.grad
                if work.deadline is not None and grad.is_cuda:
                    torch.cuda.synchronize(grad.device)  # the clock must see the layer's work, not its launch
                now = time.perf_counter()
                if layer == work.first or (work.deadline is not None and 2 * now - started > work.deadline):
                    return BackwardResult(grad, None, 0, first=layer)
                layer -= 1

    def forward_graph(self, work: TrainingGraph) -> KeptGraph:
        """A co-served micro-batch's whole forward with autograd, as a time-sliced step runs
        it but cut at every layer's input, so that backward slices can take it layer by layer;
        its activations go into work.kept as a forward chunk's would (the top layer's output,
        where the head starts, included)."""
        n = work.num_tokens
        kept = work.kept.keeping(slice(0, n), slice(0, n))
        batch = self._fresh_batch(work, kept)
        rope = self.model.rotary.table(batch.positions)
        x = F.embedding(batch.input_ids, self.model.embed)
        graph = KeptGraph([], [])
        with torch.enable_grad():
            for i, layer in enumerate(self.model.layers):
                x = x.detach().requires_grad_()
                kept.keep_input(i, x)
                graph.inputs.append(x)
                x = layer(x, batch, rope)
                graph.outputs.append(x)
        kept.keep_input(len(graph.inputs), x)
        return graph

    def _head(self, work: TrainingHead) -> BackwardResult:
        """Rows [start, stop) of the top layer's output: their loss_scale * summed loss, back
        to those rows (zero for rows without a label); with a deadline, block by block until
        it (from the first block, given its expected time), the rows done those of the
        gradient returned."""
        training = self._loss_rows(work.sequences, 0)
        grads, loss_sum, num_targets = [work.output[work.start : work.start]], 0.0, 0
        start, block = work.start, work.block_seconds
        while start < work.stop:
            if work.deadline is None:
                stop = work.stop
            else:
                began, stop = time.perf_counter(), min(work.stop, start + HEAD_BLOCK_ROWS)
                if block is not None and began + block > work.deadline:
                    break
            grad, loss, targets = self._head_rows(work, training, start, stop)
            grads.append(grad)
            loss_sum, num_targets, start = loss_sum + loss, num_targets + targets, stop
            if work.deadline is not None:
                block = time.perf_counter() - began
        return BackwardResult(torch.cat(grads), loss_sum, num_targets)

    def _head_rows(self, work: TrainingHead, training: _TrainingRows, start: int, stop: int) -> tuple[torch.Tensor, float, int]:
        """The gradient at rows [start, stop) of the top layer's output, their summed loss and targets."""
        keep = (training.rows >= start) & (training.rows < stop)
        rows, targets = training.rows[keep] - start, training.targets[keep]
        x = work.output[start:stop].detach().requires_grad_()
        if not len(rows):
            return torch.zeros_like(x), 0.0, 0
        with torch.enable_grad():
            loss = self.model.token_loss(self.model.norm(x[rows]), targets)
            (loss * work.loss_scale).backward()
        return x.grad, loss.item(), int(targets.numel())

    def _fresh_batch(self, work: TrainingBackward | TrainingGraph, kept: KeptActivations) -> ForwardBatch:
        """The work's sequences as fresh chunks, rows in order, keeping into or replaying kept."""
        input_ids: list[int] = []
        positions: list[int] = []
        attn = AttentionMetadata(torch.empty(0, dtype=torch.long), 0, None, None, [], [])
        as_work = TrainingWork(work.sequences, work.weights)
        self._add_training(as_work, input_ids, positions, attn)
        return ForwardBatch(
            input_ids=self._index(input_ids),
            positions=self._index(positions),
            attn=attn,
            kv_caches=self.kv_cache.layers,
            logits_indices=self._index([]),
            train_lora=self._trained_lora(as_work, len(input_ids)),
            kept=kept,
        )

    def prepare(self, scheduled: SchedulerOutput) -> tuple[ForwardBatch, list[Sequence], _TrainingRows | None]:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        adapter_slots: list[int] = []
        routed: list[tuple[Sequence, int, int]] = []
        mixed: list[tuple[Sequence, int, int]] = []
        logits_rows: list[int] = []
        sampled: list[Sequence] = []
        bs = self.block_size
        for chunk in scheduled.inference:
            seq, n = chunk.seq, chunk.num_tokens
            start = seq.num_computed
            input_ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            slots.extend(seq.block_table[p // bs] * bs + p % bs for p in range(start, start + n))
            if isinstance(seq.adapter, Mixture):  # its adapters' slots, at fixed weights
                mixed.append((seq, len(adapter_slots), n))
                adapter_slots.extend([-1] * n)
            elif isinstance(seq.slot, tuple):  # a router: its experts' slots, chosen per linear
                routed.append((seq, len(adapter_slots), n))
                adapter_slots.extend([-1] * n)
            else:
                adapter_slots.extend([-1 if seq.slot is None else seq.slot] * n)
            if start + n == len(seq.token_ids):
                logits_rows.append(len(input_ids) - 1)
                sampled.append(seq)
        attn = AttentionMetadata(
            slot_mapping=torch.empty(0, dtype=torch.long),
            num_decodes=len(scheduled.decodes),
            decode_slots=None,
            decode_mask=None,
            prefills=[],
            fresh=[],
        )
        if scheduled.decodes:
            self._decode_context(scheduled.decodes, attn)
        row = len(scheduled.decodes)
        for chunk in scheduled.prefills:
            attn.prefills.append(self._prefill_chunk(chunk.seq.num_computed, chunk.seq.block_table, chunk.num_tokens, row))
            row += chunk.num_tokens
        num_inference = len(adapter_slots)
        forward = scheduled.train_forward
        if forward is not None:
            self._add_train_forward(forward, input_ids, positions, slots, attn)
        attn.slot_mapping = torch.tensor(slots, dtype=torch.long).to(self.device)
        work = scheduled.training
        if work is not None and forward is not None:
            raise ValueError("an iteration trains time-sliced or co-served, not both")
        training = None if work is None else self._add_training(work, input_ids, positions, attn)
        trained = work or forward
        batch = ForwardBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.long).to(self.device),
            positions=torch.tensor(positions, dtype=torch.long).to(self.device),
            attn=attn,
            kv_caches=self.kv_cache.layers,
            logits_indices=torch.tensor(logits_rows, dtype=torch.long).to(self.device),
            lora=self._served_lora(adapter_slots + [-1] * (len(input_ids) - num_inference), routed, mixed),
            train_lora=None if trained is None else self._trained_lora(trained, len(input_ids)),
            kept=None if forward is None else self._kept_rows(forward, len(slots)),
        )
        return batch, sampled, training

    def _decode_context(self, decodes: list, attn: AttentionMetadata) -> None:
        lens = torch.tensor([c.seq.num_computed + 1 for c in decodes])
        width = int(lens.max())
        ctx = torch.arange(width)
        valid = ctx[None, :] < lens[:, None]
        # Padding reads the null slot (zeros), never a stale slot: under the mask a score
        # of -inf still turns a NaN value into NaN (0 * NaN), so stale data must not be read.
        context = self._context_slots([c.seq.block_table for c in decodes], ctx)
        attn.decode_slots = torch.where(valid, context, self.kv_cache.null_slot).to(self.device)
        attn.decode_mask = valid.view(len(decodes), 1, 1, width).to(self.device)
        attn.decode_lens = lens.to(torch.int32).to(self.device)

    def _prefill_chunk(self, computed: int, block_table: list[int], n: int, row: int) -> PrefillChunk:
        """Rows [row, row + n) hold positions computed .. computed + n - 1 of a sequence."""
        total = computed + n
        ctx = torch.arange(total)
        query_pos = torch.arange(computed, total)
        return PrefillChunk(
            start=row,
            end=row + n,
            context_slots=self._context_slots([block_table], ctx)[0].to(self.device),
            mask=(ctx[None, :] <= query_pos[:, None]).to(self.device),
        )

    def _add_train_forward(
        self, forward: TrainingForward, input_ids: list[int], positions: list[int], slots: list[int], attn: AttentionMetadata
    ) -> None:
        """Append co-served training chunks as prefill chunks over their own KV blocks."""
        bs = self.block_size
        for chunk in forward.chunks:
            start, n, table = chunk.start, chunk.num_tokens, chunk.block_table
            attn.prefills.append(self._prefill_chunk(start, table, n, len(input_ids)))
            input_ids.extend(chunk.seq.input_ids[start : start + n])
            positions.extend(range(start, start + n))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))

    def _kept_rows(self, forward: TrainingForward, end: int) -> KeptActivations:
        """The micro-batch's activations, kept from the co-served chunks' rows: the rows up to
        `end`, after the inference rows. The chunks run in sequence order, so they are one run
        of rows here and one in the micro-batch."""
        first = forward.chunks[0].input_row
        n = forward.num_tokens
        assert forward.chunks[-1].input_row + forward.chunks[-1].num_tokens - first == n, "chunks not consecutive"
        return forward.kept.keeping(slice(end - n, end), slice(first, first + n))

    def _index(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _add_training(
        self, work: TrainingWork, input_ids: list[int], positions: list[int], attn: AttentionMetadata
    ) -> _TrainingRows:
        """Append the training sequences' rows; each row predicts the next token's label."""
        training = self._loss_rows(work.sequences, len(input_ids))
        for seq in work.sequences:
            start, n = len(input_ids), seq.num_tokens
            input_ids.extend(seq.input_ids)
            positions.extend(range(n))
            ctx = torch.arange(n)
            attn.fresh.append(FreshChunk(start, start + n, (ctx[None, :] <= ctx[:, None]).to(self.device)))
        return training

    def _loss_rows(self, sequences: list[TrainingSequence], first_row: int) -> _TrainingRows:
        """The rows (from first_row, sequences back to back) whose next token has a label."""
        rows: list[int] = []
        targets: list[int] = []
        start = first_row
        for seq in sequences:
            for i in range(seq.num_tokens - 1):
                if seq.labels[i + 1] != IGNORE_INDEX:
                    rows.append(start + i)
                    targets.append(seq.labels[i + 1])
            start += seq.num_tokens
        return _TrainingRows(
            torch.tensor(rows, dtype=torch.long).to(self.device), torch.tensor(targets, dtype=torch.long).to(self.device)
        )

    def _served_lora(
        self, adapter_slots: list[int], routed: list[tuple[Sequence, int, int]], mixed: list[tuple[Sequence, int, int]]
    ) -> LoRARows | None:
        """The served adapters' rows; routed and mixed: (sequence, first row, rows) of each
        router's and each mixture's chunk."""
        self._routed = None
        if not routed and not mixed and (not adapter_slots or max(adapter_slots) < 0):
            return None
        tokens = LoRABatch.build(adapter_slots, self.pool.num_slots, self.device)
        mixtures = None
        if mixed:
            chunks = [(seq.slot, seq.adapter.weights, start, n) for seq, start, n in mixed]
            mixtures = MixedRows.build(adapter_slots, chunks, self.pool.num_slots, self.device)
        return LoRARows(tokens, self.pool.weights, routing=self._routing(routed) if routed else None, mixed=mixtures)

    def _routing(self, routed: list[tuple[Sequence, int, int]]) -> RoutedRows:
        """The step's routers (one per router version and expert slots) and routed rows."""
        index: dict[tuple[str, tuple[int, ...]], int] = {}
        routers: list[StepRouter] = []
        token_routers: list[int] = []
        rows: list[int] = []
        for seq, start, n in routed:
            router, key = seq.adapter, (seq.adapter.content_hash, seq.slot)
            if key not in index:
                index[key] = len(routers)
                routers.append(StepRouter(router.gates_on(self.device), seq.slot, router.top_k, router.temperature))
            token_routers.extend([index[key]] * n)
            rows.extend(range(start, start + n))
        routing = RoutedRows.build(routers, token_routers, rows, self.device)
        self._routed = (routing, routed)
        return routing

    def record_top_experts(self) -> None:
        """After a forward with routed rows: count each routed token under its router's top
        expert (the one its gates weighted most, summed over the gated linears), and append
        the top expert of each routed sequence's sampled token to seq.top_experts. Reads the
        gate weights on the host: call it after the step's sync (the sampler's)."""
        if self._routed is None:
            return
        routing, routed = self._routed
        self._routed = None
        top = routing.usage.argmax(1).tolist()
        row = 0
        for seq, start, n in routed:
            router = seq.adapter
            end = seq.num_computed + n
            first = row + n - max(0, end - max(seq.routed_counted, seq.num_computed))  # rows not counted before
            self.router_expert_tokens.update((router.name, router.experts[e]) for e in top[first : row + n])
            seq.routed_counted = max(seq.routed_counted, end)
            if end == len(seq.token_ids):  # its last row samples a token
                seq.top_experts.append(top[row + n - 1])
            row += n

    def _trained_lora(self, trained: TrainingWork | TrainingForward, num_rows: int) -> LoRARows:
        """The trained adapters' rows: every row after the inference rows (slot 0 for co-served chunks)."""
        routing = None
        if isinstance(trained, TrainingWork):
            token_slots = [seq.slot for seq in trained.sequences for _ in range(seq.num_tokens)]
            dropout, generator, routing = trained.dropout, trained.generator, trained.routing
        else:
            token_slots = [c.seq.slot for c in trained.chunks for _ in range(c.num_tokens)]
            dropout, generator = 0.0, None
        num_slots = next(iter(trained.weights.values())).num_slots
        if routing is not None and num_rows != len(token_slots):
            raise ValueError("a router's gates train in iterations of their own (time-sliced), not beside inference rows")
        token_slots = [-1] * (num_rows - len(token_slots)) + token_slots
        tokens = LoRABatch.build(token_slots, num_slots, self.device)
        return LoRARows(tokens, trained.weights, dropout, generator, routing)

    def _context_slots(self, tables: list[list[int]], ctx: torch.Tensor) -> torch.Tensor:
        """[len(tables), len(ctx)] flat slots of positions ctx in each table (0 past a table's end)."""
        width = max(len(t) for t in tables)
        padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
        block_idx = (ctx // self.block_size).clamp(max=width - 1)
        return padded[:, block_idx] * self.block_size + ctx % self.block_size
