"""The scheduler alone, over a real BlockAllocator: what it admits, how it grows running
sequences under KV pressure, and what it calls a decode."""

from bench.preemption_replay import PATTERNS, replay
from tandem.server.config import EngineConfig
from tandem.server.engine.kv_cache import BlockAllocator
from tandem.server.engine.outputs import FinishReason
from tandem.server.engine.sampling_params import SamplingParams
from tandem.server.engine.scheduler import Scheduler
from tandem.server.engine.sequence import Sequence, SequenceStatus
from tests.engine.helpers import make_engine, random_prompts

PARAMS = SamplingParams(max_new_tokens=100)


def scheduler(num_blocks: int, budget: int, pool=None) -> Scheduler:
    return Scheduler(EngineConfig(max_num_batched_tokens=budget), BlockAllocator(num_blocks, 4), pool)


def running(s: Scheduler, prompt_len: int, computed: int, generated: int = 0) -> Sequence:
    """A running sequence with `computed` of its prompt_len + generated tokens in its blocks."""
    seq = Sequence(f"r{len(s.running)}", prompt_len, [1] * (prompt_len + generated), PARAMS, len(s.running))
    s.allocator.grow(seq.block_table, computed)
    seq.num_computed, seq.status = computed, SequenceStatus.RUNNING
    s.running.append(seq)
    return seq


def waiting(s: Scheduler, prompt_len: int, adapter: object = None) -> Sequence:
    seq = Sequence("w", prompt_len, [1] * prompt_len, PARAMS, 100, adapter=adapter)
    s.add(seq)
    return seq


class TrainingBlocks:
    """What co-served training holds: KV blocks that reclaim gives back when asked for no
    more than it holds (CoServer.reclaim's rule)."""

    def __init__(self, allocator: BlockAllocator, num_blocks: int):
        self.allocator, self.table, self.reclaims = allocator, [], 0
        allocator.grow(self.table, num_blocks * allocator.block_size)

    def reclaim(self, at_least: int) -> bool:
        if len(self.table) < max(1, at_least):
            return False
        self.allocator.free(self.table)
        self.reclaims += 1
        return True


class Pool:
    """A slot pool whose loads succeed or fail, counting pins."""

    def __init__(self, fails: bool):
        self.fails, self.pins = fails, 0

    def can_acquire(self, adapter: object) -> bool:
        return True

    def acquire(self, adapter: object) -> int:
        if self.fails:
            raise RuntimeError("out of memory for a slot")
        self.pins += 1
        return 0

    def release(self, slot: int) -> None:
        self.pins -= 1


def test_a_running_prefill_shrinks_its_chunk_to_the_free_blocks_instead_of_preempting():
    """It preempted newer sequences (even ones about to finish) until its whole chunk fit."""
    s = scheduler(num_blocks=7, budget=16)
    prefill = running(s, prompt_len=30, computed=8)  # 2 blocks
    decode = running(s, prompt_len=5, computed=5, generated=1)  # 2 blocks; 3 free: 12 tokens
    out = s.schedule()
    assert [(c.seq, c.num_tokens) for c in out.prefills] == [(prefill, 12)]
    assert [(c.seq, c.num_tokens) for c in out.decodes] == [(decode, 1)]
    assert s.num_preemptions == 0 and s.allocator.num_free == 0 and len(prefill.block_table) == 5


def test_a_running_sequence_with_no_token_of_room_preempts_the_newest():
    """Then its chunk shrinks to what that freed: it went on preempting, itself at last."""
    s = scheduler(num_blocks=4, budget=16)
    prefill = running(s, prompt_len=30, computed=8)
    newest = running(s, prompt_len=7, computed=7, generated=1)
    out = s.schedule()
    assert s.num_preemptions == 1 and newest.status is SequenceStatus.WAITING and newest.num_computed == 0
    assert [(c.seq, c.num_tokens) for c in out.prefills] == [(prefill, 8)]  # what the freed blocks hold


def test_admission_keeps_a_block_free_for_each_running_sequence():
    """Admitted where the free blocks held its first chunk, a request took the blocks the
    running ones grew into next, and one of them (often itself) was preempted."""
    s = scheduler(num_blocks=10, budget=64)
    first = running(s, prompt_len=5, computed=5, generated=1)
    running(s, prompt_len=5, computed=5, generated=1)
    late = waiting(s, prompt_len=20)  # 5 blocks of the 6 free, with 2 to keep
    out = s.schedule()
    assert late.status is SequenceStatus.WAITING and s.kv_blocked and len(out.decodes) == 2
    s.finish(first, FinishReason.ABORT)  # 8 free: 5 and one for the sequence left
    out = s.schedule()
    assert late.status is SequenceStatus.RUNNING and not s.kv_blocked
    assert [(c.seq, c.num_tokens) for c in out.prefills] == [(late, 20)]


def test_admission_waits_for_the_whole_prompt_and_a_sequence_alone_is_always_admitted():
    """A prompt whose first chunk fitted took, chunk by chunk, what the running sequences
    needed next; alone (no reserve) it is admitted even when it takes every block."""
    s = scheduler(num_blocks=10, budget=8)
    decode = running(s, prompt_len=5, computed=5, generated=1)
    late = waiting(s, prompt_len=36)  # its first chunk: 2 blocks of the 8 free; the whole prompt 9
    s.schedule()
    assert late.status is SequenceStatus.WAITING and s.kv_blocked
    s.finish(decode, FinishReason.ABORT)
    out = s.schedule()
    assert late.status is SequenceStatus.RUNNING and [(c.seq, c.num_tokens) for c in out.prefills] == [(late, 8)]


