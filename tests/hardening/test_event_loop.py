"""Issue 11, defect 2: tokenizing and chat templating run off the event loop and inputs are
capped before any work, so no mix of requests keeps health from answering within the
shipped liveness probe's 1 s timeout."""

import asyncio
import threading
import time

from collections.abc import Iterator

import grpc
import pytest

from tandem.client import TandemClient, TandemRpcError
from tests.api.conftest import loopback, start_engine
from tests.api.harness import ServerThread

HUGE = "word " * 780_000  # 3.9 MB, just under the 4 MB message limit


@pytest.fixture(scope="module")
def server(tiny_model_dir) -> Iterator[ServerThread]:
    engine = start_engine(tiny_model_dir)
    thread = ServerThread(loopback(), engine)
    yield thread
    thread.stop()
    engine.shutdown()


@pytest.fixture
def client(server) -> Iterator[TandemClient]:
    with TandemClient(server.target, timeout=60) as c:
        yield c


def test_huge_prompts_neither_stall_health_nor_run(server):
    latencies: list[float] = []
    probe_errors: list[Exception] = []
    codes: list[grpc.StatusCode] = []
    done = threading.Event()

    def probe() -> None:
        try:
            with TandemClient(server.target, max_retries=0) as client:
                while not done.is_set():
                    start = time.monotonic()
                    assert client.health(timeout=1.0) == "SERVING"
                    latencies.append(time.monotonic() - start)
                    time.sleep(0.05)
        except Exception as exc:  # raised, it would end this thread unseen
            probe_errors.append(exc)

    async def longest_stall() -> float:
        """Timed on the server's loop itself, over the whole attack: how late a 10 ms sleep wakes
        (the probe's round trip also counts its own client's time, in this same process)."""
        longest = 0.0
        while not done.is_set():
            start = time.monotonic()
            await asyncio.sleep(0.01)
            longest = max(longest, time.monotonic() - start - 0.01)
        return longest

    def attack(call) -> None:
        with TandemClient(server.target, max_retries=0, timeout=60) as client:
            try:
                call(client)
            except TandemRpcError as exc:
                codes.append(exc.code)

    calls = [lambda c: c.generate(HUGE, max_new_tokens=1)] * 2 + [lambda c: c.tokenize(HUGE)] * 2
    calls.append(lambda c: c.generate(messages=[{"role": "user", "content": HUGE}], max_new_tokens=1))
    stalls = server.submit(longest_stall())
    prober = threading.Thread(target=probe)
    prober.start()
    attackers = [threading.Thread(target=attack, args=(call,)) for call in calls]
    for t in attackers:
        t.start()
    for t in attackers:
        t.join(60)
    time.sleep(0.3)
    done.set()
    prober.join(10)
    stall = stalls.result(10)
    assert not probe_errors, probe_errors
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * len(calls)
    assert stall < 1.0, f"the server's event loop stalled for {stall:.2f} s"
    assert latencies and max(latencies) < 1.0, (
        f"health's round trip, timed by a client sharing this process with the attackers' threads, peaked at "
        f"{max(latencies, default=0):.2f} s over {len(latencies)} probes; the server loop's longest stall was {stall:.2f} s"
    )


def test_the_refusal_says_what_fits(client):
    with pytest.raises(TandemRpcError) as info:
        client.tokenize("x" * 20_000)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.message == (
        "the text is 20000 characters long; no more than 16384 can fit the maximum context length of 512 tokens: shorten it"
    )
