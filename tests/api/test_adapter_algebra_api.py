"""Adapter algebra over a real server: a per-request mixture (unary and streamed) beside plain
and base requests, MergeAdapters and CompressAdapter published and served, ListAdapters'
format and ratio, refusals as status codes with the reason, and the admin role."""

import json
import queue
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format

from tandem.client import TandemClient
from tandem.client.convert import Call, merge_result
from tandem.server.adapters import registry as registry_module
from tandem.server.api.status_mapping import status_for
from tandem.server.errors import FailedPrecondition
from tandem.v1 import generation_pb2, generation_pb2_grpc
from tandem.v1.adapters_pb2 import MergeAdaptersRequest
from tandem.v1.adapters_pb2_grpc import AdaptersServiceStub
from tests.adapters.make_adapters import ALL_LINEAR, make_adapter
from tests.api.conftest import loopback, start_engine
from tests.api.harness import ServerThread
from tests.api.test_adapters_api import rpc_error

PROMPT = [101, 2020, 345, 7777, 12]
ADMIN_TOKEN = "algebra-admin-5e1"
INFERENCE_TOKEN = "algebra-user-77a"
GREEDY = dict(prompt_token_ids=PROMPT, max_new_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_hf_model, tiny_model_dir) -> Iterator[ServerThread]:
    root: Path = tmp_path_factory.mktemp("algebra-api")
    for seed, name in enumerate(["a0", "a1"]):
        make_adapter(tiny_hf_model, root / name, r=4, target_modules=ALL_LINEAR, seed=30 + seed, b_std=0.3)
    make_adapter(tiny_hf_model, root / "qv", r=4, target_modules=["q_proj", "v_proj"], seed=33)
    tokens = tmp_path_factory.mktemp("algebra-auth") / "tokens"
    tokens.write_text(f"inference {INFERENCE_TOKEN}\nadmin {ADMIN_TOKEN}\n")
    engine = start_engine(tiny_model_dir, adapters_dir=str(root), max_lora_rank=8, max_loras=4)
    thread = ServerThread(loopback(auth_tokens_file=str(tokens)), engine)
    yield thread
    thread.stop()
    engine.shutdown()


@pytest.fixture
def admin(server) -> Iterator[TandemClient]:
    with TandemClient(server.target, token=ADMIN_TOKEN, timeout=120) as c:
        yield c


def test_a_mixture_is_served_beside_plain_and_base_requests(admin):
    alone = admin.generate(adapter={"a0": 0.6, "a1": 0.4}, **GREEDY)
    streamed = [t for chunk in admin.stream(adapter={"a0": 0.6, "a1": 0.4}, **GREEDY) for t in chunk.token_ids]
    with ThreadPoolExecutor(3) as pool:
        calls = [pool.submit(admin.generate, adapter=a, **GREEDY) for a in ({"a0": 0.6, "a1": 0.4}, "a1", "")]
        mixed, plain, base = [c.result() for c in calls]
    assert mixed.token_ids == alone.token_ids == streamed and len(alone.token_ids) == 6
    # One member at weight 1 is that adapter.
    assert admin.generate(adapter={"a1": 1.0}, **GREEDY).token_ids == plain.token_ids
    assert len(base.token_ids) == 6


def test_a_mixture_in_flight_shows_its_adapters_names_in_the_metrics(server, admin):
    """Its weights were part of the label value: any caller could mint a series per request."""
    stream = admin.stream(adapter={"a0": 0.123456, "a1": 0.654321}, **(GREEDY | {"max_new_tokens": 200}))
    next(stream)
    assert sorted(server.server.state.lora_activity().running) == ["a0", "a1"]
    stream.close()


def to_the_end(call, events: queue.Queue, finished: threading.Event, ended: list):
    """call, putting the event its caller's going sets (its last argument) on events,
    appending what it raised (or returned) to ended, and setting finished once it has
    returned or raised."""

    def watched(*args, **kwargs):
        events.put(args[-1])
        try:
            result = call(*args, **kwargs)
            ended.append(result)
            return result
        except BaseException as exc:
            ended.append(exc)
            raise
        finally:
            finished.set()

    return watched


