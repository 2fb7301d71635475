"""Issue 11, defects 10 and 14: a port in use is an error, not a second server sharing it;
SIGTERM during the model load exits at once; streams cut by a drain end with a final
FINISH_REASON_ABORT message, as the proto promises, not with an error."""

import asyncio
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest

from tandem.client import TandemClient
from tandem.server.api.grpc_server import build_server
from tandem.server.engine.async_engine import AsyncEngine
from tests.api.conftest import all_blocks_free, held, loopback, start_engine, wait_until
from tests.api.harness import ServerThread
from tests.conftest import ipv6_loopback

REPO = Path(__file__).resolve().parents[2]


def test_a_second_server_on_the_same_port_is_an_error():
    first = ServerThread(loopback(), None)
    try:
        async def second() -> None:
            build_server(replace(loopback(), port=first.server.port))

        with pytest.raises(OSError, match=rf"^cannot listen on 127\.0\.0\.1:{first.server.port}: is another process using it\?"):
            asyncio.run(second())

        async def metrics_taken() -> None:  # bound last, after the others served, with no port named
            server = build_server(replace(loopback(), metrics_port=first.server.metrics_port))
            with pytest.raises(OSError, match=rf"^cannot listen for metrics on 127\.0\.0\.1:{first.server.metrics_port}: is another"):
                await server.start()
            socket.create_server(("127.0.0.1", server.http_port)).close()  # its HTTP port was let go

        asyncio.run(metrics_taken())
    finally:
        first.stop()


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Iterator[AsyncEngine]:
    engine = start_engine(tiny_model_dir)
    yield engine
    engine.shutdown()


def test_generations_cut_by_a_drain_end_with_finish_reason_abort(engine):
    """A stream gets a last message with FINISH_REASON_ABORT and a unary Generate its partial
    completion with it, instead of CANCELLED / UNAVAILABLE errors."""
    thread = ServerThread(loopback(), engine)
    # Both run until the drain's abort ends them, from their first tokens on.
    with TandemClient(thread.target, max_retries=0) as client, held(engine, lambda steps: engine.stats().num_running == 2):
        stream = client.stream("Once upon a time", max_new_tokens=480, ignore_eos=True)
        first = next(stream)
        unary = ThreadPoolExecutor(1).submit(client.generate, "A long story", max_new_tokens=480, ignore_eos=True)
        assert wait_until(lambda: engine.stats().num_running == 2)
        assert thread.run(thread.server.drain(grace=0.1)) is False
        chunks = [first, *stream]
        completion = unary.result(10)
        assert wait_until(lambda: all_blocks_free(engine), timeout=30)
    assert chunks[-1].finish_reason == "abort" and 0 < chunks[-1].generated_tokens < 480
    assert completion.finish_reason == "abort" and 0 < completion.generated_tokens < 480
    thread.close()


SLOW_LOAD = """
import sys, time
import tandem.server.engine.async_engine as async_engine

class SlowToLoad(async_engine.AsyncEngine):
    def __init__(self, *args, **kwargs):
        time.sleep(120)  # a model that takes minutes to load
        super().__init__(*args, **kwargs)

async_engine.AsyncEngine = SlowToLoad
from tandem.server.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _serve(script: str, model_dir: Path, *flags: str) -> subprocess.Popen:
    """`tandem serve` through script (an entry point with a part patched) on free loopback ports."""
    env = {**os.environ, "TANDEM_HOST": "127.0.0.1", "TANDEM_PORT": "0", "TANDEM_METRICS_PORT": "0", "TANDEM_HTTP_PORT": "0"}
    command = [sys.executable, "-c", script, "serve", "--model", str(model_dir), "--dtype", "float32", *flags]
    return subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)


def _logged_until(process: subprocess.Popen, message: str) -> list[dict]:
    """The server's JSON log lines, up to the first whose msg is `message`."""
    logged: list[dict] = []
    while not any(entry.get("msg") == message for entry in logged):
        line = process.stderr.readline()
        assert line, f"the server ended before {message!r}"
        if line.startswith("{"):
            logged.append(json.loads(line))
    return logged


