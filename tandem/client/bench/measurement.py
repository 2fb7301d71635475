"""Timing one streamed request: time to first token, the gaps between tokens, end to end.

Definitions follow vLLM's benchmark_serving: TTFT = first token - send; ITL = the gap between
consecutive streamed messages that carry tokens, one sample per message after the first
whatever its number of tokens (a 440 ms stall before a message of 8 tokens is one ITL of
440 ms, not eight of 55 ms); TPOT = (E2E - TTFT) / (output tokens - 1), per token;
E2E = end of stream - send. Tandem's server histogram `inter_token_latency_seconds` instead
splits a message's gap over its k tokens (k samples of g/k), so its mean is a per-token
figure, like TPOT: the two ITLs agree only when every message carries one token.
"""

import asyncio
import time
from dataclasses import dataclass, field

from tandem.client.async_client import AsyncTandemClient
from tandem.client.bench.workload import BenchRequest
from tandem.client.errors import TandemRpcError
from tandem.client.types import StreamChunk

DEADLINE_SLACK_S = 5.0


@dataclass
class RequestRecord:
    """What one request measured; times in seconds. status is "OK", a gRPC status name, or
    "ABORTED" for a stream the server ended with finish reason abort. itls: one gap per
    message with tokens after the first (vLLM's ITL), not per token. send_lag: in the open
    loop, how long after its scheduled send the request started (TTFT and E2E count from the
    start, so a late start hides queueing in the client); None in the closed loop."""

    adapter: str
    sent_at: float
    status: str = "OK"
    error: str = ""
    ttft: float | None = None
    e2e: float | None = None
    itls: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str | None = None
    send_lag: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    @property
    def finished_at(self) -> float:
        return self.sent_at + (self.e2e or 0.0)


async def timed_stream(client: AsyncTandemClient, request: BenchRequest, timeout: float) -> RequestRecord:
    """Sends one streaming request and times it; an RPC error ends in the record, not raised."""
    sent_at = time.perf_counter()
    record = RequestRecord(request.adapter, sent_at)
    last_token_at = sent_at
    try:
        # The gRPC deadline ends the call; the client-side bound only guards against a stuck channel.
        async with asyncio.timeout(timeout + DEADLINE_SLACK_S):
            async for chunk in client.stream(timeout=timeout, **request.stream_kwargs()):
                last_token_at = _observe(record, chunk, sent_at, last_token_at)
    except TandemRpcError as error:
        record.status, record.error = error.code.name, error.message
    except TimeoutError:
        record.status, record.error = "DEADLINE_EXCEEDED", f"the stream did not end within {timeout:g} s (client side)"
    if record.ok and record.finish_reason == "abort":
        # A draining server ends its generations so, with status OK: not a served request.
        record.status, record.error = "ABORTED", "the server aborted the generation (it was stopping)"
    record.e2e = time.perf_counter() - sent_at
    return record


def _observe(record: RequestRecord, chunk: StreamChunk, sent_at: float, last_token_at: float) -> float:
    """Adds one streamed message to the record; returns when its tokens arrived (or the last did).
    A message with tokens after the first adds one ITL sample, its gap since the last one,
    however many tokens it carries (as vLLM's benchmark_serving records a chunk)."""
    now = time.perf_counter()
    new_tokens = len(chunk.token_ids)
    if new_tokens and record.ttft is None:
        record.ttft = now - sent_at
    elif new_tokens:
        record.itls.append(now - last_token_at)
    record.prompt_tokens, record.output_tokens = chunk.prompt_tokens, chunk.generated_tokens
    record.finish_reason = chunk.finish_reason or record.finish_reason
    return now if new_tokens else last_token_at
