"""One generation on behalf of a call, whichever front it came through: admission (ready,
not draining), the call record, a unique engine id, and the engine's stream."""

import secrets
from collections.abc import AsyncIterator
from contextlib import aclosing

from tandem.server.api.call_record import current_call
from tandem.server.api.serving_state import ServingState
from tandem.server.engine.outputs import RequestOutput
from tandem.server.engine.sampling_params import SamplingParams


async def generate(
    state: ServingState, prompt: str | list[int] | list[dict[str, str]], params: SamplingParams, adapter: str,
    mixture: list[tuple[str, float]] | None = None,
) -> AsyncIterator[RequestOutput]:
    """The engine's increments for one request (adapter "" = the base model; mixture:
    (adapter, weight) pairs served as one weighted sum instead).

    aclosing() makes a cancelled call (client gone, deadline) close the engine's generator
    at once, which aborts the request and frees its KV blocks.
    """
    with state.admit() as engine:
        call = current_call()
        # A mixture shows as its adapters and weights in the log, e.g. "sql*0.7+json*0.3", and
        # as its adapters' names in the metrics (weights there would mint a series per request).
        call.adapter = adapter or "+".join(f"{name}*{weight:g}" for name, weight in mixture or [])
        call.adapters = (adapter,) if adapter else tuple(name for name, _ in mixture or [])
        # Callers may reuse a request id (retries do); engine ids must stay unique.
        engine_id = f"{call.request_id}-{secrets.token_hex(4)}"
        call.engine_request_id = engine_id
        stream = engine.generate(prompt, params, engine_id, adapter=adapter or None, mixture=mixture)
        async with aclosing(stream):
            async for out in stream:
                call.on_output(out)
                yield out
