"""Continuous batching: which sequences run this iteration, and how many tokens each.

The scheduler is the only owner of request state. Each iteration it fills a token budget:
first the running sequences (oldest first; one token for a decode, a chunk for a prefill
in progress), then new or preempted sequences from the queue, preempted first. A prefill
chunk shrinks to the free blocks. When the KV cache has no block at all for a running
sequence, co-served training gives its blocks back first if it can (`reclaim`); otherwise
the newest running sequence is preempted (its blocks freed, to be recomputed later) rather
than failing anything.

A waiting sequence is admitted only where its whole prompt fits and leaves a block free for
each running sequence to grow into, taking training's blocks too when they are enough.
Admitted where its first chunk fitted, it took the blocks its own next chunks and the
running sequences' next tokens needed, and within a few iterations it was preempted or
preempted one: over a full cache (bench/preemption_replay.py) 41-45% of the tokens computed
were computed again (now 15-16%). With nothing running there is no reserve: a sequence
alone is always admitted.

A sequence with an adapter runs only while its adapter holds a device slot. When the oldest
waiting sequence cannot get a slot (all pinned by running sequences), nobody behind it may
take a slot either: only base-model sequences pass it. Running sequences always finish,
so its slot comes, and an unpopular adapter is never starved by popular ones.
"""

import bisect
from collections import deque
from collections.abc import Callable