def test_sigterm_during_the_model_load_exits_at_once(tiny_model_dir):
    process = _serve(SLOW_LOAD, tiny_model_dir)
    try:
        _logged_until(process, "listening")
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert process.wait(timeout=20) == 0
        assert time.monotonic() - started < 20
        messages = [json.loads(line)["msg"] for line in process.stderr.read().splitlines() if line.startswith("{")]
        assert "signal received while loading the model: exiting without waiting for the load" in messages
        assert "ready" not in messages
    finally:
        process.kill()


SLOW_START = """
import os, signal, sys, time
from pathlib import Path

# As the kernel treats PID 1, which `tandem serve` is in its container: a signal with no
# handler is dropped.
signal.signal(signal.SIGTERM, signal.SIG_IGN)
from tandem.server import cli

installed = cli.server_installed

def slow_imports():
    Path(os.environ["START_MARKER"]).touch()
    time.sleep(120)  # torch's import on a cold node, before serve() installs its drain
    return installed()

cli.server_installed = slow_imports
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigterm_during_start_up_ends_the_server_as_pid_1(tmp_path, monkeypatch):
    """The drain's handler comes after torch's import: until then PID 1 dropped SIGTERM, and a
    pod deleted while starting waited out its grace period for SIGKILL."""
    marker = tmp_path / "starting"
    monkeypatch.setenv("START_MARKER", str(marker))
    process = _serve(SLOW_START, tmp_path)
    try:
        assert wait_until(marker.exists, timeout=30), "the server never reached its imports"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        assert "SIGTERM during start-up" in process.stderr.read()
    finally:
        process.kill()


SLOW_ADAPTER_LOAD = """
import os, sys, time
from pathlib import Path
from tandem.server.adapters import registry

def slow_load(self, name, path="", abandoned=None):
    Path(os.environ["LOAD_STARTED_MARKER"]).touch()  # the call is in its worker thread
    time.sleep(120)  # a LoadAdapter still reading when the drain ends

registry.AdapterRegistry.load = slow_load
from tandem.server.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(("grace", "signals", "status"), [(1, 1, 0), (120, 2, 1)], ids=["drain-ends", "second-signal"])
def test_the_process_ends_with_its_drain_or_a_second_signal_whatever_its_worker_threads_do(
    tiny_model_dir, tmp_path, monkeypatch, grace, signals, status
):
    """A call's worker thread (asyncio.to_thread) kept the process alive after its drain (asyncio.run
    joins them without a bound: SIGKILL at the grace period), and further signals were ignored."""
    marker = tmp_path / "load-started"
    monkeypatch.setenv("LOAD_STARTED_MARKER", str(marker))
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    process = _serve(SLOW_ADAPTER_LOAD, tiny_model_dir, "--adapters-dir", str(adapters), "--drain-grace-seconds", str(grace))
    try:
        port = next(entry["port"] for entry in _logged_until(process, "ready") if entry.get("msg") == "listening")
        with TandemClient(f"127.0.0.1:{port}", max_retries=0, timeout=300) as client, ThreadPoolExecutor(1) as pool:
            call = pool.submit(client.load_adapter, "slow")
            assert wait_until(marker.exists, timeout=30), "LoadAdapter never reached the server's worker thread"
            process.send_signal(signal.SIGTERM)
            if signals == 2:
                # Logged in the same step of the event loop that installs the second signal's
                # handler, before any signal is dispatched: one sent now reaches that handler.
                _logged_until(process, "signal received: draining")
                process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=20) == status
            assert call.exception(timeout=30) is not None
    finally:
        process.kill()


