"""The OpenAI front in vLLM's request metrics (each prompt of a batch, each of n
completions, is a request of its own) and its /health, which needs no token and so says
no more than a refused call is told."""

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace

import openai
import pytest

from tests.api.conftest import loopback, wait_until
from tests.api.harness import ServerThread
from tests.api.test_metrics import scrape

# Token-id prompts of 2, 3 and 6 tokens: each request's own length lands in its own bucket.
PROMPTS = [[11, 12], [21, 22, 23], [31, 32, 33, 34, 35, 36]]


@pytest.fixture(scope="module")
def metrics_server(adapter_engine) -> Iterator[ServerThread]:
    """A server of its own: its request metrics count only this module's calls."""
    thread = ServerThread(loopback(), adapter_engine)
    yield thread
    thread.stop()


def _sdk(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.server.http_port}/v1", api_key="unused", max_retries=0, timeout=60)


def _counts(server: ServerThread) -> dict[str, float]:
    s = scrape(server)

    def total(name: str, **labels: str) -> float:
        return sum(v for got, v in s.get(name, []) if all(got.get(k) == want for k, want in labels.items()))

    counts = {
        name: total(name)
        for name in (
            "tandem:request_success_total", "tandem:request_prompt_tokens_count", "tandem:request_prompt_tokens_sum",
            "tandem:request_generation_tokens_count", "tandem:request_generation_tokens_sum", "tandem:prompt_tokens_total",
            "tandem:e2e_request_latency_seconds_count", "tandem:request_queue_time_seconds_count",
            "tandem:time_to_first_token_seconds_count",
        )
    }
    for le in ("2.0", "5.0", "10.0"):
        counts[f"prompt<={le}"] = total("tandem:request_prompt_tokens_bucket", le=le)
    counts["length"] = total("tandem:request_success_total", finished_reason="length")
    counts["calls"] = total("tandem:requests_total", method="Completions", status="OK")
    return counts


def _moved(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in before}


@pytest.mark.parametrize("streamed", [False, True])
def test_each_prompt_of_a_completions_call_is_a_request(metrics_server, streamed):
    """vLLM runs each prompt of a batch as an engine request of its own and counts each: a
    3-prompt call was one success, with the prompts' tokens summed into one observation."""
    before = _counts(metrics_server)
    reply = _sdk(metrics_server).completions.create(
        model=metrics_server.engine.info.name, prompt=PROMPTS, max_tokens=2, temperature=0, stream=streamed,
        extra_body={"ignore_eos": True},
    )
    list(reply) if streamed else reply
    assert wait_until(lambda: _moved(before, _counts(metrics_server))["calls"] == 1)
    moved = _moved(before, _counts(metrics_server))
    assert moved["tandem:request_success_total"] == moved["length"] == 3
    assert moved["tandem:request_prompt_tokens_count"] == 3
    assert moved["tandem:request_prompt_tokens_sum"] == moved["tandem:prompt_tokens_total"] == 2 + 3 + 6
    assert (moved["prompt<=2.0"], moved["prompt<=5.0"], moved["prompt<=10.0"]) == (1, 2, 3)  # each prompt's own length
    assert moved["tandem:request_generation_tokens_count"] == 3 and moved["tandem:request_generation_tokens_sum"] == 6
    for name in ("tandem:e2e_request_latency_seconds_count", "tandem:request_queue_time_seconds_count", "tandem:time_to_first_token_seconds_count"):
        assert moved[name] == 3, name


def test_each_of_n_completions_is_a_request(metrics_server):
    """As vLLM (V1) fans n > 1 out into n child requests, each counted: 2 prompts x n = 2."""
    before = _counts(metrics_server)
    _sdk(metrics_server).completions.create(
        model=metrics_server.engine.info.name, prompt=PROMPTS[:2], n=2, max_tokens=2, temperature=1.0, seed=3,
        extra_body={"ignore_eos": True},
    )
    assert wait_until(lambda: _moved(before, _counts(metrics_server))["calls"] == 1)
    moved = _moved(before, _counts(metrics_server))
    assert moved["tandem:request_success_total"] == moved["tandem:request_prompt_tokens_count"] == 4
    assert moved["tandem:request_prompt_tokens_sum"] == 2 * (2 + 3)
    assert moved["tandem:request_generation_tokens_sum"] == 4 * 2 and moved["tandem:time_to_first_token_seconds_count"] == 4


class _FailedEngine:
    """What ServingState reads of an engine whose thread stopped on an error."""

    def __init__(self, failure: BaseException):
        self.failure = failure
        self.on_failure = None
        self.engine = SimpleNamespace(registry=None)


def _health(server: ServerThread) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server.http_port}/health", timeout=10) as reply:
            return reply.status, {}
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_health_does_not_show_the_engines_error():
    """/health needs no token and put repr(engine.failure) in its body (paths, shapes, a
    library's internals); gRPC's refusals say only that the engine stopped. Both say the same."""
    from tandem.server.api.serving_state import ENGINE_FAILED

    thread = ServerThread(loopback(), None)
    try:
        assert _health(thread)[0] == 503  # loading
        secret = RuntimeError("CUDA error at /srv/secret-models/llama/weights.safetensors: shape [4096, 11008]")
        thread.run(thread.server.state.attach(_FailedEngine(secret)))
        status, body = _health(thread)
        assert status == 503 and "secret" not in json.dumps(body) and "RuntimeError" not in json.dumps(body)
        assert body["error"]["message"].startswith(ENGINE_FAILED)
    finally:
        thread.stop()
