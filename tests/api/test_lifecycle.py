"""Health through start-up and drain, client retries while loading, and `tandem serve`
exiting 0 after SIGTERM with the in-flight request completed."""

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.client import TandemClient, TandemRpcError, connection
from tests.api.conftest import KV_CACHE_BYTES, all_blocks_free, held, loopback, start_engine, wait_until
from tests.api.harness import ServerThread

REPO = Path(__file__).resolve().parents[2]
READY = "tandem.v1.GenerationService"


def test_not_ready_until_the_engine_is_attached_and_clients_retry(tiny_engine, monkeypatch):
    thread = ServerThread(loopback(), None)
    try:
        with TandemClient(thread.target, max_retries=0) as impatient:
            assert impatient.health() == "SERVING"  # alive
            assert impatient.health(READY) == "NOT_SERVING"
            assert impatient.health("tandem.v1.AdaptersService") == "NOT_SERVING"
            with pytest.raises(TandemRpcError) as info:
                impatient.generate("hi", max_new_tokens=1)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE and "loading" in info.value.message
        # Attached once the first attempt has been refused: the retry finds it, whatever the
        # backoff's jitter and the host's speed (a 0.5 s timer raced them).
        delays = connection.retry_delays

        def attach_then_back_off(*args, **kwargs):  # a generator: its body runs at the first retry, not at the call
            thread.attach(tiny_engine)
            yield from delays(*args, **kwargs)

        monkeypatch.setattr(connection, "retry_delays", attach_then_back_off)
        with TandemClient(thread.target, max_retries=8, backoff_seconds=0.2, max_backoff_seconds=0.5) as patient:
            assert patient.generate("hi", max_new_tokens=2).generated_tokens == 2  # retried UNAVAILABLE
            assert patient.health(READY) == "SERVING"
    finally:
        thread.stop()


def _refused(port: int) -> bool:
    """Whether a new connection to the port is refused: nothing listens there."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_drain_finishes_in_flight_work_and_refuses_new_work(tiny_engine):
    """Readiness goes off first, for the health watchers (a client-side balancer); then the
    listener closes, as the HTTP front's does, and the stream in flight runs to its end."""
    thread = ServerThread(loopback(), tiny_engine)
    with TandemClient(thread.target, max_retries=0) as client, grpc.insecure_channel(thread.target) as channel:
        readiness = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=READY))
        assert next(readiness).status == health_pb2.HealthCheckResponse.SERVING
        with held(tiny_engine) as release:  # still in flight, the server still up, for the refusal
            stream = client.stream("Once upon a time", max_new_tokens=300, ignore_eos=True)
            first = next(stream)
            drained = thread.submit(thread.server.drain(grace=30))
            assert next(readiness).status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert wait_until(lambda: _refused(thread.server.port))
            with pytest.raises(TandemRpcError) as info:
                client.generate("hi", max_new_tokens=1)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE and "Connection refused" in info.value.message
            release()
            chunks = [first, *stream]
        assert chunks[-1].finish_reason == "length" and chunks[-1].generated_tokens == 300
    assert drained.result(30) is True
    thread.close()


def test_a_drain_sends_the_clients_connected_to_it_to_another_replica(tiny_engine):
    """gRPC was stopped only at the drain's end, and its stop is what sends HTTP/2 GOAWAY: a
    client on a connection opened before (kube-proxy keeps it to the draining pod) had its
    calls refused there, "shutting down", for the whole grace (30 s by default), instead of
    reconnecting to a replica that serves. Here the replica takes over the draining one's port."""
    draining = ServerThread(loopback(), tiny_engine)
    with TandemClient(draining.target, max_retries=0) as client:
        assert client.tokenize("hi")  # the connection is open
        with held(tiny_engine) as release:  # a generation in flight keeps the drain going
            stream = client.stream("Once upon a time", max_new_tokens=64, ignore_eos=True)
            first = next(stream)
            drained = draining.submit(draining.server.drain(grace=30))
            assert wait_until(lambda: _refused(draining.server.port)), "the draining server still listens"
            replica = ServerThread(replace(loopback(), port=draining.server.port), tiny_engine)
            try:
                assert client.tokenize("hi")  # the same client, reconnected: the draining one refuses it
            finally:
                release()
                replica.stop()
            chunks = [first, *stream]
        assert chunks[-1].finish_reason == "length" and chunks[-1].generated_tokens == 64
    assert drained.result(30) is True
    draining.close()


