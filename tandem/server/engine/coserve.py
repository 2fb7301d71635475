"""Co-served fine-tuning: training micro-batches that run inside the inference iterations.

A micro-batch (TrainingWork: whole sequences + the trained weights) is submitted by the
trainer and worked off over several iterations, after the inference tokens, within the
fine-tuning share of the token budget (server/engine/finetune_share.py):

1. Forward: the sequences' tokens run in chunks, like prefill chunks, through KV blocks
   taken from the free list only (never from inference) and held until its last chunk has
   run (the head and the backward read only what is kept). No graph: each layer's input and each frozen linear's output for the training rows
   are kept instead (server/model/kept_activations.py).
2. Head, a block of rows per iteration: final norm, lm_head and the loss of those rows from
   the stored top-layer output, back to that output (a row's loss depends on its row only).
   For a small model the vocabulary-wide GEMM and its dX weigh as much as several layers:
   done at once it was one long iteration per micro-batch, over any latency target. Beside
   decodes under a target, where one block of HEAD_BLOCK_ROWS fits, the rows left go on
   block by block until the share's deadline, as a backward slice's layers do (planned by
   the cost model and its margin instead, head iterations used 3.5% of a 50%-load window
   where the guard left 6.0%). The head of the rows forwarded so far also fills, by the
   clock, what a forward chunk leaves of its iteration beside decodes: a forward cannot stop
   once started, so it is planned by the cost model and its margin, and ended 0.55x the
   target (median) on the 2-core Xeon at a 252 ms target, where slices end 0.81x.
3. Backward, top layer first, a few layers per iteration: each layer's graph is rebuilt
   from its kept input with autograd, its frozen linears replaying their kept outputs (only
   attention, norms, SiLU and the trained adapter's rank-r GEMMs run again), and
   backpropagated, handing the gradient at its input to the next slice. A slice of k layers
   over T tokens costs about 1.25kT token-layers, the forward of a chunk of n tokens nL.
   Beside decodes under a target, a slice that one layer fits in goes on down until the
   share's deadline (finetune_share.py): it fills the interval by the clock, where the
   forward is planned by the cost model and its margin. Where not even one layer over the
   whole micro-batch fits, a slice is one layer over some of its sequences (attention stays within a sequence, so a layer's
   backward splits exactly by sequence): a layer never has to wait for an iteration with
   room for all of it, which beside steady inference may never come. Where the cost model
   and its margin fit nothing (a prefill took their room), the head and a slice are
   planned anyway and their first block or layer runs only where the cost model says it
   ends by the deadline, on the clock once the inference forward has run.

A micro-batch that starts with no inference running runs its whole forward in one iteration
instead, with autograd, cut at every layer's input (ModelRunner.forward_graph), and its
backward slices run those graphs rather than replaying: alone, it costs what a time-sliced
step costs, and it needs no KV blocks. It keeps the same activations as well, so that beside
inference a slice over some of a layer's sequences can still replay them. Its graphs take
more memory than the kept activations (CoServer.graph_bytes): it runs so only where both fit
under the cap.

Then the trainer reads the micro-batch's loss, and after a step's last micro-batch steps
the optimizer. Memory held for training: the micro-batch's KV blocks during its forward,
taken from the free list only, and its kept activations (per token and layer the input and the frozen linears'
outputs: about 9 x hidden for a Llama; a graphed one's graphs too), capped by the engine's
finetune_activation_bytes. A micro-batch over that cap, or needing more KV blocks than the
whole cache has, would wait forever: it fails at once instead, with what to change.
Inference comes first for KV blocks: when a running request has no block to grow into, a
micro-batch still in its forward (no gradient accumulated yet) gives its blocks and kept
activations back and starts over once there is room, before any request is preempted.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace

import torch

from tandem.server.engine.iteration import (
    HEAD_BLOCK_ROWS,
    BackwardResult,
    SchedulerOutput,
    TrainingBackward,
    TrainingChunk,
    TrainingForward,
    TrainingGraph,
    TrainingHead,
    TrainingWork,
)
from tandem.server.engine.kv_cache import BlockAllocator
from tandem.server.engine.finetune_share import FinetuneShare
from tandem.server.errors import ResourceExhausted
from tandem.server.model.kept_activations import KeptActivations, KeptGraph
from tandem.server.model.llama import ModelShape

# A backward layer against a forward layer: the replay (no frozen GEMMs), then the activation
# gradient and the trained adapter's gradients. 2-core EPYC (Zen 4), SmolLM2, bfloat16, 512
# tokens, r 16 on every linear: forward 19 ms a layer, replay + backward 23 (recomputing the
# frozen GEMMs instead: 43).
BACKWARD_COST = 1.25
# What a layer's graph saves per token, at most, in tensors of the model's dtype: widths of
# hidden and intermediate (norm inputs, q/k/v, attention output, linear inputs, gate/up and
# the SiLU product, and the whole tensors that saved views keep alive); and per token and
# query head, the attention probabilities over its sequence (float32 and a copy in the
# model's dtype: 8 bytes each). SmolLM2 in bfloat16 (storages saved by autograd, r 16 on
# every linear) held 0.79x this bound at 8 x 64, 4 x 128 and 2 x 256 tokens, 0.50x at 1 x 512.
GRAPH_HIDDEN_WIDTHS, GRAPH_INTERMEDIATE_WIDTHS, GRAPH_SCORE_BYTES = 16, 8, 8
# Iterations in a row a started micro-batch may go without progress beside inference before
# its next unit runs whatever the target: the least unit of a backward is one layer over one
# sequence, which for a long sequence beside steady decodes may never fit the room the guard
# leaves (the job then waited for good, holding its activations). One interval in this many
# runs late at most: within a p99's 1%.
STARVED_ITERATIONS = 200


def prior_costs(model: torch.nn.Module) -> dict[str, float]:
    """Each kind of work's cost per unit relative to a forward token, from the model's shape:
    what the latency guard assumes until it has measured (finetune_share.py). A head row is
    the lm_head GEMM and its dX against one token's forward through every layer's weights; a
    backward unit (a token through one layer / num_layers) BACKWARD_COST forward tokens."""
    head = 2 * model.lm_head.numel() / sum(p.numel() for p in model.layers.parameters())
    return {"inference": 1.0, "forward": 1.0, "head": head, "backward": float(BACKWARD_COST)}


@dataclass
class CoservedBatch:
    """A micro-batch in flight. done once its backward reached the bottom layer; then
    loss_sum and num_targets hold its summed token loss. error: why it was dropped, if an
    iteration carrying it failed."""

    work: TrainingWork
    loss_scale: float
    kept: KeptActivations | None = None
    # Started with its whole forward and a graph (no KV blocks), and that graph once run.
    graphed: bool = False
    graph: KeptGraph | None = None
    block_tables: list[list[int]] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    next_seq: int = 0
    next_pos: int = 0
    next_head: int = 0
    next_layer: int = -1
    # The first sequence of next_layer not backpropagated yet, and the rows the slice in
    # flight covers.
    next_layer_seq: int = 0
    backward_rows: tuple[int, int] = (0, 0)
    # Iterations in a row it waited to start, or since it last moved once started.
    starved: int = 0
    grad: torch.Tensor | None = None
    loss_sum: float = 0.0
    num_targets: int = 0
    done: bool = False
    error: Exception | None = None

    @property
    def started(self) -> bool:
        return self.kept is not None

    @property
    def forwarding(self) -> bool:
        return self.next_seq < len(self.work.sequences)

    @property
    def in_head(self) -> bool:
        return not self.forwarding and self.next_head < self.grad.shape[0]

    @property
    def position(self) -> tuple:
        """Where its work stands: changed by every iteration that runs any of it."""
        return self.next_seq, self.next_pos, self.next_head, self.next_layer, self.next_layer_seq, self.graph is not None, self.done


class CoServer:
    def __init__(
        self, allocator: BlockAllocator, shape: ModelShape, linear_widths: Mapping[tuple[int, str], int],
        share: FinetuneShare, dtype: torch.dtype, device: torch.device, activation_bytes: int,
    ):
        """linear_widths: out_features of each LoRA-able linear (layer, group), whose outputs
        a micro-batch keeps; activation_bytes: the most its kept activations may take."""
        self.allocator = allocator
        self.shape = shape
        self.num_layers = shape.num_layers
        self.hidden_size = shape.hidden_size
        self.linear_widths = linear_widths
        self.share = share
        self.dtype = dtype
        self.device = device
        self.activation_bytes = activation_bytes
        # What KeptActivations.empty and the gradient at the top hold per token.
        item = torch.empty((), dtype=dtype).element_size()
        self.bytes_per_token = ((shape.num_layers + 2) * shape.hidden_size + sum(linear_widths.values())) * item
        widths = GRAPH_HIDDEN_WIDTHS * shape.hidden_size + GRAPH_INTERMEDIATE_WIDTHS * shape.intermediate_size
        self._graph_widths = widths * item
        self._queue: list[CoservedBatch] = []
        self.num_reclaims = 0

    def reclaim(self, at_least: int) -> bool:
        """Give the running micro-batch's KV blocks back for inference: it holds them only
        during its forward (a graphed one never), and starts over once there is room. False,
        giving nothing, when it holds fewer than at_least blocks (a waiting request it would
        not admit must not cost training its forward)."""
        batch = next(iter(self._queue), None)
        if batch is None or sum(map(len, batch.block_tables)) < max(1, at_least):
            return False
        self._release(batch)
        fresh = CoservedBatch(batch.work, batch.loss_scale)
        for f in fields(batch):  # the trainer waits on this object: reset it in place
            setattr(batch, f.name, getattr(fresh, f.name))
        self.num_reclaims += 1
        return True

    @property
    def max_tokens(self) -> int:
        """The most tokens a micro-batch may hold within activation_bytes."""
        return self.activation_bytes // self.bytes_per_token

    @property
    def held_bytes(self) -> int:
        """Training activations held now: the running micro-batch's, 0 when none runs (read
        from any thread: metrics)."""
        batch = next(iter(self._queue), None)
        if batch is None or not batch.started:
            return 0
        return batch.work.num_tokens * self.bytes_per_token + (self.graph_bytes(batch.work) if batch.graphed else 0)

    def graph_bytes(self, work: TrainingWork) -> int:
        """The most a micro-batch's graphs (KeptGraph) hold, over every layer."""
        longest = max(s.num_tokens for s in work.sequences)
        per_token = self._graph_widths + GRAPH_SCORE_BYTES * self.shape.num_heads * longest
        return work.num_tokens * self.num_layers * per_token

    def submit(self, work: TrainingWork, loss_scale: float) -> CoservedBatch:
        """Queue a micro-batch; its gradients of loss_scale * (summed token loss) accumulate
        in the weights work.weights were built from, once it is done."""
        batch = CoservedBatch(work, loss_scale)
        self._queue.append(batch)
        return batch

    def has_work(self) -> bool:
        return bool(self._queue)

    def abort(self, error: Exception | None = None) -> None:
        """Drop every queued micro-batch (each marked with error, when given) and give back
        what the running one holds."""
        if self._queue:
            self._release(self._queue[0])
        for batch in self._queue:
            batch.error = error
        self._queue.clear()

    def plan(self, scheduled: SchedulerOutput, running: int, interval_start: float, kv_wanted: bool = False) -> None:
        """Add this iteration's training work to `scheduled`: forward chunks, head rows or a
        backward slice of the running micro-batch, within the share of the token budget left;
        with no inference, a micro-batch within the budget whose graphs fit the cap starts
        with its whole forward (train_graph). Beside decodes under a target, a slice that one
        whole layer fits in may go down to the bottom layer: the share's deadline from
        interval_start (perf_counter) stops it. kv_wanted: a waiting request was just turned
        away for want of KV blocks; no micro-batch takes free ones before it (started, one
        held them through its whole forward, and the request waited that long for its first
        token). running: the inference sequences running."""
        if not self._queue:
            return
        inference_running = running > 0
        batch = self._queue[0]
        if not batch.started and (error := self._refusal(batch)) is not None:
            batch.error = error
            self._queue.pop(0)
            return
        if not batch.started and not (inference_running or scheduled.inference) and self._graph_fits(batch):
            if batch.work.num_tokens <= self.share.allowance(0, False, "forward"):
                self._start(batch, with_blocks=False)
                batch.graphed = True
                scheduled.train_graph = TrainingGraph(batch.work.sequences, batch.work.weights, batch.kept)
                return
        if not batch.started:
            # Past STARVED_ITERATIONS of waiting for the headroom, it starts without it.
            headroom = running if batch.starved < STARVED_ITERATIONS else 0
            if kv_wanted or not self._start(batch, headroom=headroom):
                batch.starved += 1
                return  # waits for free KV blocks, inference's first
        kind = "forward" if batch.forwarding else "head" if batch.in_head else "backward"
        units = self.share.allowance(scheduled.num_tokens, inference_running, kind)
        # Beside inference, a head row or backward layer that does not fit waits; alone, or
        # once it has waited STARVED_ITERATIONS iterations, one always runs, so that the
        # micro-batch moves.
        least = 0 if inference_running and batch.starved < STARVED_ITERATIONS else 1
        deadline = self.share.deadline(interval_start) if scheduled.decodes else None
        if kind == "forward":
            if max(least, int(units)) > 0:
                scheduled.train_forward = self._forward(batch, max(least, int(units)))
            if deadline is not None:
                scheduled.train_head = self._head_behind(batch, deadline)
        else:
            if kind == "head":
                scheduled.train_head = self._head(batch, max(least, int(units)), deadline)
            else:
                scheduled.train_backward = self._backward(batch, units, least, deadline)

    def finish(self, scheduled: SchedulerOutput, result: BackwardResult | KeptGraph | None) -> bool:
        """Advance the running micro-batch past what this iteration did; a slice or head its
        deadline stopped early is cut to what it ran in `scheduled` too (what work() reports).
        Once its forward has run, its KV blocks go back: the head and the backward read the
        kept activations only. Returns whether a deadline cut the iteration's training work."""
        batch = next(iter(self._queue), None)
        before = None if batch is None else batch.position
        cut = self._advance(scheduled, result)
        if batch is not None and batch.started:
            # A forward chunk moved it in plan already, before `before` was taken.
            moved = batch.position != before or scheduled.train_forward is not None or scheduled.train_graph is not None
            batch.starved = 0 if moved else batch.starved + 1
        return cut

    def _advance(self, scheduled: SchedulerOutput, result: BackwardResult | KeptGraph | None) -> bool:
        batch = next(iter(self._queue), None)
        if batch is not None and batch.block_tables and not batch.forwarding:
            self._free_blocks(batch)
        if result is None:
            return False
        if isinstance(result, KeptGraph):
            batch.graph = result
            batch.next_seq = len(batch.work.sequences)
            return False
        head = scheduled.train_head
        if head is not None:
            stop = head.start + result.grad.shape[0]
            batch.grad[head.start : stop] = result.grad
            batch.loss_sum += result.loss_sum
            batch.num_targets += result.num_targets
            batch.next_head = stop
            scheduled.train_head = replace(head, stop=stop)
            return head.start < stop < head.stop
        planned = scheduled.train_backward
        backward = scheduled.train_backward = replace(planned, first=result.first)
        if result.first > planned.last:  # its first layer was not expected to end by the deadline
            return False
        start, stop = batch.backward_rows
        batch.grad[start:stop] = result.grad
        cut = result.first > planned.first
        batch.next_layer_seq += len(backward.sequences) if backward.first == backward.last else 0
        if batch.next_layer_seq in (0, len(batch.work.sequences)):
            batch.next_layer, batch.next_layer_seq = backward.first - 1, 0
            if batch.graph is not None:  # a layer whose sequences were replayed: its graph is done with too
                batch.graph.drop(backward.first)
        if batch.next_layer < 0:
            self._release(batch)
            batch.done = True
            self._queue.pop(0)
        return cut

    def _refusal(self, batch: CoservedBatch) -> ResourceExhausted | None:
        """Why a micro-batch can never start here, if it cannot."""
        tokens = batch.work.num_tokens
        if tokens > self.max_tokens:
            return ResourceExhausted(
                f"a co-served micro-batch of {tokens} tokens keeps {tokens * self.bytes_per_token} bytes of activations, "
                f"over finetune_activation_bytes {self.activation_bytes} (at most {self.max_tokens} tokens): "
                "raise --finetune-activation-bytes or lower --finetune-micro-batch-tokens"
            )
        needed = self._blocks_needed(batch)
        if needed > self.allocator.num_blocks:
            return ResourceExhausted(
                f"a co-served micro-batch of {tokens} tokens needs {needed} KV blocks; the whole cache has "
                f"{self.allocator.num_blocks}: raise --kv-cache-bytes or lower --finetune-micro-batch-tokens"
            )
        return None

    def _graph_fits(self, batch: CoservedBatch) -> bool:
        """Whether the micro-batch's graphs and kept activations fit under the cap together."""
        return batch.work.num_tokens * self.bytes_per_token + self.graph_bytes(batch.work) <= self.activation_bytes

    def _start(self, batch: CoservedBatch, with_blocks: bool = True, headroom: int = 0) -> bool:
        """Take KV blocks for the whole micro-batch from the free list, if there are enough
        (with_blocks: its forward runs in chunks, through them) with `headroom` left free, and
        room for its activations. The activations first: an allocation that fails leaves
        nothing held. Headroom, a block for each running sequence to grow into during the
        forward: started wherever its own blocks were free, on a nearly full cache the first
        decode to cross a block boundary took them back (reclaim), again at every start."""
        lengths = [s.num_tokens for s in batch.work.sequences]
        if with_blocks and self._blocks_needed(batch) + headroom > self.allocator.num_free:
            return False
        kept = KeptActivations.empty(self.num_layers, sum(lengths), self.hidden_size, self.linear_widths, self.dtype, self.device)
        grad = torch.empty_like(kept.inputs[-1])
        for n in lengths if with_blocks else ():
            table: list[int] = []
            self.allocator.grow(table, n)
            batch.block_tables.append(table)
        batch.rows = [sum(lengths[:i]) for i in range(len(lengths))]
        batch.kept, batch.grad = kept, grad
        batch.next_layer = self.num_layers - 1
        return True

    def _blocks_needed(self, batch: CoservedBatch) -> int:
        return sum(self.allocator.blocks_needed([], s.num_tokens) for s in batch.work.sequences)

    def _release(self, batch: CoservedBatch) -> None:
        self._free_blocks(batch)
        batch.kept = batch.grad = batch.graph = None

    def _free_blocks(self, batch: CoservedBatch) -> None:
        for table in batch.block_tables:
            self.allocator.free(table)
        batch.block_tables = []

    def _forward(self, batch: CoservedBatch, allowance: int) -> TrainingForward:
        """Chunks of the next allowance tokens, in sequence order."""
        chunks = []
        sequences = batch.work.sequences
        while allowance > 0 and batch.forwarding:
            seq = sequences[batch.next_seq]
            n = min(allowance, seq.num_tokens - batch.next_pos)
            chunks.append(
                TrainingChunk(seq, batch.next_pos, n, batch.block_tables[batch.next_seq], batch.rows[batch.next_seq] + batch.next_pos)
            )
            allowance -= n
            batch.next_pos += n
            if batch.next_pos == seq.num_tokens:
                batch.next_seq, batch.next_pos = batch.next_seq + 1, 0
        return TrainingForward(chunks, batch.work.weights, batch.kept)

    def work(self, scheduled: SchedulerOutput) -> dict[str, float]:
        """The iteration's units of each kind of work, what the share's cost model is fitted to:
        inference and forward tokens, head rows, backward token-layers / num_layers."""
        work = {"inference": float(sum(c.num_tokens for c in scheduled.inference))}
        for forward in (scheduled.train_forward, scheduled.train_graph):
            if forward is not None:
                work["forward"] = float(forward.num_tokens)
        if scheduled.train_head is not None:
            work["head"] = float(scheduled.train_head.num_tokens)
        if (backward := scheduled.train_backward) is not None:
            work["backward"] = backward.num_tokens * (backward.last - backward.first + 1) / self.num_layers
        return work

    def _head(self, batch: CoservedBatch, rows: int, deadline: float | None) -> TrainingHead | None:
        """The next `rows` rows of the head; with a deadline, where a whole block fits, all the
        rows left, for the deadline to stop between blocks."""
        start = batch.next_head
        end = batch.grad.shape[0]
        if deadline is not None and (rows >= HEAD_BLOCK_ROWS or not rows):
            block = None if rows else self.share.seconds("head", HEAD_BLOCK_ROWS)
            return TrainingHead(batch.work.sequences, batch.kept.inputs[-1], start, end, batch.loss_scale, deadline, block)
        if not rows:
            return None
        return TrainingHead(batch.work.sequences, batch.kept.inputs[-1], start, min(end, start + rows), batch.loss_scale)

    def _head_behind(self, batch: CoservedBatch, deadline: float) -> TrainingHead | None:
        """The head over the rows forwarded by the end of this iteration and not headed yet,
        to fill by the clock what the forward chunk (planned by the cost model and its margin)
        left of the interval: a row's head needs only its own row. The first block runs only
        where the cost model says it ends by the deadline."""
        forwarded = batch.rows[batch.next_seq] + batch.next_pos if batch.forwarding else batch.grad.shape[0]
        if forwarded <= batch.next_head:
            return None
        block = self.share.seconds("head", HEAD_BLOCK_ROWS)
        return TrainingHead(batch.work.sequences, batch.kept.inputs[-1], batch.next_head, forwarded, batch.loss_scale, deadline, block)

    def _backward(self, batch: CoservedBatch, units: float, least: int, deadline: float | None) -> TrainingBackward | None:
        """The next layers down, as many as `units` (token-layers / num_layers) pay for, or
        with a deadline all of them until it; where not one whole layer fits, the next
        sequences of the current layer that do; at least `least` of either."""
        sequences = batch.work.sequences
        tokens = batch.grad.shape[0]
        token_layers = units * self.num_layers
        last = batch.next_layer
        if batch.next_layer_seq == 0 and int(token_layers / tokens) >= max(1, least):
            first = 0 if deadline is not None else max(0, last - int(token_layers / tokens) + 1)
            batch.backward_rows = (0, tokens)
            return TrainingBackward(sequences, batch.work.weights, batch.kept, first, last, batch.grad, deadline, batch.graph)
        begin = end = batch.next_layer_seq
        while end < len(sequences) and (sequences[end].num_tokens <= token_layers or end - begin < least):
            token_layers -= sequences[end].num_tokens
            end += 1
        if end == begin:
            return None if deadline is None else self._backward_by_clock(batch, deadline)
        start, stop = batch.rows[begin], batch.rows[end - 1] + sequences[end - 1].num_tokens
        batch.backward_rows = (start, stop)
        kept = batch.kept.rows_between(start, stop)
        return TrainingBackward(sequences[begin:end], batch.work.weights, kept, last, last, batch.grad[start:stop])

    def _backward_by_clock(self, batch: CoservedBatch, deadline: float) -> TrainingBackward:
        """Where the cost model and its margin fit no part of a layer beside decodes (a
        prefill took the margin's room): the rest of the current layer, and at a layer
        boundary the layers below it until the deadline, its first layer run only where the
        cost model says it ends by the deadline, checked on the clock once the inference
        forward has run (at a 50%-load window on the 2-core EPYC a sixth of the decoding
        iterations in the backward carried no training work, ending 0.2x the target short
        of the deadline)."""
        sequences, begin = batch.work.sequences, batch.next_layer_seq
        start, stop = batch.rows[begin], batch.grad.shape[0]
        seconds = self.share.seconds("backward", (stop - start) / self.num_layers)
        batch.backward_rows = (start, stop)
        last = batch.next_layer
        if begin == 0:
            return TrainingBackward(sequences, batch.work.weights, batch.kept, 0, last, batch.grad, deadline, batch.graph, seconds)
        kept = batch.kept.rows_between(start, stop)
        return TrainingBackward(sequences[begin:], batch.work.weights, kept, last, last, batch.grad[start:stop], deadline, None, seconds)
