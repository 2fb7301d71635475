"""UnloadAdapter over a real server: its look at the adapters directory runs off the event loop."""

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tandem.client import TandemClient
from tests.adapters.make_adapters import make_adapter
from tests.api.conftest import loopback, start_engine
from tests.api.harness import ServerThread


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_hf_model, tiny_model_dir) -> Iterator[ServerThread]:
    root = tmp_path_factory.mktemp("unload-adapters")
    make_adapter(tiny_hf_model, root / "alpha", r=4, seed=1)
    engine = start_engine(tiny_model_dir, adapters_dir=str(root), max_lora_rank=8, max_loras=2)
    thread = ServerThread(loopback(), engine)
    yield thread
    thread.stop()
    engine.shutdown()


def test_an_unload_held_on_a_slow_disk_leaves_the_event_loop_free(server, monkeypatch):
    """UnloadAdapter called the registry (which stats the adapters directory, a shared volume
    that may hang) on the event loop: every other call, health checks included, waited."""
    registry = server.engine.engine.registry
    unload = registry.unload
    unloading, release = threading.Event(), threading.Event()

    def slow_unload(name: str, abandoned: threading.Event | None = None) -> None:
        unloading.set()
        release.wait(30)
        unload(name, abandoned)

    monkeypatch.setattr(registry, "unload", slow_unload)
    with TandemClient(server.target, timeout=60) as client, ThreadPoolExecutor(1) as pool:
        try:
            unloaded = pool.submit(client.unload_adapter, "alpha")
            assert unloading.wait(30)
            started = time.monotonic()
            assert client.health(timeout=10) == "SERVING"
            assert [a.name for a in client.list_adapters(timeout=10)] == []
            assert time.monotonic() - started < 5 and not unloaded.done()
        finally:
            release.set()
        unloaded.result(30)
    assert "alpha" not in registry.servable_names()
