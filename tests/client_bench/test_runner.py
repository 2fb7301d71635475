"""The runner's load loops on a virtual clock: the open loop sends at the arrivals' offsets,
the closed loop keeps exactly N requests in flight, and each point of a sweep draws its own
arrivals, whatever points came before it."""

import asyncio
import io
import time

import numpy as np
import pytest

from tandem.client.bench import runner
from tandem.client.bench.arrivals import LoadPoint, send_times
from tandem.client.bench.progress import Progress
from tandem.client.bench.prompts import Prompt
from tandem.client.bench.runner import LoadPlan, _closed_loop, _open_loop, run_point, run_sweep
from tandem.client.bench.workload import BenchRequest, cycle
from tandem.client.types import StreamChunk


class VirtualAsyncio:
    """Stands for the asyncio module in runner: the loop's clock is `now`, which only sleep()
    moves (at once, once the tasks ready to run have run); everything else is asyncio's."""

    def __init__(self):
        self.now = 0.0

    def __getattr__(self, name):
        return getattr(asyncio, name)

    def get_running_loop(self):
        return self

    def time(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        await asyncio.sleep(0)
        self.now += max(0.0, delay)


@pytest.fixture
def clock(monkeypatch) -> VirtualAsyncio:
    virtual = VirtualAsyncio()
    monkeypatch.setattr(runner, "asyncio", virtual)
    return virtual


def open_loop_sends(clock: VirtualAsyncio, plan: LoadPlan, rate: float, rng: np.random.Generator) -> list[float]:
    """When _open_loop sent each request, on the virtual clock."""
    sent: list[float] = []

    async def send(scheduled: float | None = None) -> None:
        sent.append(clock.now)

    async def main() -> None:
        await asyncio.gather(*await _open_loop(send, plan, rate, rng))

    asyncio.run(main())
    return sent


def test_open_loop_sends_at_the_arrival_offsets(clock):
    """Each send at its gamma arrival time, not all at once nor one per tick."""
    plan = LoadPlan([LoadPoint(rate=4.0)], num_requests=50, burstiness=0.5)
    sent = open_loop_sends(clock, plan, 4.0, np.random.default_rng(3))
    expected = send_times(4.0, 50, np.random.default_rng(3), 0.5)
    assert len(sent) == 50
    assert sent == pytest.approx(list(expected), abs=1e-9)
    assert sent[-1] > 5  # 49 gaps of 0.25 s on average: spread out, not a burst


def test_open_loop_bounded_by_duration_sends_only_within_it(clock):
    plan = LoadPlan([LoadPoint(rate=10.0)], duration=3.0)
    sent = open_loop_sends(clock, plan, 10.0, np.random.default_rng(1))
    expected = send_times(10.0, 200, np.random.default_rng(1))
    assert sent == pytest.approx(list(expected[expected < 3.0]), abs=1e-9)


def test_closed_loop_keeps_exactly_n_requests_in_flight():
    """Each send waits until the test lets it end; at every moment the loop must have N in
    flight (fewer only once the last requests are out), and a next one starts as one ends."""
    concurrency, total = 3, 10
    plan = LoadPlan([LoadPoint(concurrency=concurrency)], num_requests=total)
    in_flight: list[asyncio.Future] = []
    observed: list[int] = []
    sends = 0

    async def send() -> None:
        nonlocal sends
        sends += 1
        gate = asyncio.get_running_loop().create_future()
        in_flight.append(gate)
        try:
            await gate
        finally:
            in_flight.remove(gate)

    async def settle() -> None:
        for _ in range(20):
            await asyncio.sleep(0)

    async def main() -> None:
        # A loop that ran its workers one after another would wait here for a request the
        # test never ends: bounded, so that it fails instead of hanging.
        tasks = await asyncio.wait_for(_closed_loop(send, plan, concurrency), 2)
        await settle()
        while in_flight:
            observed.append(len(in_flight))
            in_flight[0].set_result(None)
            await settle()
        await asyncio.wait_for(asyncio.gather(*tasks), 2)

    asyncio.run(main())
    assert sends == total
    assert max(observed) == concurrency
    # N in flight until fewer than N requests are left to send.
    assert observed == [min(concurrency, total - done) for done in range(total)]


def sweep_schedules(monkeypatch, rates: list[float], seed: int = 0, count: int = 30) -> dict[float, list[float]]:
    """The send times of each rate point of a sweep, through run_sweep and the real _open_loop."""
    schedules: dict[float, list[float]] = {}

    async def fake_run_point(client, requests, point, plan, rng, progress):
        virtual = VirtualAsyncio()
        sent: list[float] = []

        async def send(scheduled: float | None = None) -> None:
            sent.append(virtual.now)

        with monkeypatch.context() as patch:
            patch.setattr(runner, "asyncio", virtual)
            await asyncio.gather(*await _open_loop(send, plan, point.rate, rng))
        schedules[point.rate] = sent
        return []

    monkeypatch.setattr(runner, "run_point", fake_run_point)
    plan = LoadPlan([LoadPoint(rate=r) for r in rates], num_requests=count, warmup_requests=0)
    asyncio.run(run_sweep(None, [], plan, seed, None, progress=False))
    return schedules


def test_a_points_arrivals_do_not_depend_on_the_points_before_it(monkeypatch):
    """`--request-rate 1,2` drew its rate-2 arrivals after rate 1's from one generator: other
    times than `--request-rate 2` alone, so one point's numbers changed with the sweep."""
    alone = sweep_schedules(monkeypatch, [2.0])[2.0]
    swept = sweep_schedules(monkeypatch, [1.0, 2.0])
    assert swept[2.0] == alone
    assert sweep_schedules(monkeypatch, [2.0, 1.0])[1.0] == swept[1.0]
    # Reproducible from the seed, another schedule for another seed.
    assert sweep_schedules(monkeypatch, [2.0])[2.0] == alone != sweep_schedules(monkeypatch, [2.0], seed=1)[2.0]
    # Apart from the request content's generator (default_rng(seed) in command._requests).
    assert alone != pytest.approx(list(send_times(2.0, 30, np.random.default_rng(0))))


class BusyClient:
    """Streams one token per request after holding the event loop for `busy` seconds, as a
    client busy on the loop (a large prompt to serialize, a slow progress line) would."""

    def __init__(self, busy: float):
        self.busy = busy

    async def stream(self, **kwargs):
        time.sleep(self.busy)
        yield StreamChunk(text="x", token_ids=[7], finish_reason="length", prompt_tokens=1, generated_tokens=1, logprobs=[])


def test_a_request_that_starts_after_its_scheduled_send_records_how_late():
    """TTFT and E2E count from when a request's task first runs: five requests due at once on
    a loop that each request holds for 50 ms started up to 200 ms late, unseen in the report."""
    requests = cycle([BenchRequest(Prompt(prompt_token_ids=(1,)), "", {"max_new_tokens": 1})])

    def records(point: LoadPoint) -> list:
        plan = LoadPlan([point], num_requests=5)
        progress = Progress(point.label, 5, None, stream=io.StringIO(), enabled=False)
        return asyncio.run(run_point(BusyClient(0.05), requests, point, plan, np.random.default_rng(0), progress))

    lags = sorted(r.send_lag for r in records(LoadPoint(rate=float("inf"))))
    assert len(lags) == 5 and lags[0] >= 0
    assert [later - earlier >= 0.045 for earlier, later in zip(lags, lags[1:])] == [True] * 4
    assert lags[-1] >= 0.18
    # The closed loop has no schedule: a request goes when the last one ends.
    assert [r.send_lag for r in records(LoadPoint(concurrency=1))] == [None] * 5
