"""A live server (gRPC + the OpenAI-compatible HTTP front on one engine, the tiny model)
and clients for it: the real `openai` SDK and Tandem's gRPC client."""

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tandem.client import TandemClient
from tests.adapters.make_adapters import make_adapter
from tests.api.conftest import loopback, start_engine
from tests.api.harness import ServerThread

TOKEN = "http-inference-token"


ADAPTER = "style"


def sse_data(raw: bytes) -> list[str]:
    """The data of each server-sent event of a stream's body."""
    return [event.removeprefix("data: ") for event in raw.decode().split("\n\n") if event]


@pytest.fixture(scope="session")
def tiny_adapters_dir(tmp_path_factory, tiny_hf_model) -> Path:
    root = tmp_path_factory.mktemp("http-adapters")
    make_adapter(tiny_hf_model, root / ADAPTER, r=4, seed=1, b_std=0.5)
    return root


@pytest.fixture(scope="session")
def adapter_engine(tiny_model_dir, tiny_adapters_dir):
    engine = start_engine(tiny_model_dir, adapters_dir=str(tiny_adapters_dir), max_lora_rank=8)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def http_server(adapter_engine) -> Iterator[ServerThread]:
    thread = ServerThread(loopback(), adapter_engine)
    yield thread
    thread.stop()


@pytest.fixture
def oai(http_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{http_server.server.http_port}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def grpc_client(http_server) -> Iterator[TandemClient]:
    with TandemClient(http_server.target, timeout=60) as client:
        yield client


@pytest.fixture(scope="session")
def base_model(adapter_engine) -> str:
    return adapter_engine.info.name
