"""Routers over a real server: loaded and listed with their experts, named in `adapter` beside
plain-adapter and base requests, and refused with the right status code and reason."""

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import re
import urllib.request

import grpc
import pytest

from tandem.client import TandemClient
from tandem.server.adapters.router_format import router_config, write_router
from tests.adapters.make_adapters import ALL_LINEAR, make_adapter
from tests.adapters.test_routers import random_gates
from tests.api.conftest import loopback, start_engine
from tests.api.harness import ServerThread
from tests.api.test_adapters_api import rpc_error

PROMPT = [101, 2020, 345, 7777, 12]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_hf_model, tiny_model_dir) -> Iterator[ServerThread]:
    root: Path = tmp_path_factory.mktemp("router-api")
    for seed, name in enumerate(["e0", "e1", "e2"]):
        make_adapter(tiny_hf_model, root / name, r=4, target_modules=ALL_LINEAR, seed=seed, b_std=0.2)
    make_adapter(tiny_hf_model, root / "qv", r=4, target_modules=["q_proj", "v_proj"], seed=5)
    write_router(root / "mix", router_config(["e0", "e1", "e2"]), random_gates(tiny_hf_model, 3, seed=1))
    write_router(root / "unknown", router_config(["e0", "nope"]), random_gates(tiny_hf_model, 2, seed=1))
    write_router(root / "partial", router_config(["e0", "qv"]), random_gates(tiny_hf_model, 2, seed=1))
    engine = start_engine(tiny_model_dir, adapters_dir=str(root), max_lora_rank=8, max_loras=4)
    thread = ServerThread(loopback(), engine)
    yield thread
    thread.stop()
    engine.shutdown()


@pytest.fixture
def client(server) -> Iterator[TandemClient]:
    with TandemClient(server.target, timeout=60) as c:
        yield c


def test_router_is_loaded_listed_and_served_beside_plain_requests(client):
    info = client.load_adapter("mix")
    assert info.experts == ["e0", "e1", "e2"] and info.rank == 4
    assert {a.name: a.experts for a in client.list_adapters()}["mix"] == ["e0", "e1", "e2"]
    alone = client.generate(prompt_token_ids=PROMPT, adapter="mix", max_new_tokens=6, temperature=0.0, ignore_eos=True)
    with ThreadPoolExecutor(3) as pool:
        calls = [
            pool.submit(client.generate, prompt_token_ids=PROMPT, adapter=name, max_new_tokens=6, temperature=0.0, ignore_eos=True)
            for name in ["mix", "e1", ""]
        ]
        mixed, plain, base = [c.result() for c in calls]
    assert mixed.token_ids == alone.token_ids and len(alone.token_ids) == 6
    assert len(plain.token_ids) == len(base.token_ids) == 6
    assert alone.top_experts == [] and plain.top_experts == []  # not asked for / not a router


def test_top_experts_come_back_when_asked(client):
    options = dict(prompt_token_ids=PROMPT, adapter="mix", max_new_tokens=5, temperature=0.0, ignore_eos=True, return_top_experts=True)
    unary = client.generate(**options)
    streamed = [e for chunk in client.stream(**options) for e in chunk.top_experts]
    assert len(unary.top_experts) == 5 and set(unary.top_experts) <= {"e0", "e1", "e2"}
    assert streamed == unary.top_experts


@pytest.mark.parametrize("target, named", [
    (dict(adapter="e1"), "'e1' is an adapter"), (dict(adapter=""), "the base model"), (dict(adapter={"e0": 0.5, "e1": 0.5}), "a mixture"),
])
def test_top_experts_asked_of_what_is_no_router_is_refused(client, target, named):
    """It answered an empty list, which reads as "no token had an expert"."""
    for call in (client.generate, lambda **kw: list(client.stream(**kw))):
        error = rpc_error(lambda: call(prompt_token_ids=PROMPT, max_new_tokens=2, return_top_experts=True, **target))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT and f"return_top_experts needs a router in adapter, and {named}" in str(error)


def test_metrics_count_routed_tokens_by_top_expert(client, server):
    client.generate(prompt_token_ids=PROMPT, adapter="mix", max_new_tokens=3, temperature=0.0, ignore_eos=True)
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10).read().decode()
    counts = re.findall(r'^tandem:router_expert_tokens_total\{.*expert="(e\d)".*router="mix"\} (\S+)$', text, re.MULTILINE)
    assert counts and sum(float(c) for _, c in counts) >= len(PROMPT) + 2
    # An unloaded router's series go (they stayed in every scrape for good), and come back with it.
    client.unload_adapter("mix")
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10).read().decode()
        assert 'router="mix"' not in text
    finally:
        client.load_adapter("mix")
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10).read().decode()
    assert re.findall(r'^tandem:router_expert_tokens_total\{.*router="mix"\} (\S+)$', text, re.MULTILINE) == [c for _, c in counts]


@pytest.mark.parametrize(
    "name, code, reason",
    [
        ("unknown", grpc.StatusCode.NOT_FOUND, "router 'unknown' uses expert 'nope'"),
        ("partial", grpc.StatusCode.FAILED_PRECONDITION, "which its expert 'qv' does not adapt"),
    ],
)
def test_mismatched_router_is_refused_with_its_reason(client, name, code, reason):
    error = rpc_error(lambda: client.generate(prompt_token_ids=PROMPT, adapter=name, max_new_tokens=2))
    assert error.code == code and reason in str(error)
    error = rpc_error(lambda: client.load_adapter(name))
    assert error.code == code and reason in str(error)
