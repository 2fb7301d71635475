"""The asyncio face of the engine: streams, early exits that free resources, errors up front."""

import asyncio
import itertools
import time

import pytest
import torch

from tandem.server.config import EngineConfig
from tandem.server.engine.async_engine import AsyncEngine
from tandem.server.engine.sampling_params import SamplingParams
from tandem.server.errors import InvalidRequest, NotFound, ResourceExhausted, Unavailable
from tests.engine.helpers import make_engine, stream_ended


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = AsyncEngine(EngineConfig(model=str(tiny_model_dir), dtype="float32", max_num_seqs=4, max_waiting=2))
    eng.start()
    yield eng
    eng.shutdown()


async def collect(engine, prompt, params, rid):
    return [out async for out in engine.generate(prompt, params, rid)]


def test_loads_a_hugging_face_directory(engine):
    assert engine.info.architecture == "llama"
    assert engine.info.dtype == "float32"
    assert engine.info.max_model_len == 512


def test_concurrent_streams_end_with_usage(engine):
    async def main():
        params = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
        return await asyncio.gather(*(collect(engine, f"Hello number {i}", params, f"s{i}") for i in range(4)))

    for outs in asyncio.run(main()):
        assert outs[-1].finished and outs[-1].finish_reason.value == "length"
        assert sum(len(o.token_ids) for o in outs) == 6 == outs[-1].generated_tokens
        assert outs[-1].prompt_tokens > 0
    assert engine.stats().num_free_blocks == engine.stats().num_total_blocks


def spy_aborts(engine, monkeypatch) -> list[str]:
    """The request ids the engine thread aborts from now on."""
    aborted, abort = [], engine.engine.abort
    monkeypatch.setattr(engine.engine, "abort", lambda request_id: aborted.append(request_id) or abort(request_id))
    return aborted


async def until_idle(engine) -> None:
    for _ in range(500):
        if engine.stats().num_running == 0:
            return
        await asyncio.sleep(0.01)


# Both asserted that the request ended, which a request of 400 tokens does on its own when
# the host runs them within the wait: they passed with the abort removed. Now the request
# must stop far short of its 400 tokens, aborted by the engine.
def test_leaving_a_stream_early_aborts_and_frees_blocks(engine, monkeypatch):
    aborted = spy_aborts(engine, monkeypatch)
    decoded = engine.stats().iteration_tokens["decode"]

    async def main():
        params = SamplingParams(temperature=0.0, max_new_tokens=400, ignore_eos=True)
        stream = engine.generate("A long story", params, "early")
        await stream.__anext__()
        assert engine.stats().num_free_blocks < engine.stats().num_total_blocks
        await stream.aclose()
        await until_idle(engine)

    asyncio.run(main())
    assert engine.stats().num_running == 0 and aborted == ["early"]
    assert engine.stats().iteration_tokens["decode"] - decoded < 100
    assert engine.stats().num_free_blocks == engine.stats().num_total_blocks


def test_cancelled_task_aborts(engine, monkeypatch):
    aborted = spy_aborts(engine, monkeypatch)
    decoded = engine.stats().iteration_tokens["decode"]

    async def main():
        params = SamplingParams(temperature=0.0, max_new_tokens=400, ignore_eos=True)
        task = asyncio.create_task(collect(engine, "Cancel me", params, "cancel"))
        while engine.stats().num_running == 0:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await until_idle(engine)

    asyncio.run(main())
    assert engine.stats().num_running == 0 and aborted == ["cancel"]
    assert engine.stats().iteration_tokens["decode"] - decoded < 100
    assert engine.stats().num_free_blocks == engine.stats().num_total_blocks


def test_a_call_that_arrives_as_shutdown_begins_is_refused_not_left_waiting(tiny_model_dir):
    """generate checked only for a failed engine under its lock: a call past its first check
    (its text still being tokenized) that registered after shutdown() had taken its list of
    streams to end was never ended, and waited for good."""
    import threading

    eng = AsyncEngine(EngineConfig(model=str(tiny_model_dir), dtype="float32"))
    tokenizing, go_on = threading.Event(), threading.Event()
    tokenize = eng.tokenize

    def held(text):
        tokenizing.set()
        go_on.wait(30)
        return tokenize(text)

    eng.tokenize = held
    eng.start()

    async def main():
        call = asyncio.create_task(collect(eng, "late", SamplingParams(max_new_tokens=4), "late"))
        assert await asyncio.to_thread(tokenizing.wait, 30)
        eng.shutdown()
        go_on.set()
        with pytest.raises(Unavailable, match="shutting down"):
            await asyncio.wait_for(call, 10)

    try:
        asyncio.run(main())
    finally:
        go_on.set()
        eng.shutdown()