def test_drain_aborts_what_outlives_the_grace_period(tiny_engine):
    thread = ServerThread(loopback(), tiny_engine)
    with TandemClient(thread.target, max_retries=0) as client, held(tiny_engine):  # only the drain's abort can end it
        stream = client.stream("Once upon a time", max_new_tokens=480, ignore_eos=True)
        next(stream)
        assert thread.run(thread.server.drain(grace=0.1)) is False
        assert list(stream)[-1].finish_reason == "abort"  # a last message, as the proto promises
        assert wait_until(lambda: all_blocks_free(tiny_engine), timeout=30)
    thread.close()


def _read_lines(pipe, lines: "queue.Queue[str]") -> None:
    for line in pipe:
        lines.put(line)


def test_serve_drains_on_sigterm_and_exits_0(tiny_model_dir):
    env = {
        **os.environ,
        "TANDEM_HOST": "127.0.0.1",
        "TANDEM_PORT": "0",
        "TANDEM_METRICS_PORT": "0",
        "TANDEM_HTTP_PORT": "0",
        "TANDEM_KV_CACHE_BYTES": str(KV_CACHE_BYTES),
        "TANDEM_DRAIN_GRACE_SECONDS": "30",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "tandem.server.cli", "serve", "--model", str(tiny_model_dir), "--dtype", "float32"],
        cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_read_lines, args=(process.stderr, lines), daemon=True).start()
    logged = []
    try:
        while not any(entry.get("msg") == "listening" for entry in logged):
            line = lines.get(timeout=60)
            if line.startswith("{"):
                logged.append(json.loads(line))
        port = next(entry["port"] for entry in logged if entry.get("msg") == "listening")
        with TandemClient(f"127.0.0.1:{port}", max_retries=0) as client:
            assert wait_until(lambda: client.health(READY) == "SERVING", timeout=60)
            stream = client.stream("Once upon a time", max_new_tokens=200, ignore_eos=True)
            next(stream)
            process.send_signal(signal.SIGTERM)
            rest = list(stream)
            assert rest[-1].finish_reason == "length" and rest[-1].generated_tokens == 200
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
    while not lines.empty():
        line = lines.get()
        if line.startswith("{"):
            logged.append(json.loads(line))
    requests = [entry for entry in logged if entry.get("msg") == "request"]
    assert any(r["method"] == "GenerateStream" and r["status"] == "OK" and r["generated_tokens"] == 200 for r in requests)


def test_an_engine_thread_that_dies_fails_its_streams_and_takes_the_replica_out(tiny_model_dir):
    """Every stream ends UNAVAILABLE (they hung on a thread that was gone), new calls are
    refused, and liveness goes off so the orchestrator restarts the process (readiness had
    stayed SERVING)."""
    engine = start_engine(tiny_model_dir)
    thread = ServerThread(loopback(), engine)
    try:
        with TandemClient(thread.target, max_retries=0, timeout=30) as client:
            stream = client.stream("Once upon a time", max_new_tokens=300, ignore_eos=True)
            next(stream)

            def broken() -> bool:
                raise RuntimeError("a bug outside any step")

            engine.engine.has_work = broken
            with pytest.raises(TandemRpcError) as info:
                list(stream)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE and "engine stopped on an internal error" in info.value.message
            with pytest.raises(TandemRpcError) as info:
                client.generate("hi", max_new_tokens=1)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE and "must be restarted" in info.value.message
            assert wait_until(lambda: client.health() == "NOT_SERVING") and client.health(READY) == "NOT_SERVING"
            assert _http_health(thread) == 503  # it said 200: a balancer polling HTTP kept sending traffic
    finally:
        thread.stop()
        engine.shutdown()


def _http_health(thread: ServerThread) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{thread.server.http_port}/health", timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code


def test_an_engine_that_died_before_the_server_attached_it_is_not_served(tiny_model_dir):
    """On a GPU the engine thread can fail at its first line, before serve attaches it and
    installs on_failure: the replica said live and ready forever, refusing every call."""
    engine = start_engine(tiny_model_dir)

    def broken() -> bool:
        raise RuntimeError("the device failed at start")

    engine.engine.has_work = broken
    engine.abort("none")  # wakes the idle engine thread, which then fails
    assert wait_until(lambda: engine.failure is not None)
    thread = ServerThread(loopback(), engine)
    try:
        with TandemClient(thread.target, max_retries=0, timeout=30) as client:
            assert wait_until(lambda: client.health() == "NOT_SERVING") and client.health(READY) == "NOT_SERVING"
        assert _http_health(thread) == 503
    finally:
        thread.stop()
        engine.shutdown()
