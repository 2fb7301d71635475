"""One generation on behalf of a call, whichever front it came through: admission (ready,
not draining), the call record, a unique engine id, and the engine's stream; and several
prompts' generations as one call's stream (OpenAI's completions take a list of prompts)."""

import asyncio
import dataclasses
import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING

from tandem.server.api.call_record import CallRecord, current_call
from tandem.server.api.serving_state import ServingState
from tandem.server.engine.outputs import RequestOutput
from tandem.server.engine.sampling_params import SamplingParams
from tandem.server.errors import InvalidRequest, excerpt

if TYPE_CHECKING:
    from tandem.server.engine.async_engine import AsyncEngine

# The adapter is logged as the caller gave it, before it is checked: past this length (a
# caller may send megabytes) it is cut, by excerpt(), which marks the cut.
LOGGED_ADAPTER_CHARS = 256


def _logged(adapter: str) -> str:
    return adapter if len(adapter) <= LOGGED_ADAPTER_CHARS else excerpt(adapter, LOGGED_ADAPTER_CHARS)


async def generate(
    state: ServingState, prompt: str | list[int] | list[dict[str, str]], params: SamplingParams, adapter: str,
    mixture: list[tuple[str, float]] | None = None, top_experts: bool = False, cancel_stuck_reader: bool = False,
) -> AsyncIterator[RequestOutput]:
    """The engine's increments for one request (adapter "" = the base model; mixture:
    (adapter, weight) pairs served as one weighted sum instead; top_experts: each token's
    top expert is asked for, which needs a router; cancel_stuck_reader: AsyncEngine.generate's).

    aclosing() makes a cancelled call (client gone, deadline) close the engine's generator
    at once, which aborts the request and frees its KV blocks.
    """
    with state.admit() as engine:
        call = current_call()
        # A mixture shows as its adapters and weights in the log, e.g. "sql*0.7+json*0.3", and
        # as its adapters' names in the metrics (weights there would mint a series per request).
        # The names are the caller's, not checked yet: the metrics show only those the server
        # has loaded (metrics.py), never a made-up one.
        call.adapter = _logged(adapter or "+".join(f"{name}*{weight:g}" for name, weight in mixture or []))
        call.adapters = (adapter,) if adapter else tuple(name for name, _ in mixture or [])
        async with aclosing(_engine_stream(engine, call, prompt, params, adapter, mixture, 0, top_experts, cancel_stuck_reader)) as stream:
            async for out in stream:
                yield out


async def generate_each(
    state: ServingState, prompts: Sequence[str | list[int] | list[dict[str, str]]], params: SamplingParams, adapter: str,
    cancel_stuck_reader: bool = False,
) -> AsyncIterator[RequestOutput]:
    """The generations of several prompts as one stream: prompt p's completion i is index
    p * n + i, as OpenAI numbers them. Nothing is yielded until every prompt has its first
    output, so that a prompt the engine refuses fails the whole call before it streams (a
    400, not an error event after another prompt's tokens); any error ends every prompt."""
    if len(prompts) == 1:
        async with aclosing(generate(state, prompts[0], params, adapter, cancel_stuck_reader=cancel_stuck_reader)) as only:
            async for out in only:
                yield out
        return
    with state.admit() as engine:
        params.check_n()
        _check_batch(engine, len(prompts), params.n)
        call = current_call()
        call.adapter = _logged(adapter)
        call.adapters = (adapter,) if adapter else ()
        streams = [
            _engine_stream(engine, call, prompt, params, adapter, None, p * params.n, cancel_stuck_reader=cancel_stuck_reader)
            for p, prompt in enumerate(prompts)
        ]
        # One read ahead per prompt, no more: a slow reader holds the engine's streams back
        # (and meets their slow-reader limit) as a one-prompt call does.
        reads = {asyncio.ensure_future(anext(stream)): p for p, stream in enumerate(streams)}
        held: list[RequestOutput] = []
        started: set[int] = set()
        try:
            while reads:
                done, _ = await asyncio.wait(reads, return_when=asyncio.FIRST_COMPLETED)
                for read in sorted(done, key=reads.__getitem__):
                    p = reads.pop(read)
                    try:
                        held.append(read.result())
                    except StopAsyncIteration:
                        pass
                    else:
                        reads[asyncio.ensure_future(anext(streams[p]))] = p
                    started.add(p)
                    if len(started) == len(prompts):
                        for out in held:
                            yield out
                        held.clear()
        finally:
            for read in reads:
                read.cancel()
            await asyncio.gather(*reads, return_exceptions=True)
            for stream in streams:
                await stream.aclose()


def _check_batch(engine: "AsyncEngine", prompts: int, n: int) -> None:
    """Refuses a batch the engine could never hold at once (prompts times n completions over
    its requests running plus queued) before any of its requests is made: a 4 MiB body lists
    a million prompts, each an engine stream and a task."""
    limit = engine.engine.capacity
    if prompts * n > limit:
        config = engine.engine.config
        raise InvalidRequest(
            f"{prompts} prompts with n = {n} ask for {prompts * n} completions at once; the server holds at most {limit} "
            f"({config.max_num_seqs} running + {config.max_waiting} queued): send fewer prompts per request"
        )


async def _engine_stream(
    engine: "AsyncEngine", call: CallRecord, prompt: str | list[int] | list[dict[str, str]], params: SamplingParams,
    adapter: str, mixture: list[tuple[str, float]] | None, first_index: int = 0, top_experts: bool = False,
    cancel_stuck_reader: bool = False,
) -> AsyncIterator[RequestOutput]:
    """One engine request of the call, recorded in it; first_index is added to each output's
    completion index (a call's later prompts number their completions on)."""
    # Callers may reuse a request id (retries do); engine ids must stay unique.
    engine_id = f"{call.request_id}-{secrets.token_hex(4)}"
    call.add_engine_request(engine_id, first_index, params.n)
    stream = engine.generate(
        prompt, params, engine_id, adapter=adapter or None, mixture=mixture, top_experts=top_experts, cancel_stuck_reader=cancel_stuck_reader
    )
    async with aclosing(stream):
        async for out in stream:
            if first_index:
                out = dataclasses.replace(out, index=out.index + first_index)
            call.on_output(out)
            yield out