def test_a_merge_whose_caller_gave_up_publishes_nothing(server, monkeypatch):
    """Its thread ran on past the caller's deadline and published: a merge timed out on, then
    sent again corrected, could end last and replace the corrected one."""
    registry = server.server.state.catalog
    release, finished, entered = threading.Event(), threading.Event(), threading.Event()
    abandoned = queue.Queue()  # the merge's event the server sets when its caller goes
    ended: list = []  # what the merge raised or returned
    merge_adapters, merge = registry_module.merge_adapters, registry.merge

    def slow_merge_adapters(*args, **kwargs):
        entered.set()
        release.wait(30)
        return merge_adapters(*args, **kwargs)

    monkeypatch.setattr(registry_module, "merge_adapters", slow_merge_adapters)
    monkeypatch.setattr(registry, "merge", to_the_end(merge, abandoned, finished, ended))  # the service calls merge(name, spec, abandoned)
    with TandemClient(server.target, token=ADMIN_TOKEN, timeout=3, max_retries=0) as impatient:  # time for a slow host to start the merge
        assert rpc_error(lambda: impatient.merge_adapters("late", ["a0", "a1"], "linear")).code == grpc.StatusCode.DEADLINE_EXCEEDED
    # The client's own timer ends its call; the server cancels the handler, which sets the
    # event, only later: released before that, the merge would publish.
    assert abandoned.get(timeout=30).wait(30)
    release.set()
    assert finished.wait(30)
    assert entered.is_set()  # it was the slow merge that ran on, not a merge refused earlier
    # Refused for its caller's going, not for any other reason, with the status it maps to.
    assert len(ended) == 1 and isinstance(ended[0], FailedPrecondition), ended
    assert status_for(ended[0], "late") == (
        grpc.StatusCode.FAILED_PRECONDITION, "the call that would write adapter 'late' was cancelled: nothing was written"
    )
    assert not (registry.adapters_dir / "late").exists() and "late" not in {a.name for a in registry.list()}


def test_a_load_whose_caller_gave_up_loads_nothing(server, admin, monkeypatch):
    """LoadAdapter on a slow disk ran on in its thread past the caller's deadline and, ending
    after the admin's next call for the name, served its version anyway: undoing that call."""
    registry = server.server.state.catalog
    before = admin.load_adapter("late-load", path="a0")
    release, finished, entered = threading.Event(), threading.Event(), threading.Event()
    abandoned = queue.Queue()  # the load's event the server sets when its caller goes
    ended: list = []  # what the load raised or returned
    read_whole, load = registry._read_whole, registry.load

    def slow_read_whole(name, directory, read):
        if directory.name == "a1":
            entered.set()
            release.wait(30)
        return read_whole(name, directory, read)

    monkeypatch.setattr(registry, "_read_whole", slow_read_whole)
    monkeypatch.setattr(registry, "load", to_the_end(load, abandoned, finished, ended))  # the service calls load(name, path, abandoned)
    with TandemClient(server.target, token=ADMIN_TOKEN, timeout=3, max_retries=0) as impatient:
        assert rpc_error(lambda: impatient.load_adapter("late-load", path="a1")).code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert abandoned.get(timeout=30).wait(30)  # as for the merge: the server sets it only later
    release.set()
    assert finished.wait(30)
    assert entered.is_set()  # it was the slow read that ran on
    assert len(ended) == 1 and isinstance(ended[0], FailedPrecondition), ended
    assert status_for(ended[0], "late-load") == (
        grpc.StatusCode.FAILED_PRECONDITION, "the call that would load adapter 'late-load' was cancelled: nothing was loaded"
    )
    listed = {a.name: a for a in admin.list_adapters()}
    assert (listed["late-load"].path, listed["late-load"].content_hash) == ("a0", before.content_hash)


def test_an_unload_whose_caller_gave_up_unloads_nothing(server, admin, monkeypatch):
    """UnloadAdapter on a slow adapters volume ran on in its thread past the caller's deadline
    and, ending after the admin's next LoadAdapter of the name, unloaded it: requests got
    NOT_FOUND although the admin's last call to succeed was the load."""
    registry = server.server.state.catalog
    # On disk and never read: the unload looks for its folder.
    shutil.copytree(registry.adapters_dir / "a0", registry.adapters_dir / "late-unload")
    release, finished, entered = threading.Event(), threading.Event(), threading.Event()
    abandoned = queue.Queue()  # the unload's event the server sets when its caller goes
    ended: list = []  # what the unload raised or returned
    resolve_adapter_dir, unload = registry_module.resolve_adapter_dir, registry.unload

    def slow_resolve_adapter_dir(adapters_dir, name, path):
        if name == "late-unload" and not entered.is_set():  # the unload's look, not the load's after it
            entered.set()
            release.wait(30)
        return resolve_adapter_dir(adapters_dir, name, path)

    monkeypatch.setattr(registry_module, "resolve_adapter_dir", slow_resolve_adapter_dir)
    monkeypatch.setattr(registry, "unload", to_the_end(unload, abandoned, finished, ended))  # the service calls unload(name, abandoned)
    with TandemClient(server.target, token=ADMIN_TOKEN, timeout=3, max_retries=0) as impatient:
        assert rpc_error(lambda: impatient.unload_adapter("late-unload")).code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert server.run(server.server.state.wait_idle(30))  # the server has given up on the unload's handler
    loaded = admin.load_adapter("late-unload")
    release.set()
    assert finished.wait(30)
    assert entered.is_set()  # it was the slow unload that ran on
    assert {a.name: a.content_hash for a in admin.list_adapters()}.get("late-unload") == loaded.content_hash
    assert len(admin.generate(adapter="late-unload", **GREEDY).token_ids) == 6
    assert abandoned.get_nowait().is_set()
    assert len(ended) == 1 and isinstance(ended[0], FailedPrecondition), ended
    assert status_for(ended[0], "late-unload") == (
        grpc.StatusCode.FAILED_PRECONDITION, "the call that would unload adapter 'late-unload' was cancelled: nothing was unloaded"
    )