from tandem.server.adapters.peft_format import LoRAAdapter
from tandem.server.adapters.slot_pool import SlotPool
from tandem.server.config import EngineConfig
from tandem.server.engine.iteration import ScheduledChunk, SchedulerOutput
from tandem.server.engine.kv_cache import BlockAllocator
from tandem.server.engine.outputs import FinishReason
from tandem.server.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, config: EngineConfig, allocator: BlockAllocator, pool: SlotPool | None = None):
        self.config = config
        self.allocator = allocator
        self.pool = pool
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # Frees KV blocks held by training if it holds at least the given number; True when
        # it freed them.
        self.reclaim: Callable[[int], bool] = lambda at_least: False
        # Waiting sequences whose adapter failed to load into a slot, with the error: the
        # engine ends their requests after each schedule.
        self.failed_loads: list[tuple[Sequence, Exception]] = []
        # Whether the last schedule turned a waiting sequence away for want of KV blocks.
        self.kv_blocked = False

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def num_queued(self) -> int:
        """Waiting sequences, less the forks waiting only for the sibling whose prompt they
        copy to compute it (that sibling is waiting or running itself): a request for n
        completions queues as one, not n, until its prompt is computed. Read by the metrics
        thread while the engine thread schedules: the queue is copied first (one C call),
        as a deque iterated while it changes raises."""
        return sum(1 for seq in tuple(self.waiting) if self._fork_point(seq) is not None)

    def find(self, request_id: str) -> Sequence | None:
        for seq in self.running:
            if seq.request_id == request_id:
                return seq
        for seq in self.waiting:
            if seq.request_id == request_id:
                return seq
        return None

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Mark a sequence finished and give its blocks back, wherever it is."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.allocator.free(seq.block_table)
        self._release_slot(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self._hand_over_prompt(seq)

    def _hand_over_prompt(self, gone: Sequence) -> None:
        """Waiting forks of a sequence that finished copy the prompt from a running sibling
        instead (else the first of them computes it and the rest copy from that one): when
        the group's first completion ended before its forks were admitted, each of them
        computed the whole prompt again."""
        for seq in self.running:
            if seq.fork_of is gone:
                seq.fork_of = None  # it holds its copy; preempted later, it computes the prompt
        forks = [s for s in self.waiting if s.fork_of is gone]
        if not forks:
            return
        source = next((s for s in self.running if s.group == gone.group), None)
        if source is None:
            source = forks.pop(0)
            source.fork_of = None
        for fork in forks:
            fork.fork_of = source

    def schedule(self, budget: int | None = None) -> SchedulerOutput:
        """The next iteration's chunks, within `budget` tokens (max_num_batched_tokens when
        None). Running sequences first, in arrival order; a prompt chunk leaves a token for
        each running sequence after it, so that no decode waits behind a long prompt."""
        budget = self.config.max_num_batched_tokens if budget is None else budget
        chunks: list[ScheduledChunk] = []
        preempted = 0
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = max(1, min(seq.num_uncomputed, budget - (len(self.running) - i - 1)))
            while self._room(seq) < 1:
                if self.reclaim(1):
                    continue
                victim = self.running[-1]
                self._preempt(victim)
                preempted += 1
                if victim is seq:
                    break
            else:
                # A prefill chunk the free blocks cannot hold whole shrinks to what they hold:
                # preempting for the rest threw away a newer sequence's work (even one near
                # its end) to save this one an iteration or two.
                n = min(n, self._room(seq))
                self.allocator.grow(seq.block_table, seq.num_computed + n)
                chunks.append(ScheduledChunk(seq, n))
                budget -= n
                i += 1
                continue
            break
        slot_blocked = False
        self.kv_blocked = False
        copies: list[tuple[int, int]] = []
        for seq in list(self.waiting):
            if preempted or budget == 0 or len(self.running) >= self.config.max_num_seqs:
                break
            fork = self._fork_point(seq)
            if fork is None:
                continue
            if seq.adapter is not None and (slot_blocked or not self.pool.can_acquire(seq.adapter)):
                slot_blocked = True
                continue
            # The slot first: a load that fails leaves the sequence waiting as it was (moved
            # first, it was in neither queue, holding blocks, and finishing it raised), and
            # training's blocks where they were (reclaimed first, training lost its forward
            # for a request not admitted). Its request fails (failed_loads, for the engine to
            # end); this iteration goes on with what it has admitted (raised from here, a fork
            # admitted before lost its block copies, and the server failed every request).
            if seq.adapter is not None:
                try:
                    seq.slot = self.pool.acquire(seq.adapter)
                except Exception as exc:
                    self.failed_loads.append((seq, exc))
                    break
            # Its whole sequence, and a block for each running sequence to grow into.
            needed = self.allocator.blocks_needed(seq.block_table, len(seq.token_ids)) + len(self.running)
            short = needed - self.allocator.num_free
            if short > 0 and not self.reclaim(short):
                self._release_slot(seq)
                self.kv_blocked = True
                break
            start = max(seq.num_computed, fork)
            n = min(len(seq.token_ids) - start, budget)
            self.waiting.remove(seq)
            self.allocator.grow(seq.block_table, start + n)
            if start > seq.num_computed:
                shared = -(-start // self.allocator.block_size)
                copies.extend(zip(seq.fork_of.block_table[:shared], seq.block_table[:shared]))
                seq.num_computed = start
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.arrival)
            chunks.append(ScheduledChunk(seq, n))
            budget -= n
        # A decode is one token that samples: a generated token, or a prompt's last one. A
        # one-token chunk within a prompt samples nothing (as a decode, it was counted as one
        # and ended an inter-token interval no request saw): it is a prefill of one row.
        out = SchedulerOutput(block_copies=copies)
        for chunk in chunks:
            (out.decodes if chunk.num_tokens == chunk.seq.num_uncomputed == 1 else out.prefills).append(chunk)
        return out

    @staticmethod
    def _fork_point(seq: Sequence) -> int | None:
        """How many prompt tokens seq may copy from the sibling it forks from instead of
        computing them: all but the last (whose logits it needs) once that sibling has
        computed them and holds them; 0 when it computes its prompt itself; None while it
        should wait for the sibling to get there."""
        source = seq.fork_of
        if source is None or seq.num_computed > 0:
            return 0
        shared = seq.prompt_len - 1
        if source.status is SequenceStatus.RUNNING and source.num_computed >= shared:
            return shared
        return None

    def prefetch(self) -> int:
        """Hand the pool the adapters the next waiting sequences need (pool.prefetch_ahead of
        them, soonest first), to load while the iteration just queued computes."""
        if self.pool is None or not self.pool.prefetch_ahead:
            return 0
        upcoming: dict[str, LoRAAdapter] = {}
        for seq in self.waiting:
            if seq.adapter is not None:
                upcoming.setdefault(seq.adapter.content_hash, seq.adapter)
                if len(upcoming) == self.pool.prefetch_ahead:
                    break
        return self.pool.prefetch(list(upcoming.values()))

    def _room(self, seq: Sequence) -> int:
        """How many more tokens seq's blocks and the free ones hold."""
        return (len(seq.block_table) + self.allocator.num_free) * self.allocator.block_size - seq.num_computed

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.free(seq.block_table)
        self._release_slot(seq)
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _release_slot(self, seq: Sequence) -> None:
        if seq.slot is not None:
            self.pool.release(seq.slot)
            seq.slot = None