SLOW_ENGINE_STOP = """
import sys, time
from tandem.server.engine import async_engine

def slow_shutdown(self):
    time.sleep(120)  # the engine thread still in a long iteration (a training micro-batch, a checkpoint)

async_engine.AsyncEngine.shutdown = slow_shutdown
from tandem.server.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_second_signal_ends_the_process_while_the_engine_finishes_its_iteration(tiny_model_dir):
    """The engine's shutdown ran on the event loop: the second signal's handler never ran
    until the engine thread ended its work (Kubernetes' SIGKILL at the grace period)."""
    process = _serve(SLOW_ENGINE_STOP, tiny_model_dir, "--drain-grace-seconds", "0")
    try:
        _logged_until(process, "ready")
        process.send_signal(signal.SIGTERM)
        _logged_until(process, "stopped")  # drained: next, and from here on, in the engine's shutdown
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 1
    finally:
        process.kill()


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
def test_an_ipv6_host_serves_every_port_and_a_bracketed_one_is_refused_with_the_form():
    """:: was read as "::" plus ":port" by gRPC (reported as a port in use), and the HTTP
    front opened an IPv4 socket for it."""
    thread = ServerThread(replace(loopback(), host="::1"), None)
    try:
        with TandemClient(f"[::1]:{thread.server.port}", max_retries=0, timeout=10) as client:
            assert client.health() == "SERVING"
        with pytest.raises(urllib.error.HTTPError) as loading:  # served, not ready: 503
            urllib.request.urlopen(f"http://[::1]:{thread.server.http_port}/health", timeout=10)
        assert loading.value.code == 503
    finally:
        thread.stop()
    with pytest.raises(ValueError, match=r"host is an address without brackets \(an IPv6 one as ::1 or ::\), got '\[::\]'"):
        replace(loopback(), host="[::]")


@pytest.mark.skipif(not (ipv6_loopback() and socket.has_dualstack_ipv6()), reason="no dual-stack IPv6 loopback here")
def test_the_ipv6_wildcard_serves_ipv4_and_ipv6_on_every_port():
    """The HTTP front opened an IPv6-only socket for :: (IPv4 callers refused), so the image
    kept 0.0.0.0, whose HTTP and metrics ports no IPv6 caller reaches: on an IPv6-only cluster
    the Gateway and Prometheus got no answer. The metrics server now asks for both families
    too, where it had the system's default (IPv6 only with net.ipv6.bindv6only)."""
    thread = ServerThread(replace(loopback(), host="::"), None)
    try:
        for address in ("127.0.0.1", "::1"):
            for port in (thread.server.port, thread.server.http_port, thread.server.metrics_port):
                socket.create_connection((address, port), timeout=10).close()
            url = f"http://{address}:" if address[0].isdigit() else f"http://[{address}]:"
            with urllib.request.urlopen(f"{url}{thread.server.metrics_port}/metrics", timeout=10) as scrape:
                assert b"tandem:" in scrape.read()
            with pytest.raises(urllib.error.HTTPError) as loading:  # served, not ready: 503
                urllib.request.urlopen(f"{url}{thread.server.http_port}/health", timeout=10)
            assert loading.value.code == 503
    finally:
        thread.stop()


class _NoIPv6Socket(socket.socket):
    """A socket of a kernel booted with ipv6.disable=1: IPv6 ones cannot be made."""

    def __init__(self, family: int = -1, *args, **kwargs):
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        super().__init__(family, *args, **kwargs)


def test_the_ipv6_wildcard_serves_ipv4_on_a_kernel_without_ipv6(monkeypatch):
    """The image listens on ::. Where no IPv6 socket can be made, the HTTP front failed the
    start ("cannot listen for HTTP on :::0"): it and the metrics server take IPv4's wildcard."""
    monkeypatch.setattr(socket, "socket", _NoIPv6Socket)
    monkeypatch.setattr(socket, "has_dualstack_ipv6", lambda: False)
    thread = ServerThread(replace(loopback(), host="::"), None)
    try:
        for port in (thread.server.http_port, thread.server.metrics_port):
            socket.create_connection(("127.0.0.1", port), timeout=10).close()
    finally:
        thread.stop()