def test_a_mixture_member_without_a_weight_weighs_1(server, admin):
    """A weight left out (grpcurl's JSON, a client that sends names only) was 0: the call
    was served by the base model, silently, in an adapter's slot."""
    body = json.dumps({"promptTokenIds": PROMPT, "maxNewTokens": 6, "ignoreEos": True, "adapters": [{"name": "a1"}]})
    with grpc.insecure_channel(server.target) as channel:
        reply = generation_pb2_grpc.GenerationServiceStub(channel).Generate(
            json_format.Parse(body, generation_pb2.GenerateRequest()), metadata=[("authorization", f"Bearer {ADMIN_TOKEN}")], timeout=60
        )
    plain, base = admin.generate(adapter="a1", **GREEDY), admin.generate(**GREEDY)
    assert list(reply.token_ids) == plain.token_ids != base.token_ids


@pytest.mark.parametrize(
    "adapter, code, reason",
    [
        ({"a0": 1.0, "nope": 1.0}, grpc.StatusCode.NOT_FOUND, "adapter 'nope' not found"),
        ({"a0": float("inf")}, grpc.StatusCode.INVALID_ARGUMENT, "must be a finite number"),
    ],
)
def test_bad_mixtures_are_refused_with_the_reason(admin, adapter, code, reason):
    error = rpc_error(lambda: admin.generate(adapter=adapter, **GREEDY))
    assert error.code == code and reason in str(error)


def test_an_empty_mixture_is_refused_before_it_is_sent():
    """{} was sent as the adapter named "{}": NOT_FOUND for an adapter nobody named."""
    with TandemClient("127.0.0.1:1", max_retries=0) as client:
        with pytest.raises(ValueError, match="at least one adapter"):
            client.generate(adapter={}, **GREEDY)
        with pytest.raises(ValueError, match="at least one adapter"):
            next(client.stream(adapter={}, **GREEDY))


def test_merge_and_compress_publish_servable_adapters(admin):
    result = admin.merge_adapters("ties-ab", {"a0": 1.0, "a1": 0.5}, "ties", rank=6, density=0.4)
    assert result.adapter.name == "ties-ab" and result.adapter.rank == 6 and result.adapter.format == "peft"
    assert len(result.errors) == 2 * 7 and all(0 <= e < 1 for e in result.errors.values())
    assert len(admin.generate(adapter="ties-ab", **GREEDY).token_ids) == 6

    small = admin.compress_adapter("a0-small", "a0", density=0.2)
    assert small.format == "compeft" and small.compression_ratio > 10
    listed = {a.name: a for a in admin.list_adapters()}
    assert listed["a0-small"].format == "compeft" and listed["a0"].format == "peft"
    assert len(admin.generate(adapter="a0-small", **GREEDY).token_ids) == 6


@pytest.mark.parametrize(
    "call, code, reason",
    [
        (lambda c: c.merge_adapters("m", ["a0", "nope"], "linear"), grpc.StatusCode.NOT_FOUND, "adapter 'nope' not found"),
        (lambda c: c.merge_adapters("m", ["a0", "qv"], "linear"), grpc.StatusCode.FAILED_PRECONDITION, "adapt different projections"),
        (lambda c: c.merge_adapters("m", ["a0", "a1"], "ties", rank=9), grpc.StatusCode.INVALID_ARGUMENT, "maximum LoRA rank 8"),
        (lambda c: c.merge_adapters("m", ["a0", "a1"], "ties", density=1.5), grpc.StatusCode.INVALID_ARGUMENT, "density must lie in (0, 1]"),
        # The Python client refuses an unknown method itself (tests/api/test_client_convert.py):
        # another client's request without one reaches the server.
        (lambda c: c._call(Call(AdaptersServiceStub, "MergeAdapters", MergeAdaptersRequest(name="m", adapters=["a0"]), merge_result), None),
         grpc.StatusCode.INVALID_ARGUMENT, "set method to"),
        (lambda c: c.compress_adapter("s", "a0", density=0.0), grpc.StatusCode.INVALID_ARGUMENT, "density must lie in (0, 1]"),
        (lambda c: c.compress_adapter("s", "nope"), grpc.StatusCode.NOT_FOUND, "adapter 'nope' not found"),
    ],
    ids=["unknown", "targets", "rank", "density", "method", "compress-density", "compress-unknown"],
)
def test_bad_merges_and_compressions_are_refused_with_the_reason(admin, call, code, reason):
    error = rpc_error(lambda: call(admin))
    assert error.code == code and reason in str(error)


def test_merge_and_compress_need_the_admin_role(server):
    with TandemClient(server.target, token=INFERENCE_TOKEN) as user:
        assert rpc_error(lambda: user.merge_adapters("m", ["a0", "a1"], "linear")).code == grpc.StatusCode.PERMISSION_DENIED
        assert rpc_error(lambda: user.compress_adapter("s", "a0")).code == grpc.StatusCode.PERMISSION_DENIED
        assert len(user.generate(adapter={"a0": 0.5, "a1": 0.5}, **GREEDY).token_ids) == 6