def test_errors_come_before_any_output(engine):
    async def first(prompt, params, rid="e", adapter=None):
        async for _ in engine.generate(prompt, params, rid, adapter):
            pass

    with pytest.raises(InvalidRequest, match="top_p"):
        asyncio.run(first("hi", SamplingParams(top_p=2.0)))
    with pytest.raises(NotFound, match="adapter 'nope'"):
        asyncio.run(first("hi", SamplingParams(), adapter="nope"))


def test_a_full_server_refuses_at_once(engine):
    """Six requests in flight, four running and two queued: the seventh is refused at once.
    (The test waited for the six's first outputs, which the two queued get only once a
    running one ends: it relied on four streams stopped for their unread outputs still
    counting against the limit, which they no longer do.)"""
    async def main():
        params = SamplingParams(temperature=0.0, max_new_tokens=300, ignore_eos=True)
        streams = [engine.generate("busy", params, f"b{i}") for i in range(6)]
        firsts = [asyncio.ensure_future(anext(s)) for s in streams]
        while (stats := engine.stats()).num_running + stats.num_waiting < 6:
            await asyncio.sleep(0.005)
        with pytest.raises(ResourceExhausted, match="limit of 6"):
            await collect(engine, "one too many", params, "extra")
        for first in firsts:
            first.cancel()
        await asyncio.gather(*firsts, return_exceptions=True)
        for s in streams:
            await s.aclose()
        return stats

    stats = asyncio.run(main())
    assert (stats.num_running, stats.num_waiting) == (4, 2)


def test_chat_template_and_its_errors(engine):
    ids = asyncio.run(engine.encode([{"role": "user", "content": "Hi"}]))
    assert "<|im_start|>assistant" in engine.tokenizer.decode(ids)
    with pytest.raises(InvalidRequest, match="role"):
        asyncio.run(engine.encode([{"role": "wizard", "content": "Hi"}]))
    with pytest.raises(InvalidRequest, match="empty"):
        asyncio.run(engine.encode([]))


def test_text_too_long_for_the_context_is_refused_before_tokenizing(engine):
    limit = engine.info.max_model_len * 32
    with pytest.raises(InvalidRequest, match=rf"^the text is {limit + 1} characters long; no more than {limit} can fit"):
        asyncio.run(engine.encode("x" * (limit + 1)))
    with pytest.raises(InvalidRequest, match=rf"^the messages' text is {limit + 1} characters long"):
        asyncio.run(engine.encode([{"role": "user", "content": "y" * (limit + 1)}]))


def test_not_started_is_unavailable(tiny_model_dir):
    eng = AsyncEngine(EngineConfig(model=str(tiny_model_dir), dtype="float32"))

    async def main():
        async for _ in eng.generate("hi", SamplingParams(), "x"):
            pass

    with pytest.raises(Unavailable):
        asyncio.run(main())


def failing_at(config: EngineConfig, call: int, error: Exception | None = None) -> AsyncEngine:
    """A started engine whose model runner raises error (RuntimeError("boom")) on its call-th batch."""
    eng = AsyncEngine(config)
    execute = eng.engine.runner.execute
    calls = {"n": 0}

    def fail_once(scheduled):
        calls["n"] += 1
        if calls["n"] == call:
            raise error or RuntimeError("boom")
        return execute(scheduled)

    eng.engine.runner.execute = fail_once
    eng.start()
    return eng


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(tiny_model_dir):
    eng = failing_at(EngineConfig(model=str(tiny_model_dir), dtype="float32"), call=1)
    try:
        params = SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)
        with pytest.raises(RuntimeError, match="internal engine error: RuntimeError: boom"):
            asyncio.run(collect(eng, "first", params, "victim"))
        outs = asyncio.run(collect(eng, "second", params, "survivor"))
        assert outs[-1].finished and outs[-1].generated_tokens == 4
        assert eng.stats().num_free_blocks == eng.stats().num_total_blocks
    finally:
        eng.shutdown()


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
], ids=["cpu", "cuda"])
def test_a_step_out_of_memory_fails_its_requests_as_resource_exhausted(tiny_model_dir, error):
    """It was an internal error, which clients do not retry, though the next iteration may fit."""
    eng = failing_at(EngineConfig(model=str(tiny_model_dir), dtype="float32"), call=1, error=error)
    try:
        params = SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)
        with pytest.raises(ResourceExhausted, match="the iteration that carried this request ran out of memory .*: retry"):
            asyncio.run(collect(eng, "first", params, "victim"))
        assert asyncio.run(collect(eng, "second", params, "survivor"))[-1].generated_tokens == 4
    finally:
        eng.shutdown()


