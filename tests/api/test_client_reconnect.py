"""A job watch outlives a server restart (jobs resume after one): the client reconnects on
UNAVAILABLE for as long as settings.reconnect_seconds from the first failure after the last
response, however many attempts that takes, and gives up with UNAVAILABLE after it; a call that creates
something is sent again only when it never reached a server. A fake FineTuningService
stands in for the server, so the restart's timing is the test's."""

import asyncio
import math
import socket
import threading
import time
from concurrent import futures

import grpc
import pytest

from tandem.client import AsyncTandemClient, TandemClient
from tandem.client.connection import Attempts, ConnectionSettings
from tandem.client.errors import TandemRpcError
from tandem.server.cli import build_parser, main
from tandem.v1 import finetuning_pb2, finetuning_pb2_grpc

# Longer than the default retry budget (3 retries of at most 0.2, 0.4 and 0.8 s) can wait.
DOWN_SECONDS = 2.5


class Jobs(finetuning_pb2_grpc.FineTuningServiceServicer):
    """Streams one job's state; before the restart it then drops the stream, as a draining server does."""

    def __init__(self, status: str, drop: bool):
        self.status = finetuning_pb2.JobStatus.Value(status)
        self.drop = drop

    def WatchJob(self, request, context):
        yield finetuning_pb2.WatchJobResponse(job=finetuning_pb2.Job(id=request.id, adapter="a", status=self.status))
        if self.drop:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")


class Stopping(finetuning_pb2_grpc.FineTuningServiceServicer):
    """Fails every call with UNAVAILABLE as a server that stops with calls running does
    (grpc's "Cancelling all calls"): the call may have done its work."""

    def __init__(self):
        self.calls: list[str] = []

    def CreateJob(self, request, context):
        self.calls.append("CreateJob")
        context.abort(grpc.StatusCode.UNAVAILABLE, "Cancelling all calls")

    def GetJob(self, request, context):
        self.calls.append("GetJob")
        context.abort(grpc.StatusCode.UNAVAILABLE, "Cancelling all calls")


class Creating(finetuning_pb2_grpc.FineTuningServiceServicer):
    def CreateJob(self, request, context):
        return finetuning_pb2.CreateJobResponse(job=finetuning_pb2.Job(id="ftjob-new", adapter=request.adapter, status=finetuning_pb2.JOB_STATUS_QUEUED))


