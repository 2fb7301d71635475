"""The HTTP front's bearer tokens (the gRPC API's tokens file and roles), its part in the
graceful drain (new connections refused, streams in flight finished), and calls its clients
leave: their generations freed, each call logged and counted once."""

import asyncio
import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from fastapi import FastAPI
from grpc_health.v1.health import aio as health_aio

from tandem.server.api.serving_state import ServingState
from tandem.server.engine import async_engine
from tandem.server.engine.async_engine import AsyncEngine
from tandem.server.metrics import Metrics
from tandem.server.openai_api.app import build_app
from tests.api.conftest import all_blocks_free, held, loopback, start_engine, wait_until
from tests.api.harness import ServerThread
from tests.http.conftest import TOKEN, sse_data


def _sdk(server: ServerThread, token: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.server.http_port}/v1", api_key=token, max_retries=0, timeout=60)


def _calls(metrics: Metrics) -> dict[tuple[str, str], float]:
    """The calls counted in tandem:requests, by (method, status), read off the registry: a
    drain closes the metrics port."""
    calls: dict[tuple[str, str], float] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "tandem:requests_total":
                key = sample.labels["method"], sample.labels["status"]
                calls[key] = calls.get(key, 0) + sample.value
    return calls


@pytest.fixture(scope="module")
def auth_server(adapter_engine, tmp_path_factory) -> Iterator[ServerThread]:
    tokens = tmp_path_factory.mktemp("http-auth") / "tokens"
    tokens.write_text(f"inference {TOKEN}\n")
    thread = ServerThread(loopback(auth_tokens_file=str(tokens)), adapter_engine)
    yield thread
    thread.stop()