def wait_for_a_send(eng: AsyncEngine) -> None:
    """Hold the engine thread until a request is sent: a first request's step that waits so
    cannot finish it on a slow host before the second request is queued."""
    deadline = time.monotonic() + 30
    while eng._inbox.empty() and time.monotonic() < deadline:
        time.sleep(0.001)


def test_a_failing_step_fails_only_the_requests_it_carried(tiny_model_dir):
    """Every queued request failed with INTERNAL beside the batch's, though none of them had
    run and a retry would have served each."""
    eng = AsyncEngine(EngineConfig(model=str(tiny_model_dir), dtype="float32", max_num_seqs=1))
    execute, failed = eng.engine.runner.execute, []

    def fail_while_one_waits(scheduled):
        if not failed:
            if eng.engine.scheduler.waiting:  # the second request queued behind the first
                failed.append(True)
                raise RuntimeError("boom")
            wait_for_a_send(eng)
        return execute(scheduled)

    eng.engine.runner.execute = fail_while_one_waits
    eng.start()
    params = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)

    async def both() -> list:
        # Token ids, not text: no tokeniser thread between the two sends, so the first is queued first.
        return await asyncio.gather(collect(eng, [1, 2], params, "running"), collect(eng, [3, 4], params, "queued"), return_exceptions=True)

    try:
        running, queued = asyncio.run(both())
        assert failed and isinstance(running, RuntimeError) and "internal engine error: RuntimeError: boom" in str(running)
        assert not isinstance(queued, BaseException) and queued[-1].finished and queued[-1].generated_tokens == 8
        assert eng.stats().num_free_blocks == eng.stats().num_total_blocks
    finally:
        eng.shutdown()


def test_an_adapter_that_cannot_be_loaded_fails_its_request_alone(tiny_model_dir, tiny_hf_model, tmp_path):
    """Its load's error left the scheduler and the server failed every request in flight."""
    from tests.adapters.make_adapters import make_adapter

    make_adapter(tiny_hf_model, tmp_path / "big", r=4)
    eng = AsyncEngine(EngineConfig(
        model=str(tiny_model_dir), dtype="float32", adapters_dir=str(tmp_path), max_lora_rank=8, adapter_cache_prefault=False,
    ))

    def out_of_memory(adapter):
        raise torch.OutOfMemoryError("simulated")

    eng.engine.registry.pool.acquire = out_of_memory
    eng.start()
    params = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)

    async def adapted() -> list:
        return [out async for out in eng.generate("second", params, "adapted", adapter="big")]

    async def run() -> list:
        return await asyncio.gather(collect(eng, "first", params, "base"), adapted(), return_exceptions=True)

    try:
        base, adapted = asyncio.run(run())
        assert not isinstance(base, BaseException) and base[-1].finished and base[-1].generated_tokens == 8
        assert isinstance(adapted, ResourceExhausted) and "adapter 'big' could not be loaded into a slot" in str(adapted)
        # The allocator's own text (CUDA's names other processes' PIDs) stays in the log.
        assert "simulated" not in str(adapted)
        assert eng.stats().num_free_blocks == eng.stats().num_total_blocks
    finally:
        eng.shutdown()


def test_an_adapter_load_failure_reaches_its_caller_when_the_same_step_fails_too(tiny_model_dir, tiny_hf_model, tmp_path):
    """A step that raised outside its iteration's work failed every request in a group, but
    the request whose adapter had failed to load in it was in none any more: its caller
    waited for good on an idle server."""
    from tests.adapters.make_adapters import make_adapter

    make_adapter(tiny_hf_model, tmp_path / "big", r=4)
    eng = AsyncEngine(EngineConfig(
        model=str(tiny_model_dir), dtype="float32", adapters_dir=str(tmp_path), max_lora_rank=8, adapter_cache_prefault=False,
    ))

    def out_of_memory(adapter):
        raise torch.OutOfMemoryError("simulated")

    finish = eng.engine.coserve.finish

    def failing_beside_a_failed_load(scheduled, trained):
        if eng.engine.failures:
            raise RuntimeError("boom")
        return finish(scheduled, trained)

    execute, held = eng.engine.runner.execute, []

    def first_waits_for_the_second(scheduled):
        if not held:
            held.append(True)
            wait_for_a_send(eng)
        return execute(scheduled)

    eng.engine.registry.pool.acquire = out_of_memory
    eng.engine.coserve.finish = failing_beside_a_failed_load
    eng.engine.runner.execute = first_waits_for_the_second
    eng.start()
    params = SamplingParams(temperature=0.0, max_new_tokens=64, ignore_eos=True)

    async def adapted() -> list:
        return [out async for out in eng.generate("second", params, "adapted", adapter="big")]

    async def run() -> list:
        # The base request as token ids: it is sent before the adapter's read ends.
        return await asyncio.wait_for(asyncio.gather(collect(eng, [1, 2], params, "base"), adapted(), return_exceptions=True), 60)

    try:
        base, adapted = asyncio.run(run())
        assert isinstance(adapted, ResourceExhausted) and "adapter 'big' could not be loaded into a slot" in str(adapted)
        assert isinstance(base, RuntimeError) and "internal engine error: RuntimeError: boom" in str(base)
    finally:
        eng.shutdown()