def serve(port: int, jobs: finetuning_pb2_grpc.FineTuningServiceServicer) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(2))
    finetuning_pb2_grpc.add_FineTuningServiceServicer_to_server(jobs, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server


@pytest.fixture
def port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def restart_later(port: int, first: grpc.Server, servers: list[grpc.Server]) -> threading.Thread:
    def restart() -> None:
        first.stop(0)
        time.sleep(DOWN_SECONDS)
        servers.append(serve(port, Jobs("JOB_STATUS_SUCCEEDED", drop=False)))

    thread = threading.Thread(target=restart, daemon=True)
    thread.start()
    return thread


def test_a_watch_reconnects_across_a_restart(port):
    servers = [serve(port, Jobs("JOB_STATUS_RUNNING", drop=True))]
    try:
        with TandemClient(f"127.0.0.1:{port}", max_backoff_seconds=0.5) as client:
            seen = []
            for job in client.watch_finetune_job("ftjob-x"):
                seen.append(job.status)
                if len(seen) == 1:
                    restart_later(port, servers[0], servers)
        assert seen[0] == "running" and seen[-1] == "succeeded"
    finally:
        for server in servers:
            server.stop(0)


def test_an_async_watch_reconnects_across_a_restart(port):
    servers = [serve(port, Jobs("JOB_STATUS_RUNNING", drop=True))]

    async def watch() -> list[str]:
        seen = []
        async with AsyncTandemClient(f"127.0.0.1:{port}", max_backoff_seconds=0.5) as client:
            async for job in client.watch_finetune_job("ftjob-x"):
                seen.append(job.status)
                if len(seen) == 1:
                    restart_later(port, servers[0], servers)
        return seen

    try:
        seen = asyncio.run(watch())
        assert seen[0] == "running" and seen[-1] == "succeeded"
    finally:
        for server in servers:
            server.stop(0)


def test_a_watch_gives_up_reconnect_seconds_after_it_lost_the_server(port):
    server = serve(port, Jobs("JOB_STATUS_RUNNING", drop=True))
    # Pauses of at most 0.1 s: it gives up once the next would end past reconnect_seconds, so
    # no earlier than 0.9 s after its first failure (with the default 5 s, at any time).
    with TandemClient(f"127.0.0.1:{port}", reconnect_seconds=1.0, max_backoff_seconds=0.1) as client:
        watch = client.watch_finetune_job("ftjob-x")
        next(watch)
        responded = time.monotonic()  # just after the client took its last response
        server.stop(0)
        started = time.monotonic()
        with pytest.raises(TandemRpcError) as caught:
            for _ in watch:
                pass
        gave_up = time.monotonic()
    # 1 s of reconnecting, with room for a slow host (the default is 120 s).
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE and time.monotonic() - started < 15
    # It kept reconnecting for about reconnect_seconds: its 3 retries' pauses (at most 0.1 s
    # each), or giving up at once, end well before.
    assert gave_up - responded >= 0.7


class Restarting(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "the server is shutting down"


def test_a_quiet_watch_has_its_whole_reconnect_allowance_at_its_first_failure():
    """A queued job, or steps slower than reconnect_seconds, send nothing for longer than it:
    the allowance ran from the last response, so the first UNAVAILABLE of a restart ended the watch."""
    attempts = Attempts(ConnectionSettings(reconnect_seconds=0.3, max_backoff_seconds=0.01), None, watch=True)
    attempts.responded()
    time.sleep(0.4)  # a quiet job: no response, no failure
    assert attempts.pause_after(Restarting(), "id") <= 0.01
    time.sleep(0.4)  # failing since: the allowance is spent
    with pytest.raises(TandemRpcError) as caught:
        attempts.pause_after(Restarting(), "id")
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    attempts.responded()  # reconnected: a later failure has the whole allowance again
    time.sleep(0.4)
    assert attempts.pause_after(Restarting(), "id") <= 0.01


def test_a_call_that_creates_something_is_sent_again_only_when_it_never_reached_a_server(port):
    """UNAVAILABLE came also from a server stopping with the call running, after its work:
    CreateJob sent again queued a second job (or said ALREADY_EXISTS about the first)."""
    stopping = Stopping()
    server = serve(port, stopping)
    try:
        with TandemClient(f"127.0.0.1:{port}", max_retries=3, backoff_seconds=0.01) as client:
            with pytest.raises(TandemRpcError):
                client.create_finetune_job("a", training_data="{}")
            with pytest.raises(TandemRpcError):
                client.get_finetune_job("ftjob-x")  # a read: asked again
    finally:
        server.stop(0)
    assert stopping.calls == ["CreateJob"] + ["GetJob"] * 4

    async def create() -> str:  # not listening yet: refused before it was sent, so sent again
        async with AsyncTandemClient(f"127.0.0.1:{port}", max_retries=20, backoff_seconds=0.2, max_backoff_seconds=0.5, timeout=30) as client:
            threading.Timer(0.5, lambda: servers.append(serve(port, Creating()))).start()
            return (await client.create_finetune_job("a", training_data="{}")).id

    servers: list[grpc.Server] = []
    try:
        assert asyncio.run(create()) == "ftjob-new"
    finally:
        for server in servers:
            server.stop(0)


class Holding(finetuning_pb2_grpc.FineTuningServiceServicer):
    """Sends a running job's state, then holds the stream open, as for a job that runs for hours."""

    def WatchJob(self, request, context):
        yield finetuning_pb2.WatchJobResponse(job=finetuning_pb2.Job(id=request.id, adapter="a", status=finetuning_pb2.JOB_STATUS_RUNNING))
        while context.is_active():
            time.sleep(0.05)


def test_finetune_watch_ends_at_its_timeout_and_has_none_by_default(port, capsys, monkeypatch):
    """--timeout was accepted and ignored: `finetune watch ID --timeout 10` watched for hours."""
    server = serve(port, Holding())
    try:
        started = time.monotonic()
        assert main(["finetune", "watch", "ftjob-x", "--target", f"127.0.0.1:{port}", "--timeout", "1"]) == 10 + 4
        assert 1 <= time.monotonic() - started < 15 and "DEADLINE_EXCEEDED" in capsys.readouterr().err  # not hours
        monkeypatch.delenv("TANDEM_TIMEOUT", raising=False)
        assert build_parser("finetune").parse_args(["finetune", "watch", "ftjob-x"]).timeout == math.inf
    finally:
        server.stop(0)


def test_a_server_that_comes_back_is_seen_within_the_clients_backoff(port):
    """The channel's reconnect backoff was gRPC's (1.6x a try up to 120 s), under which every
    call fails at once: a server back after 7 s was seen seconds later whatever the client's
    max_backoff_seconds (up at 45 s, seen at 71 s in a probe: `tandem health --wait` gave up
    on servers that were up)."""
    assert ("grpc.max_reconnect_backoff_ms", 500) in ConnectionSettings(max_backoff_seconds=0.5).options()
    servers: list[grpc.Server] = []
    up: list[float] = []

    def start_later() -> None:
        time.sleep(7.0)
        servers.append(serve(port, Jobs("JOB_STATUS_SUCCEEDED", drop=False)))
        up.append(time.monotonic())

    threading.Thread(target=start_later, daemon=True).start()
    try:
        with TandemClient(f"127.0.0.1:{port}", max_backoff_seconds=0.5, reconnect_seconds=30) as client:
            job = next(iter(client.watch_finetune_job("ftjob-x")))
            seen = time.monotonic()
        assert job.status == "succeeded" and seen - up[0] < 1.5
    finally:
        for server in servers:
            server.stop(0)