def test_bearer_tokens(auth_server, base_model):
    body = json.dumps({"model": base_model, "prompt": "Hi", "max_tokens": 2}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{auth_server.server.http_port}/v1/completions", data=body)
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    error = json.loads(caught.value.read())["error"]
    assert caught.value.code == 401 and error["type"] == "authentication_error" and "bearer token" in error["message"]
    with pytest.raises(openai.AuthenticationError, match="unknown bearer token"):
        _sdk(auth_server, token="wrong").models.list()
    ok = _sdk(auth_server, token=TOKEN).completions.create(model=base_model, prompt="Hi", max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens == 2
    # A body that is not JSON is refused only after the token is.
    for token, status in (("", 401), (TOKEN, 400)):
        headers = {"content-type": "application/json"} | ({"authorization": f"Bearer {token}"} if token else {})
        broken = urllib.request.Request(request.full_url, data=b'{"prompt": ', headers=headers)
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(broken, timeout=30)
        assert caught.value.code == status
    # Probes send no token.
    with urllib.request.urlopen(f"http://127.0.0.1:{auth_server.server.http_port}/health", timeout=10) as reply:
        assert reply.status == 200
    # The API port's metrics name the adapters in use and the jobs' losses: a token's (they were open).
    metrics = f"http://127.0.0.1:{auth_server.server.http_port}/metrics"
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(metrics, timeout=10)
    assert caught.value.code == 401
    with urllib.request.urlopen(urllib.request.Request(metrics, headers={"authorization": f"Bearer {TOKEN}"}), timeout=10) as reply:
        assert reply.status == 200 and b"tandem:" in reply.read()


def test_a_body_the_framework_refuses_is_authorized_counted_and_in_openai_shape(adapter_engine, tmp_path):
    """A body that is not UTF-8, or one over --max-message-bytes, was refused by the framework
    before the token was checked (a caller without one learnt of the body), uncounted, with no
    x-request-id, and a chunked one's 413 had code null where a declared length's had
    resource_exhausted."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"inference {TOKEN}\n")
    server = ServerThread(loopback(auth_tokens_file=str(tokens), max_message_bytes=1000), adapter_engine)

    def post(path: str, body: bytes | list[bytes] | None, token: str) -> tuple[int, str | None, dict]:
        """body: bytes, chunks sent chunked, or None: a declared length over the limit, no body sent."""
        connection = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=30)
        headers = {"content-type": "application/json"} | ({"authorization": f"Bearer {token}"} if token else {})
        if body is None:
            headers["content-length"] = "5000"
        connection.request("POST", path, body=iter(body) if isinstance(body, list) else body, headers=headers)
        reply = connection.getresponse()
        return reply.status, reply.getheader("x-request-id"), json.loads(reply.read())

    try:
        not_utf8 = b'{"messages": [{"role": "user", "content": "\xff"}]}'
        chunked = [b" " * 600, b" " * 600]
        for path, body in [("/v1/chat/completions", not_utf8), ("/v1/completions", chunked), ("/v1/completions", None)]:
            status, request_id, reply = post(path, body, "")
            assert (status, reply["error"]["type"]) == (401, "authentication_error") and request_id, path
        status, request_id, reply = post("/v1/chat/completions", not_utf8, TOKEN)
        assert status == 400 and request_id and (reply["error"]["type"], reply["error"]["code"]) == ("invalid_request_error", "invalid_argument")
        declared = post("/v1/completions", None, TOKEN)
        status, request_id, reply = post("/v1/completions", chunked, TOKEN)
        assert status == declared[0] == 413 and request_id and reply == declared[2]
        assert reply["error"]["code"] == "resource_exhausted" and "--max-message-bytes" in reply["error"]["message"]
        assert _calls(server.server.metrics) == {
            ("ChatCompletions", "UNAUTHENTICATED"): 1, ("Completions", "UNAUTHENTICATED"): 2,
            ("ChatCompletions", "INVALID_ARGUMENT"): 1, ("Completions", "RESOURCE_EXHAUSTED"): 2,
        }
    finally:
        server.stop()


def _refuses_connections(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
    except urllib.error.URLError as exc:
        return isinstance(exc.reason, ConnectionRefusedError)
    except TimeoutError:
        return False
    return False


def test_drain_refuses_new_connections_and_finishes_streams_in_flight(adapter_engine, base_model, monkeypatch):
    server = ServerThread(loopback(), adapter_engine)
    port = server.server.http_port
    # Readiness updates that take a while: a connection made once the state says draining
    # must still be refused, not accepted (or reset when the listener closes after it).
    health = server.server.state._health
    update = health.set

    async def slow_update(service: str, status: int) -> None:
        await asyncio.sleep(0.2)
        await update(service, status)

    monkeypatch.setattr(health, "set", slow_update)
    with held(adapter_engine) as release:  # the stream is still in flight when the drain looks
        stream = _sdk(server).completions.create(
            model=base_model, prompt="Once upon a time", max_tokens=300, temperature=1.0, seed=3, n=4, stream=True,
            extra_body={"ignore_eos": True},
        )
        chunks = [next(stream)]
        drained = server.submit(server.server.drain(grace=60))
        assert wait_until(lambda: server.server.state.draining)
        assert _refuses_connections(port)
        assert not drained.done()  # waiting for the stream
        release()
        chunks.extend(stream)
    assert drained.result(60) is True
    server.close()
    finished = [c.choices[0] for c in chunks if c.choices[0].finish_reason]
    assert sorted((c.index, c.finish_reason) for c in finished) == [(i, "length") for i in range(4)]


def test_a_stream_past_the_grace_period_ends_with_an_error_not_a_finish(adapter_engine, base_model):
    """Cut off by the drain, a stream ended with finish_reason "abort", its usage and [DONE],
    and was counted OK: the SDK took the part for the whole completion. Its text still comes,
    then the error event a failed stream ends with (the SDK raises it), no usage, no [DONE]."""
    server = ServerThread(loopback(), adapter_engine)
    body = {
        "model": base_model, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}, "ignore_eos": True,
    }
    with held(adapter_engine):  # not over before the drain comes
        connection = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=60)
        connection.request("POST", "/v1/completions", body=json.dumps(body).encode(), headers={"content-type": "application/json"})
        reply = connection.getresponse()
        first = reply.readline()
        drained = server.submit(server.server.drain(grace=0))
        raw = first + reply.read()
    assert drained.result(60) is False
    assert wait_until(lambda: _calls(server.server.metrics) == {("Completions", "UNAVAILABLE"): 1})
    server.close()
    *chunks, last = sse_data(raw)
    assert "[DONE]" not in chunks and last != "[DONE]"
    choices = [c for chunk in map(json.loads, chunks) for c in chunk["choices"]]
    assert choices and "".join(c["text"] for c in choices) and all(c["finish_reason"] is None for c in choices)
    error = json.loads(last)["error"]
    assert (error["type"], error["code"]) == ("service_unavailable_error", "unavailable") and "retry" in error["message"]


def test_a_unary_call_past_the_grace_period_is_a_503_the_client_retries(adapter_engine, base_model):
    """Cut off by the server's stop, a non-streamed reply is not whole: OpenAI's clients
    retry a 5xx, and would take a 200 with partial text for the answer."""
    server = ServerThread(loopback(), adapter_engine)
    sdk = _sdk(server)
    with ThreadPoolExecutor(1) as pool, held(adapter_engine):  # not over before the drain comes
        call = pool.submit(
            sdk.completions.create, model=base_model, prompt="Once upon a time", max_tokens=400, temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert wait_until(lambda: adapter_engine.stats().num_running > 0)
        drained = server.submit(server.server.drain(grace=0))
        with pytest.raises(openai.InternalServerError) as caught:
            call.result(60)
    assert drained.result(60) is False
    server.close()
    assert caught.value.status_code == 503 and "retry" in caught.value.body["message"]


def test_a_client_that_leaves_a_unary_call_frees_its_generation(http_server, adapter_engine, base_model):
    body = json.dumps({"model": base_model, "prompt": "Hi", "max_tokens": 400, "n": 8, "ignore_eos": True}).encode()
    with held(adapter_engine):  # only the abort can end the generation and free its blocks
        connection = http.client.HTTPConnection("127.0.0.1", http_server.server.http_port, timeout=30)
        connection.request("POST", "/v1/completions", body=body, headers={"content-type": "application/json"})
        assert wait_until(lambda: adapter_engine.stats().num_running > 0)
        connection.close()
        assert wait_until(lambda: all_blocks_free(adapter_engine), timeout=30)


def test_a_client_that_leaves_a_stream_before_its_first_token_frees_its_request(tiny_model_dir, base_model):
    """The framework watches a stream's client only once it streams: a request still queued
    when its client left stayed in the engine until it ran."""
    engine = start_engine(tiny_model_dir, max_num_seqs=1)
    thread = ServerThread(loopback(), engine)
    scheduler = engine.engine.scheduler
    try:
        def post(body: dict, request_id: str) -> http.client.HTTPConnection:
            connection = http.client.HTTPConnection("127.0.0.1", thread.server.http_port, timeout=30)
            headers = {"content-type": "application/json", "x-request-id": request_id}
            connection.request("POST", "/v1/completions", body=json.dumps(body).encode(), headers=headers)
            return connection

        def in_engine(request_id: str) -> bool:  # the engine's ids are the call's plus a suffix
            while True:
                try:
                    return any(s.request_id.startswith(request_id + "-") for s in (*scheduler.waiting, *scheduler.running))
                except RuntimeError:  # the engine thread changed the queue meanwhile
                    continue

        # Eight 400-token sequences, one at a time, held: the stream waits behind them until
        # an abort ends it; only an abort can end either.
        with held(engine):
            blocker = post({"model": base_model, "prompt": "Hi", "max_tokens": 400, "n": 8, "ignore_eos": True}, "blocker")
            assert wait_until(lambda: in_engine("blocker"))
            queued = post({"model": base_model, "prompt": "Hello", "max_tokens": 50, "stream": True}, "queued")
            assert wait_until(lambda: in_engine("queued"))
            queued.close()
            assert wait_until(lambda: not in_engine("queued"), timeout=30) and in_engine("blocker")
            blocker.close()
            assert wait_until(lambda: all_blocks_free(engine), timeout=30)
    finally:
        thread.stop()
        engine.shutdown()


def test_a_stream_the_servers_stop_ends_before_its_first_token_is_a_503_the_client_retries(tiny_model_dir, base_model):
    """Queued behind others when the drain's grace ran out, it was answered 200 with an empty
    completion and finish_reason "abort" (counted a success): nothing had been streamed, so
    it is a 503, as a whole reply cut off is."""
    engine = start_engine(tiny_model_dir, max_num_seqs=1)
    server = ServerThread(loopback(), engine)
    sdk = _sdk(server)
    scheduler = engine.engine.scheduler
    with ThreadPoolExecutor(2) as pool, held(engine):  # the blocker still runs, the stream still waits, at the drain
        blocker = pool.submit(
            sdk.completions.create, model=base_model, prompt="Hi", max_tokens=400, temperature=0, extra_body={"ignore_eos": True},
        )
        assert wait_until(lambda: engine.stats().num_running > 0)
        queued = pool.submit(
            lambda: list(sdk.completions.create(model=base_model, prompt="Hello", max_tokens=50, temperature=0, stream=True)),
        )
        assert wait_until(lambda: len(scheduler.waiting) > 0)
        drained = server.submit(server.server.drain(grace=0))
        with pytest.raises(openai.InternalServerError) as caught:
            queued.result(60)
        with pytest.raises(openai.InternalServerError):
            blocker.result(60)
    assert drained.result(60) is False
    server.close()
    engine.shutdown()
    assert caught.value.status_code == 503 and "retry" in caught.value.body["message"]


async def _front(engine: AsyncEngine) -> tuple[ServingState, Metrics, FastAPI]:
    """The HTTP front's app on the running loop, with no server: the test plays uvicorn's
    part, its receive and send, to hold a send or leave at a chosen moment."""
    state = ServingState(health_aio.HealthServicer(), [])
    await state.attach(engine)
    metrics = Metrics()
    return state, metrics, build_app(state, None, metrics, 1 << 20)


async def _stream(app: FastAPI, body: dict, receive: Callable[[], Awaitable[dict]], send: Callable[[dict], Awaitable[None]]) -> None:
    """One streamed POST /v1/completions through the app: its body, then what receive gives."""
    raw = json.dumps({**body, "stream": True}).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "", "state": {},
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
    }
    pending = [{"type": "http.request", "body": raw, "more_body": False}]

    async def messages() -> dict:
        return pending.pop() if pending else await receive()

    await app(scope, messages, send)


def test_a_stream_whose_client_stops_reading_is_ended_and_its_call_released(tiny_model_dir, monkeypatch):
    """A client that reads nothing more held its call for as long as it kept its connection:
    the response's send waited on flow control for good, so the stream's end was never
    taken, and the call stayed admitted (a drain waited for it), unlogged and uncounted.
    Stopped for falling behind, its reader is now cancelled: the response ends (uvicorn then
    closes the connection) and the call is released, logged and counted once, CANCELLED."""
    monkeypatch.setattr(async_engine, "MAX_UNREAD_OUTPUTS", 16)
    monkeypatch.setattr(async_engine, "STUCK_READER_SECONDS", 0)
    engine = start_engine(tiny_model_dir)
    sent: list[dict] = []

    async def main() -> tuple[dict[tuple[str, str], float], bool]:
        state, metrics, app = await _front(engine)
        never = asyncio.Event()

        async def send(message: dict) -> None:
            sent.append(message)
            if len(sent) == 3:  # the head and two events went out; then the client reads no more
                await never.wait()

        body = {"model": engine.info.name, "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True}
        await asyncio.wait_for(_stream(app, body, never.wait, send), 60)
        return _calls(metrics), not state._in_flight and not engine._streams

    try:
        calls, released = asyncio.run(main())
    finally:
        engine.shutdown()
    assert len(sent) == 3
    assert calls == {("Completions", "CANCELLED"): 1} and released


def test_a_stream_cancelled_before_its_first_event_is_logged_and_counted(tiny_model_dir):
    """The record was closed by the events' generator alone, which never starts when the
    response is cancelled before its first event: as uvicorn cancels the calls still open at
    the end of its shutdown grace, here one whose response start waits on flow control (its
    connection still holds an earlier response that the client has not read). The call was
    neither logged nor counted, and its generation was left for the garbage collector to end."""
    engine = start_engine(tiny_model_dir)

    async def main() -> tuple[dict[tuple[str, str], float], bool]:
        state, metrics, app = await _front(engine)
        starting, never = asyncio.Event(), asyncio.Event()

        async def send(message: dict) -> None:
            starting.set()
            await never.wait()

        body = {"model": engine.info.name, "prompt": "Once upon a time", "max_tokens": 50, "ignore_eos": True}
        call = asyncio.create_task(_stream(app, body, never.wait, send))
        await asyncio.wait_for(starting.wait(), 60)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        return _calls(metrics), not state._in_flight and not engine._streams

    try:
        calls, released = asyncio.run(main())
    finally:
        engine.shutdown()
    assert calls == {("Completions", "CANCELLED"): 1}
    assert released  # by the response itself, not later by the garbage collector
