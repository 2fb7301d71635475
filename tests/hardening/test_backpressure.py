"""Issue 11, defect 8: a stream whose reader stops reading cannot pile up outputs without
bound: once MAX_UNREAD_OUTPUTS are waiting, its request is stopped (its KV blocks freed)
and the stream ends with RESOURCE_EXHAUSTED after what was already delivered."""

import asyncio
import time


from tandem.server.config import EngineConfig
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
