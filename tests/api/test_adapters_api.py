"""Adapters over a real server: load, list, unload, generate with mixed adapters (unary and
streamed, fewer device slots than adapters), refusals as status codes, metrics, admin role."""

import asyncio
import re
import shutil
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tandem.client import AsyncTandemClient, TandemClient, TandemRpcError
from tandem.server.adapters.peft_format import content_hash
from tandem.server.engine.async_engine import AsyncEngine
from tandem.server.engine.sampling_params import SamplingParams
from tests.adapters.make_adapters import ALL_LINEAR, make_adapter
from tests.api.conftest import all_blocks_free, loopback, start_engine, wait_until
from tests.api.harness import ServerThread
from tests.engine.helpers import make_engine

MAX_RANK = 16
INFERENCE_TOKEN = "inference-token-51d0"
ADMIN_TOKEN = "admin-token-93ce"
PROMPTS = [[101, 2020, 345, 7777, 12], [5000, 42, 42, 9001, 300, 17, 8], [31, 4100, 220]]
MIXED = ["", "alpha", "beta", "gamma"]  # "" = the base model


def rpc_error(call) -> TandemRpcError:
    with pytest.raises(TandemRpcError) as info:
        call()
    return info.value


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory, tiny_hf_model) -> Path:
    root = tmp_path_factory.mktemp("api-adapters")
    make_adapter(tiny_hf_model, root / "alpha", r=4, seed=1)
    make_adapter(tiny_hf_model, root / "beta", r=8, target_modules=ALL_LINEAR, seed=2)
    make_adapter(tiny_hf_model, root / "gamma", r=2, target_modules=["q_proj", "v_proj"], use_rslora=True, seed=3)
    make_adapter(tiny_hf_model, root / "huge", r=32, target_modules=["q_proj"], seed=4)
    return root


@pytest.fixture(scope="module")
def lora_engine(tiny_model_dir, adapters_dir) -> Iterator[AsyncEngine]:
    """Two device slots for three adapters: mixed batches evict."""
    engine = start_engine(tiny_model_dir, adapters_dir=str(adapters_dir), max_lora_rank=MAX_RANK, max_loras=2)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def lora_server(lora_engine) -> Iterator[ServerThread]:
    thread = ServerThread(loopback(), lora_engine)
    yield thread
    thread.stop()


@pytest.fixture
def client(lora_server) -> Iterator[TandemClient]:
    with TandemClient(lora_server.target, timeout=60) as c:
        yield c


def idle(engine: AsyncEngine) -> bool:
    return all_blocks_free(engine) and engine.engine.registry._in_use == {}


