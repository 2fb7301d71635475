"""Servers for the API tests: real build_server(), real AsyncEngine on the tiny model,
loopback ports. Engines are shared across servers to keep model loading to a minimum."""

import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tandem.client import TandemClient
from tandem.server.config import EngineConfig, ServerConfig
from tandem.server.engine.async_engine import AsyncEngine
from tests.api.harness import ServerThread

KV_CACHE_BYTES = 16 << 20  # plenty for the tiny model, small enough to allocate at once


def loopback(**overrides) -> ServerConfig:
    return ServerConfig(**{"host": "127.0.0.1", "port": 0, "metrics_port": 0, "http_port": 0, "log_format": "text", **overrides})


def start_engine(model_dir: Path, **overrides) -> AsyncEngine:
    overrides.setdefault("adapter_cache_prefault", False)  # 2 GiB touched per test engine: too much
    engine = AsyncEngine(EngineConfig(model=str(model_dir), dtype="float32", kv_cache_bytes=KV_CACHE_BYTES, **overrides))
    engine.start()
    return engine


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir) -> Iterator[AsyncEngine]:
    engine = start_engine(tiny_model_dir)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def server(tiny_engine) -> Iterator[ServerThread]:
    thread = ServerThread(loopback(), tiny_engine)
    yield thread
    thread.stop()


@pytest.fixture
def client(server) -> Iterator[TandemClient]:
    with TandemClient(server.target, timeout=60) as c:
        yield c


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def all_blocks_free(engine: AsyncEngine) -> bool:
    stats = engine.stats()
    return stats.num_free_blocks == stats.num_total_blocks and stats.num_running == 0 and stats.num_waiting == 0


@contextmanager
def held(engine: AsyncEngine, once: Callable[[int], bool] = lambda steps: steps >= 1) -> Iterator[Callable[[], None]]:
    """Holds the engine's generations from the first step on where once(steps taken) is true,
    until the release it yields is called (or the block ends): its thread then only takes
    commands (new requests, aborts), so no generation ends on its own, whatever the host's
    speed, while an abort still ends one at once."""
    step = engine.engine.step
    steps = 0
    holding = False
    released = threading.Event()

    def held_step() -> list:
        nonlocal steps, holding
        holding = holding or once(steps)
        if released.is_set() or not holding:
            steps += 1
            return step()
        engine._wake.wait()  # set by every command the engine thread is sent
        engine._wake.clear()
        return []  # the thread takes its commands, then comes back here while work is left

    def release() -> None:
        released.set()
        engine._wake.set()

    engine.engine.step = held_step
    try:
        yield release
    finally:
        del engine.engine.step
        release()


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all EC P-256."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("certs")
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *key, "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.pem", "-days", "1", "-subj", "/CN=tandem-test-ca")
    for name, extension in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", *key, "-keyout", f"{d}/{name}.key", "-out", f"{d}/{name}.csr", "-subj", f"/CN={name}")
        (d / f"{name}.ext").write_text(extension + "\n")
        _openssl(
            "x509", "-req", "-in", f"{d}/{name}.csr", "-CA", f"{d}/ca.pem", "-CAkey", f"{d}/ca.key",
            "-CAcreateserial", "-out", f"{d}/{name}.pem", "-days", "1", "-extfile", f"{d}/{name}.ext",
        )
    return d