def test_a_slot_load_that_fails_leaves_trainings_kv_blocks_alone():
    """Its blocks were reclaimed before the load: training lost its forward for a request
    that was not admitted."""
    s = scheduler(num_blocks=10, budget=64, pool=Pool(fails=True))
    training = TrainingBlocks(s.allocator, 8)
    s.reclaim = training.reclaim
    seq = waiting(s, prompt_len=12, adapter=object())  # 3 blocks, 2 free: 1 short
    assert not s.schedule()
    assert len(training.table) == 8 and training.reclaims == 0 and s.allocator.num_free == 2
    assert [q for q, _ in s.failed_loads] == [seq] and seq.status is SequenceStatus.WAITING and not seq.block_table


def test_a_slot_acquired_for_a_request_the_kv_cache_turns_away_is_released():
    pool = Pool(fails=False)
    s = scheduler(num_blocks=10, budget=64, pool=pool)
    running(s, prompt_len=21, computed=21, generated=1)  # 6 blocks
    training = TrainingBlocks(s.allocator, 2)
    s.reclaim = training.reclaim
    seq = waiting(s, prompt_len=16, adapter=object())  # 4 blocks and 1 kept, 2 free: 3 short of the 2 held
    s.schedule()
    assert seq.status is SequenceStatus.WAITING and seq.slot is None and pool.pins == 0
    assert s.kv_blocked and len(training.table) == 2 and not s.failed_loads


def test_a_one_token_chunk_within_a_prompt_is_not_a_decode():
    """A decode samples a token. A prompt chunk of one token that samples nothing counted as
    one (decode tokens, and an inter-token interval for FinetuneShare that no request saw)."""
    s = scheduler(num_blocks=10, budget=2)
    decode = running(s, prompt_len=5, computed=5, generated=1)
    late = waiting(s, prompt_len=5)
    out = s.schedule()
    assert [c.seq for c in out.decodes] == [decode]
    assert [(c.seq, c.num_tokens) for c in out.prefills] == [(late, 1)]


def test_a_prompts_last_token_alone_is_a_decode():
    """It samples the first token, as a decode samples the next."""
    s = scheduler(num_blocks=10, budget=2)
    decode = running(s, prompt_len=5, computed=5, generated=1)
    last = running(s, prompt_len=5, computed=4)
    out = s.schedule()
    assert [c.seq for c in out.decodes] == [decode, last] and not out.prefills


def test_a_one_token_prompt_chunk_ends_no_inter_token_interval(tiny_hf_model, smollm2_tokenizer, monkeypatch):
    engine = make_engine(tiny_hf_model, smollm2_tokenizer, max_num_batched_tokens=1)
    intervals = []
    observe = engine.share.observe

    def observed(seconds: float, work: dict, interval: float | None, cut: bool = False) -> None:
        intervals.append(interval)
        observe(seconds, work, interval, cut)

    monkeypatch.setattr(engine.share, "observe", observed)
    (prompt,) = random_prompts([3], len(smollm2_tokenizer))
    engine.add_request("r", prompt, SamplingParams(temperature=0.0, max_new_tokens=3, ignore_eos=True))
    while engine.has_work():
        engine.step()
    # Two prompt tokens alone, then the prompt's last (the first token) and two decodes.
    assert [interval is not None for interval in intervals] == [False, False, True, True, True]
    assert engine.iteration_tokens["decode"] == 3 and engine.iteration_tokens["prefill"] == 2


def test_a_full_cache_recomputes_little():
    """bench/preemption_replay.py's overload (a request every 20 iterations): admitted where
    their first chunk fitted, 41% of the tokens computed were computed again."""
    result = replay(PATTERNS["every20"], seed=0, iterations=4000)
    assert result["recomputed_share"] < 0.2 and result["finished"] >= 140


def test_forks_waiting_for_their_groups_prompt_are_not_queued_requests(tiny_hf_model, smollm2_tokenizer):
    """n completions are one sequence that computes the prompt and n - 1 forks that wait for
    it to copy it: tandem:num_requests_waiting (the HPA's and the endpoint picker's queue
    depth) read a request for n = 4 as 4 queued. Forks the batch has no room for once the
    prompt is computed are queued as any request is."""
    engine = make_engine(tiny_hf_model, smollm2_tokenizer, max_num_seqs=2, max_num_batched_tokens=4)
    (prompt,) = random_prompts([6], len(smollm2_tokenizer))
    engine.add_request("r", prompt, SamplingParams(n=4, max_new_tokens=50, ignore_eos=True))
    counts = lambda: (engine.stats().num_running, engine.stats().num_waiting)
    assert counts() == (0, 1)
    engine.step()  # the first sequence computes 4 of the prompt's 6 tokens; its forks wait for it
    assert counts() == (1, 0)
    engine.step()  # the prompt is computed: the forks may copy it, at the next admission
    assert counts() == (1, 3)
    engine.step()  # one fork joins; the batch has no room for the other two
    assert counts() == (2, 2)