def test_a_step_that_fails_after_a_request_finished_in_it_fails_that_request_too(tiny_model_dir):
    """A step that raised outside its iteration's work failed the requests abort_all still
    found in the engine; one that had finished earlier in the same step had left it, and
    its last output was lost with the step's: its caller got nothing and waited for good."""
    from tandem.server.engine.outputs import FinishReason

    eng = AsyncEngine(EngineConfig(model=str(tiny_model_dir), dtype="float32"))
    output, finished = eng.engine._output, []

    def failing_once_a_request_has_finished(seq):
        out = output(seq)  # a finished sequence leaves its group here
        if out.finish_reason == FinishReason.LENGTH and not finished:
            finished.append(out.request_id)
            raise RuntimeError("boom")
        return out

    eng.engine._output = failing_once_a_request_has_finished
    eng.start()

    async def both() -> list:
        short = collect(eng, [1, 2], SamplingParams(temperature=0.0, max_new_tokens=2, ignore_eos=True), "short")
        long = collect(eng, [3, 4], SamplingParams(temperature=0.0, max_new_tokens=100, ignore_eos=True), "long")
        return await asyncio.wait_for(asyncio.gather(short, long, return_exceptions=True), 60)

    try:
        results = asyncio.run(both())
    finally:
        eng.shutdown()
    assert finished == ["short"]
    for result in results:
        assert isinstance(result, RuntimeError) and "internal engine error: RuntimeError: boom" in str(result)


def test_the_model_is_built_on_a_thread_that_ends(tiny_model_dir, monkeypatch):
    """The calling thread runs none of the load's parallel torch ops: OpenMP would keep its
    worker team for as long as the caller lives and slow the engine thread's GEMMs."""
    import threading

    from tandem.server.engine import async_engine

    built_on = []
    from_config = async_engine.Engine.from_config
    monkeypatch.setattr(async_engine.Engine, "from_config", lambda config: built_on.append(threading.current_thread()) or from_config(config))
    with pytest.raises(ValueError, match="max_model_len"):  # an error on that thread reaches the caller
        AsyncEngine(EngineConfig(model=str(tiny_model_dir), dtype="float32", max_model_len=10**9))
    AsyncEngine(EngineConfig(model=str(tiny_model_dir), dtype="float32"))
    assert len(built_on) == 2 and threading.current_thread() not in built_on
    assert not any(thread.is_alive() for thread in built_on)


async def collect_until_error(engine, prompt, params, rid):
    """(outputs read, the error that ended the stream or None)."""
    outs = []
    try:
        async for out in engine.generate(prompt, params, rid):
            outs.append(out)
    except Exception as exc:
        return outs, exc
    return outs, None


def test_a_reader_that_falls_behind_gets_what_piled_up_as_one_output(engine):
    params = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True, logprobs=0)

    async def behind():
        stream = engine.generate("Slow reader", params, "behind")
        first = await stream.__anext__()
        await stream_ended(engine, "behind")  # the engine finishes while nothing is read
        return [first] + [out async for out in stream]

    kept_up = asyncio.run(collect(engine, "Slow reader", params, "kept-up"))
    fell_behind = asyncio.run(behind())
    assert len(fell_behind) == 2
    assert [t for o in fell_behind for t in o.token_ids] == [t for o in kept_up for t in o.token_ids]
    assert "".join(o.text for o in fell_behind) == "".join(o.text for o in kept_up)
    assert [lp.token_id for o in fell_behind for lp in o.logprobs] == [t for o in kept_up for t in o.token_ids]
    assert fell_behind[-1].finished and fell_behind[-1].generated_tokens == 12


