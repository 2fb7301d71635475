"""A live server on the tiny model with three small adapters, shared by the bench and locust tests."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tandem.server.engine.async_engine import AsyncEngine
from tests.adapters.make_adapters import make_adapter
from tests.api.conftest import loopback, start_engine
from tests.api.harness import ServerThread

ADAPTERS = ["zeta", "eta", "theta"]


@pytest.fixture(scope="package")
def adapters_dir(tmp_path_factory, tiny_hf_model) -> Path:
    root = tmp_path_factory.mktemp("bench-adapters")
    for seed, name in enumerate(ADAPTERS):
        make_adapter(tiny_hf_model, root / name, r=4, seed=seed)
    return root


@pytest.fixture(scope="package")
def engine(tiny_model_dir, adapters_dir) -> Iterator[AsyncEngine]:
    engine = start_engine(tiny_model_dir, adapters_dir=str(adapters_dir), max_lora_rank=8)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="package")
def server(engine) -> Iterator[ServerThread]:
    thread = ServerThread(loopback(), engine)
    yield thread
    thread.stop()