def test_load_and_list(client, adapters_dir):
    info = client.load_adapter("alpha")
    assert (info.name, info.rank, info.target_modules) == ("alpha", 4, ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert info.tier in ("host", "device") and info.in_use == 0
    assert info.content_hash == content_hash(adapters_dir / "alpha")
    assert info.path == "alpha"  # relative to the adapters directory: the server's layout stays private
    beta = client.load_adapter("beta")
    assert (beta.rank, beta.target_modules) == (8, list(ALL_LINEAR))
    listed = {a.name: a for a in client.list_adapters()}
    assert {"alpha", "beta"} <= set(listed)
    assert listed["alpha"].content_hash == info.content_hash and listed["alpha"].rank == 4
    assert listed["beta"].content_hash == content_hash(adapters_dir / "beta")
    assert content_hash(adapters_dir / "alpha") != content_hash(adapters_dir / "beta")
    client.generate(prompt_token_ids=PROMPTS[0], adapter="alpha", max_new_tokens=2)
    assert {a.name: a.tier for a in client.list_adapters()}["alpha"] == "device"


def test_mixed_adapters_concurrently(client, lora_server, lora_engine, tiny_hf_model, smollm2_tokenizer, adapters_dir):
    """Unary and streamed requests for different adapters in one batch give each request's
    tokens alone; alone on the server is also what an in-process Engine gives."""
    options = dict(max_new_tokens=10, ignore_eos=True)
    jobs = [(p, a) for p in PROMPTS for a in MIXED]
    alone = [client.generate(prompt_token_ids=p, adapter=a, **options).token_ids for p, a in jobs]
    for i in range(0, len(jobs), len(MIXED)):
        assert len({tuple(ids) for ids in alone[i : i + len(MIXED)]}) == len(MIXED)  # adapters matter

    engine = make_engine(
        tiny_hf_model, smollm2_tokenizer, adapters_dir=str(adapters_dir), max_lora_rank=MAX_RANK, kv_cache_bytes=8 << 20
    )
    engine.add_request("direct", PROMPTS[1], SamplingParams(temperature=0.0, **options), engine.registry.get("beta"))
    direct = []
    while engine.has_work():
        direct += [t for out in engine.step() for t in out.token_ids]
    assert direct == alone[jobs.index((PROMPTS[1], "beta"))]

    async def together():
        async with AsyncTandemClient(lora_server.target, timeout=60) as aclient:
            async def streamed(prompt, adapter):
                return [c async for c in aclient.stream(prompt_token_ids=prompt, adapter=adapter, **options)]

            unary = [aclient.generate(prompt_token_ids=p, adapter=a, **options) for p, a in jobs]
            streams = [streamed(p, a) for p, a in jobs]
            return await asyncio.gather(*unary, *streams)

    evictions = lora_engine.engine.registry.slot_stats().evictions
    results = asyncio.run(together())
    unary, streams = results[: len(jobs)], results[len(jobs) :]
    for single, batched, chunks in zip(alone, unary, streams):
        assert batched.token_ids == single
        assert [t for c in chunks for t in c.token_ids] == single
        assert chunks[-1].finish_reason == "length"
    assert lora_engine.engine.registry.slot_stats().evictions > evictions
    assert wait_until(lambda: idle(lora_engine))


def test_unload(client):
    client.load_adapter("gamma")
    assert "gamma" in {a.name for a in client.list_adapters()}
    client.unload_adapter("gamma")
    assert "gamma" not in {a.name for a in client.list_adapters()}
    error = rpc_error(lambda: client.unload_adapter("gamma"))
    assert error.code == grpc.StatusCode.NOT_FOUND and "adapter 'gamma' is not loaded" in str(error)


def test_refusals_become_status_codes(client, lora_engine):
    reason = "adapter 'huge' has rank 32 on model.layers.0.self_attn.q_proj, the server's maximum is 16 (--max-lora-rank)"
    error = rpc_error(lambda: client.load_adapter("huge"))
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION and reason in str(error)
    error = rpc_error(lambda: client.generate(prompt_token_ids=PROMPTS[0], adapter="huge", max_new_tokens=2))
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION and "--max-lora-rank" in str(error)
    assert "huge" not in {a.name for a in client.list_adapters()}
    error = rpc_error(lambda: client.generate(prompt_token_ids=PROMPTS[0], adapter="nobody", max_new_tokens=2))
    assert error.code == grpc.StatusCode.NOT_FOUND and "adapter 'nobody' not found" in str(error)
    error = rpc_error(lambda: client.load_adapter("escape", path="../../etc"))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and "outside the adapters directory" in str(error)
    error = rpc_error(lambda: client.load_adapter("a/b"))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    # The server still serves adapters and the base model.
    assert client.generate(prompt_token_ids=PROMPTS[0], adapter="alpha", max_new_tokens=3).generated_tokens == 3
    assert client.generate(prompt_token_ids=PROMPTS[0], max_new_tokens=3).generated_tokens == 3
    assert wait_until(lambda: idle(lora_engine))


def test_metrics_show_adapter_slots(client, lora_server):
    client.load_adapter("alpha")
    client.generate(prompt_token_ids=PROMPTS[2], adapter="alpha", max_new_tokens=2)
    url = f"http://127.0.0.1:{lora_server.server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    slots = re.search(r'^tandem:lora_slots_in_use\{model_name="[^"]*"\} (\S+)$', text, re.MULTILINE)
    assert slots is not None and 1 <= float(slots[1]) <= 2
    loads = re.search(r'^tandem:lora_adapter_loads_total\{model_name="[^"]*"\} (\S+)$', text, re.MULTILINE)
    assert loads is not None and float(loads[1]) >= 1
    assert re.search(r'^tandem:lora_requests_info\{max_lora="2",', text, re.MULTILINE)
    assert re.search(r'^tandem:lora_adapter_evictions_total\{model_name="[^"]*"\} \S+$', text, re.MULTILINE)
    slot_loads = re.search(r'^tandem:lora_slot_loads_total\{model_name="[^"]*"\} (\S+)$', text, re.MULTILINE)
    assert slot_loads is not None and float(slot_loads[1]) >= 1
    load_seconds = re.search(r'^tandem:lora_slot_load_seconds_total\{model_name="[^"]*"\} (\S+)$', text, re.MULTILINE)
    # Copying a tiny adapter into a slot takes well under a second (not a clock difference gone wrong).
    assert load_seconds is not None and 0 < float(load_seconds[1]) < 5
    assert re.search(r'^tandem:lora_host_evictions_total\{model_name="[^"]*"\} \S+$', text, re.MULTILINE)


def _lora_requests_info(server: ServerThread) -> dict[str, str]:
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "tandem:lora_requests_info"]
    (sample,) = family.samples
    return sample.labels