def test_stream_interval_sends_that_many_tokens_per_message_after_the_first(tiny_model_dir, engine):
    eng = AsyncEngine(EngineConfig(model=str(tiny_model_dir), dtype="float32", stream_interval=4))
    eng.start()
    try:
        params = SamplingParams(temperature=0.0, max_new_tokens=11, ignore_eos=True, n=2)
        outs = asyncio.run(collect(eng, "Every few tokens", params, "interval"))
        every = asyncio.run(collect(engine, "Every few tokens", params, "every"))
    finally:
        eng.shutdown()
    for index in (0, 1):
        mine = [o for o in outs if o.index == index]
        # First token at once, then every 4, the rest when it ends (a reader that falls
        # behind may get two of these messages as one, never a message between them).
        sent = list(itertools.accumulate(len(o.token_ids) for o in mine))
        assert set(sent) <= {1, 5, 9, 11} and sent[-1] == 11 and sent[0] in (1, 5)
        assert mine[-1].finished and not any(o.finished for o in mine[:-1])
        assert [t for o in mine for t in o.token_ids] == [t for o in every if o.index == index for t in o.token_ids]


def test_held_tokens_reach_the_reader_before_a_failure(tiny_model_dir):
    eng = failing_at(EngineConfig(model=str(tiny_model_dir), dtype="float32", stream_interval=8), call=4)
    try:
        params = SamplingParams(temperature=0.0, max_new_tokens=20, ignore_eos=True)
        outs, error = asyncio.run(collect_until_error(eng, "held", params, "held"))
    finally:
        eng.shutdown()
    assert isinstance(error, RuntimeError) and "boom" in str(error)
    assert sum(len(o.token_ids) for o in outs) == 3  # the first token, then the two held when step 4 failed


def test_a_stream_interval_below_one_is_refused():
    with pytest.raises(ValueError, match="stream_interval must be positive"):
        EngineConfig(stream_interval=0)


def test_increments_join_into_the_whole_completion():
    """What a unary Generate returns and what a reader that fell behind receives."""
    from tandem.server.engine.outputs import FinishReason, RequestOutput, TokenLogprob

    def piece(i: int, logprobs: bool) -> RequestOutput:
        return RequestOutput(
            "r", f"t{i} ", [i, i + 100], finished=i == 3, finish_reason=FinishReason.LENGTH if i == 3 else None,
            prompt_tokens=5, generated_tokens=2 * (i + 1), logprobs=[TokenLogprob(i, -1.0)] if logprobs else None,
            first_scheduled_at=None if i == 0 else 7.0 + i, prompt_logprobs=[TokenLogprob(9, -2.0)] if i == 1 else None,
        )

    pieces = [piece(i, logprobs=i != 2) for i in range(4)]
    whole = RequestOutput.joined(pieces)
    assert (whole.text, whole.token_ids) == ("t0 t1 t2 t3 ", [0, 100, 1, 101, 2, 102, 3, 103])
    assert [lp.token_id for lp in whole.logprobs] == [0, 1, 3] and whole.top_experts is None
    assert whole.first_scheduled_at == 8.0 and whole.prompt_logprobs == [TokenLogprob(9, -2.0)]
    assert (whole.finished, whole.generated_tokens) == (True, 8)
    assert pieces[0].followed_by(pieces[1]) == RequestOutput.joined(pieces[:2])


def test_the_prompts_length_is_checked_before_its_ids(tiny_hf_model, smollm2_tokenizer):
    """Millions of ids fit a 4 MB message: refused by their count before any is read."""
    engine = make_engine(tiny_hf_model, smollm2_tokenizer)
    with pytest.raises(InvalidRequest, match="the maximum context length is"):
        engine.validate([10**9] * 100_000, SamplingParams())


def test_an_abort_before_the_request_is_queued_ends_it_as_soon_as_it_would_be(engine):
    """A drain's end aborts every call in flight, some still reading their adapter or prompt:
    those ran on to the end (its abort found no request), past the drain."""
    engine.abort("early")
    outputs = asyncio.run(collect(engine, [5, 6, 7], SamplingParams(max_new_tokens=50, n=2), "early"))
    assert [(o.index, o.finish_reason.value, o.token_ids) for o in outputs] == [(0, "abort", []), (1, "abort", [])]
    again = asyncio.run(collect(engine, [5, 6, 7], SamplingParams(max_new_tokens=3, ignore_eos=True), "early"))  # once only
    assert again[-1].finish_reason.value == "length" and sum(len(o.token_ids) for o in again) == 3
    assert engine.stats().num_free_blocks == engine.stats().num_total_blocks


@pytest.mark.parametrize("capability, dtype", [((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_dtype_on_a_gpu_is_bfloat16_only_where_it_runs_natively(monkeypatch, capability, dtype):
    """bfloat16 below compute capability 8 (T4, V100) is emulated: auto took it there too."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert EngineConfig(device="cuda", dtype="auto").resolve_dtype() is dtype
