"""Issue 11, defect 8: a stream whose reader stops reading cannot pile up outputs without
bound: once MAX_UNREAD_OUTPUTS are waiting, its request is stopped (its KV blocks freed)
and the stream ends with RESOURCE_EXHAUSTED after what was already delivered."""

import asyncio
import time
from contextlib import aclosing

import pytest

from tandem.server.config import EngineConfig
from tandem.server.engine import async_engine
from tandem.server.engine.async_engine import MAX_UNREAD_OUTPUTS, AsyncEngine
from tandem.server.engine.sampling_params import SamplingParams
from tandem.server.errors import ResourceExhausted
from tests.engine.helpers import stream_ended


def test_a_reader_that_stops_reading_stops_its_request(tiny_model_dir):
    engine = AsyncEngine(EngineConfig(model=str(tiny_model_dir), dtype="float32", kv_cache_bytes=16 << 20))
    engine.start()

    async def main() -> tuple[int, BaseException | None, int, int]:
        stalled = engine.generate("Once upon a time", SamplingParams(temperature=0, max_new_tokens=480, ignore_eos=True), "slow")
        await stalled.__anext__()
        reader = [out async for out in engine.generate("Hi", SamplingParams(max_new_tokens=4), "fast")]
        await stream_ended(engine, "slow")
        running = engine.stats().num_running
        received, error = [1], None
        try:
            async for out in stalled:
                received.append(len(out.token_ids))
        except ResourceExhausted as exc:
            error = exc
        return running, error, received, len(reader)

    try:
        running, error, received, others = asyncio.run(main())
    finally:
        engine.shutdown()
    assert running == 0 and others >= 1
    assert error is not None and str(error).startswith(f"the stream's reader fell {MAX_UNREAD_OUTPUTS + 1} outputs behind")
    # The first token, then everything delivered before the stop, as one output: it piled up unread.
    assert received == [1, MAX_UNREAD_OUTPUTS + 1]
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_the_bound_is_per_completion(tiny_model_dir):
    """Each step delivers an output per completion: n = 4 was stopped after 64 steps of a
    paused reader, a quarter of the slack one completion gets."""
    engine = AsyncEngine(EngineConfig(model=str(tiny_model_dir), dtype="float32", kv_cache_bytes=16 << 20))
    engine.start()
    steps = MAX_UNREAD_OUTPUTS // 2  # 4 x 128 outputs unread: past the bound for one completion

    async def main() -> list[int]:
        params = SamplingParams(temperature=1.0, seed=1, n=4, max_new_tokens=steps, ignore_eos=True)
        paused = engine.generate("Once upon a time", params, "four")
        generated = [0] * 4
        first = await paused.__anext__()
        generated[first.index] += len(first.token_ids)
        deadline = time.monotonic() + 60
        while engine.stats().num_running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        async for out in paused:
            generated[out.index] += len(out.token_ids)
        return generated

    try:
        assert asyncio.run(main()) == [steps] * 4
    finally:
        engine.shutdown()


async def read_then_stick(
    engine: AsyncEngine, request_id: str, first: asyncio.Event, cancel_stuck_reader: bool = False,
    resume: asyncio.Event | None = None,
) -> BaseException | None:
    """Reads a stream's first output, then waits until resume (for good without one): a
    front's send of it to a client that reads nothing, held by flow control. Then reads the
    rest; returns the error that ended the stream, if any."""
    params = SamplingParams(temperature=0, max_new_tokens=400, ignore_eos=True)
    try:
        async with aclosing(engine.generate([5, 6, 7], params, request_id, cancel_stuck_reader=cancel_stuck_reader)) as stream:
            async for _ in stream:
                if not first.is_set():
                    first.set()
                    await (resume or asyncio.Event()).wait()
    except ResourceExhausted as exc:
        return exc
    return None


def small_engine(tiny_model_dir, monkeypatch) -> AsyncEngine:
    """Room for two requests (one running, one queued); a reader is stopped 16 outputs behind."""
    monkeypatch.setattr(async_engine, "MAX_UNREAD_OUTPUTS", 16)
    engine = AsyncEngine(EngineConfig(model=str(tiny_model_dir), dtype="float32", kv_cache_bytes=16 << 20, max_num_seqs=1, max_waiting=1))
    engine.start()
    return engine


def test_a_stopped_stream_frees_its_place_while_its_reader_is_stuck(tiny_model_dir, monkeypatch):
    """The stop freed the request's KV blocks but not its place: the stream counted against
    the capacity until its reader took its end, which a reader stuck on a client that reads
    nothing never does, so 1,152 such clients (the default capacity) made every call fail
    with "the server is at its limit". Here stuck readers hold both places: a new call is served."""
    engine = small_engine(tiny_model_dir, monkeypatch)

    async def main() -> tuple[list, list[bool]]:
        firsts = [asyncio.Event(), asyncio.Event()]
        readers = [asyncio.create_task(read_then_stick(engine, f"stuck{i}", first)) for i, first in enumerate(firsts)]
        for i, first in enumerate(firsts):
            await first.wait()
            await stream_ended(engine, f"stuck{i}")
        outputs = [out async for out in engine.generate([1, 2], SamplingParams(max_new_tokens=2, ignore_eos=True), "next")]
        stuck = [not reader.done() for reader in readers]
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        return outputs, stuck

    try:
        outputs, stuck = asyncio.run(main())
    finally:
        engine.shutdown()
    assert outputs[-1].finished and outputs[-1].generated_tokens == 2
    assert stuck == [True, True]  # freed by the stop itself, not by the readers' end


def test_a_reader_stuck_past_the_stop_is_cancelled_and_its_stream_ends(tiny_model_dir, monkeypatch):
    """A stopped stream's reader that does not come back for its end is cancelled (after
    STUCK_READER_SECONDS), which ends the call it serves: it held its call, and so the front's
    admission and its connection, for as long as its client stayed connected."""
    monkeypatch.setattr(async_engine, "STUCK_READER_SECONDS", 0)
    engine = small_engine(tiny_model_dir, monkeypatch)

    async def main() -> None:
        first = asyncio.Event()
        reader = asyncio.create_task(read_then_stick(engine, "stuck", first, cancel_stuck_reader=True))
        await first.wait()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(reader, 60)

    try:
        asyncio.run(main())
        assert not engine._streams
        stats = engine.stats()
        assert stats.num_running == 0 and stats.num_free_blocks == stats.num_total_blocks
    finally:
        engine.shutdown()


def test_a_stuck_reader_not_to_be_cancelled_reads_the_stop_when_it_comes_back(tiny_model_dir, monkeypatch):
    """gRPC's readers are not cancelled: grpc sends a cancelled handler's client no status,
    so a client that came back to read would wait for its deadline, or for good. Past
    STUCK_READER_SECONDS it still has its stream, and reads the stop's RESOURCE_EXHAUSTED."""
    monkeypatch.setattr(async_engine, "STUCK_READER_SECONDS", 0)
    engine = small_engine(tiny_model_dir, monkeypatch)

    async def main() -> BaseException | None:
        first, resume = asyncio.Event(), asyncio.Event()
        reader = asyncio.create_task(read_then_stick(engine, "stuck", first, resume=resume))
        await first.wait()
        await stream_ended(engine, "stuck")
        await asyncio.sleep(0.2)  # past the (zero) grace, the stuck-reader check has run
        assert not reader.done()
        resume.set()
        return await asyncio.wait_for(reader, 60)

    try:
        error = asyncio.run(main())
    finally:
        engine.shutdown()
    assert isinstance(error, ResourceExhausted)
