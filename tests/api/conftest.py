"""Servers for the API tests: real build_server(), real AsyncEngine on the tiny model,
loopback ports. Engines are shared across servers to keep model loading to a minimum."""

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tandem.client import TandemClient
from tandem.server.config import EngineConfig, ServerConfig
from tandem.server.engine.async_engine import AsyncEngine
from tests.api.harness import ServerThread

KV_CACHE_BYTES = 16 << 20  # plenty for the tiny model, small enough to allocate at once


def loopback(**overrides) -> ServerConfig:
    return ServerConfig(host="127.0.0.1", port=0, metrics_port=0, http_port=0, log_format="text", **overrides)


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