def test_a_call_waiting_on_a_made_up_adapter_is_not_in_lora_requests_info(client, lora_server, lora_engine, monkeypatch):
    """The caller's names were exported before the engine checked them: calls held waiting
    on made-up names put any text, of any length, in the label values (a series each). A
    loaded adapter's waiting call still shows."""
    client.load_adapter("alpha")
    registry = lora_engine.engine.registry
    release = threading.Event()
    read = registry.get

    def slow_read(name: str):  # the engine reads the named adapter off the loop: held here
        release.wait(30)
        return read(name)

    monkeypatch.setattr(registry, "get", slow_read)
    with ThreadPoolExecutor(2) as pool:
        try:
            calls = {
                name: pool.submit(lambda n=name: client.generate(prompt_token_ids=PROMPTS[0], adapter=n, max_new_tokens=2))
                for name in ("alpha", "made-up-" + "x" * 200)
            }
            assert wait_until(lambda: len(lora_server.server.state.lora_activity().waiting) == 2)
            labels = _lora_requests_info(lora_server)
            assert (labels["waiting_lora_adapters"], labels["running_lora_adapters"]) == ("alpha", "")
        finally:
            release.set()
        assert calls["alpha"].result(60).generated_tokens == 2
        with pytest.raises(TandemRpcError) as unknown:
            calls["made-up-" + "x" * 200].result(60)
        assert unknown.value.code == grpc.StatusCode.NOT_FOUND
    assert wait_until(lambda: idle(lora_engine))


def test_an_adapter_name_with_a_comma_is_refused(client, adapters_dir, tiny_hf_model):
    """lora_requests_info lists names comma-separated: an adapter "x,beta" in flight read, to
    the Gateway API Inference Extension, as this replica serving beta. Refused even when such
    a folder exists."""
    make_adapter(tiny_hf_model, adapters_dir / "x,beta", r=4, seed=5)
    try:
        for call in (
            lambda: client.generate(prompt_token_ids=PROMPTS[0], adapter="x,beta", max_new_tokens=2),
            lambda: client.generate(prompt_token_ids=PROMPTS[0], adapter={"alpha": 0.5, "x,beta": 0.5}, max_new_tokens=2),
            lambda: client.load_adapter("x,beta"),
        ):
            error = rpc_error(call)
            assert error.code == grpc.StatusCode.INVALID_ARGUMENT and "must not contain ','" in str(error)
        assert "x,beta" not in {a.name for a in client.list_adapters()}
    finally:
        shutil.rmtree(adapters_dir / "x,beta")


@pytest.fixture(scope="module")
def auth_server(lora_engine, tmp_path_factory) -> Iterator[ServerThread]:
    tokens = tmp_path_factory.mktemp("adapter-auth") / "tokens"
    tokens.write_text(f"inference {INFERENCE_TOKEN}\nadmin {ADMIN_TOKEN}\n")
    thread = ServerThread(loopback(auth_tokens_file=str(tokens)), lora_engine)
    yield thread
    thread.stop()


def test_loading_adapters_needs_the_admin_role(auth_server):
    with TandemClient(auth_server.target, token=INFERENCE_TOKEN) as user:
        assert rpc_error(lambda: user.load_adapter("beta")).code == grpc.StatusCode.PERMISSION_DENIED
        assert rpc_error(lambda: user.unload_adapter("beta")).code == grpc.StatusCode.PERMISSION_DENIED
        assert user.generate(prompt_token_ids=PROMPTS[0], adapter="beta", max_new_tokens=2).generated_tokens == 2
        assert "beta" in {a.name for a in user.list_adapters()}
        assert {a.path for a in user.list_adapters()} == {""}  # where adapters live is for admins
    with TandemClient(auth_server.target, token=ADMIN_TOKEN) as admin:
        assert admin.load_adapter("beta").name == "beta"
        assert {a.name: a.path for a in admin.list_adapters()}["beta"] == "beta"
    with TandemClient(auth_server.target) as anonymous:
        assert rpc_error(lambda: anonymous.load_adapter("beta")).code == grpc.StatusCode.UNAUTHENTICATED
