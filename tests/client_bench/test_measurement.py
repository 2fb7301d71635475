"""One request's timings from its stream, on a controlled clock: TTFT, ITL one sample per
message (vLLM's), TPOT per token, E2E, and an RPC error kept in the record."""

import asyncio

import grpc
import pytest

from tandem.client.bench import measurement
from tandem.client.bench.prompts import Prompt
from tandem.client.bench.workload import BenchRequest
from tandem.client.errors import TandemRpcError
from tandem.client.types import StreamChunk


def chunk(tokens: int, total: int, finish: str | None = None) -> StreamChunk:
    return StreamChunk(text="x" * tokens, token_ids=[7] * tokens, finish_reason=finish, prompt_tokens=3,
                       generated_tokens=total, logprobs=[])


class FakeClient:
    def __init__(self, chunks: list[StreamChunk], error: TandemRpcError | None = None):
        self.chunks, self.error, self.kwargs = chunks, error, None

    async def stream(self, **kwargs):
        self.kwargs = kwargs
        for c in self.chunks:
            yield c
        if self.error is not None:
            raise self.error


@pytest.fixture
def clock(monkeypatch):
    """perf_counter returns these times in order: the send, one per message, the end."""
    times: list[float] = []

    class Clock:
        @staticmethod
        def perf_counter() -> float:
            return times.pop(0)

    monkeypatch.setattr(measurement, "time", Clock)
    return times


REQUEST = BenchRequest(Prompt(prompt_token_ids=(1, 2, 3)), "alpha", {"max_new_tokens": 4, "ignore_eos": True})


def test_timings_of_a_stream(clock):
    clock.extend([10.0, 10.5, 10.7, 10.8, 10.85, 10.9])
    client = FakeClient([chunk(1, 1), chunk(2, 3), chunk(1, 4), chunk(0, 4, "length")])
    record = asyncio.run(measurement.timed_stream(client, REQUEST, timeout=5))
    assert client.kwargs == {"adapter": "alpha", "prompt_token_ids": [1, 2, 3], "max_new_tokens": 4, "ignore_eos": True, "timeout": 5}
    assert record.ok and record.finish_reason == "length" and (record.prompt_tokens, record.output_tokens) == (3, 4)
    assert record.ttft == pytest.approx(0.5) and record.e2e == pytest.approx(0.9)
    assert record.itls == pytest.approx([0.2, 0.1])  # one gap per message: the 0.2 s one carried two tokens
    assert record.tpot == pytest.approx(0.4 / 3)


def test_itl_is_one_sample_per_message_however_many_tokens_it_carries(clock):
    """vLLM's benchmark_serving records one ITL per streamed chunk: a 440 ms stall before a
    message of 8 tokens is one 440 ms ITL, not eight of 55 ms, which hid stalls from the ITL
    percentiles and weighted multi-token messages eight times. TPOT stays per token."""
    clock.extend([0.0, 0.1, 0.15, 0.59, 0.64, 0.65, 0.7])
    client = FakeClient([chunk(3, 3), chunk(1, 4), chunk(8, 12), chunk(2, 14), chunk(0, 14, "length")])
    record = asyncio.run(measurement.timed_stream(client, REQUEST, timeout=5))
    # The first message's extra tokens end no gap; then 0.05, the 0.44 stall, 0.05.
    assert record.itls == pytest.approx([0.05, 0.44, 0.05])
    assert record.ttft == pytest.approx(0.1) and record.output_tokens == 14
    assert record.tpot == pytest.approx((0.7 - 0.1) / 13)


def test_an_rpc_error_ends_in_the_record(clock):
    clock.extend([0.0, 0.2, 0.3])
    client = FakeClient([chunk(1, 1)], TandemRpcError(grpc.StatusCode.UNAVAILABLE, "draining"))
    record = asyncio.run(measurement.timed_stream(client, REQUEST, timeout=5))
    assert (record.status, record.error, record.ok) == ("UNAVAILABLE", "draining", False)
    assert record.ttft == pytest.approx(0.2) and record.e2e == pytest.approx(0.3)


def test_a_generation_the_server_aborted_is_a_failure_not_a_served_request(clock):
    """A draining server ends its generations with finish reason abort and status OK: counted
    as completed, they lowered E2E and raised throughput and goodput."""
    clock.extend([0.0, 0.2, 0.3, 0.4])
    client = FakeClient([chunk(1, 1), chunk(0, 1, "abort")])
    record = asyncio.run(measurement.timed_stream(client, REQUEST, timeout=5))
    assert (record.status, record.ok, record.finish_reason) == ("ABORTED", False, "abort")
    assert "aborted" in record.error
