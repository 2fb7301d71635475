"""Generation over a real channel: unary, streaming, concurrency, chat, tokenize, model
info, request ids, request log line, metrics, reflection, cancellation and deadlines."""

import asyncio
import logging
import math
import urllib.request

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tandem.client import AsyncTandemClient, TandemRpcError
from tests.api.conftest import all_blocks_free, held, wait_until

PROMPTS = ["Hello there", "The capital of France is", "1, 2, 3,", "Once upon a time"]


def test_unary_and_stream_agree_under_concurrency(server, client):
    """Greedy output does not depend on what else shares the batch, unary or streamed."""
    alone = [client.generate(p, max_new_tokens=12) for p in PROMPTS]

    async def together():
        async with AsyncTandemClient(server.target) as aclient:
            async def streamed(prompt):
                chunks = [c async for c in aclient.stream(prompt, max_new_tokens=12)]
                return chunks
            unary = [aclient.generate(p, max_new_tokens=12) for p in PROMPTS]
            streams = [streamed(p) for p in PROMPTS]
            return await asyncio.gather(*unary, *streams)

    results = asyncio.run(together())
    unary, streams = results[: len(PROMPTS)], results[len(PROMPTS) :]
    for single, batched, chunks in zip(alone, unary, streams):
        assert batched.token_ids == single.token_ids and len(single.token_ids) == 12
        assert [t for c in chunks for t in c.token_ids] == single.token_ids
        assert "".join(c.text for c in chunks) == single.text
        assert [c.finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
        assert chunks[-1].generated_tokens == single.generated_tokens == 12
        assert chunks[-1].prompt_tokens == single.prompt_tokens > 0


def test_chat_tokens_and_token_ids_prompt(client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.generate(messages=messages, max_new_tokens=5)
    prompt_ids = client.tokenize(messages=messages)
    by_ids = client.generate(prompt_token_ids=prompt_ids, max_new_tokens=5)
    assert chat.prompt_tokens == len(prompt_ids)
    assert chat.token_ids == by_ids.token_ids


def test_messages_a_chat_template_refuses_are_invalid_argument_with_its_reason(client, tiny_engine, monkeypatch):
    """Mistral's template raises on a system role or roles that do not alternate: that was
    INTERNAL, "see the server log", for Generate and Tokenize alike."""
    template = "{% if messages[0].role == 'system' %}{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}x"
    monkeypatch.setattr(tiny_engine.tokenizer, "chat_template", template)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    for call in (lambda: client.generate(messages=messages, max_new_tokens=2), lambda: client.tokenize(messages=messages)):
        with pytest.raises(TandemRpcError) as refused:
            call()
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "the model's chat template refused the messages: 'Conversation roles must alternate user/assistant'" in refused.value.message


def test_a_streamed_chunk_carries_the_requests_seed(client):
    """Every stream message echoes the seed; the client's chunks dropped it."""
    assert {chunk.seed for chunk in client.stream("Hello", max_new_tokens=3, temperature=0.8, seed=2**64 - 1)} == {2**64 - 1}
    assert {chunk.seed for chunk in client.stream("Hello", max_new_tokens=2)} == {None}


def test_sampling_options_round_trip(client):
    result = client.generate("Hello", max_new_tokens=6, temperature=0.8, top_p=0.9, top_k=20, seed=7, logprobs=2)
    again = client.generate("Hello", max_new_tokens=6, temperature=0.8, top_p=0.9, top_k=20, seed=7, logprobs=2)
    assert result.seed == 7 and result.token_ids == again.token_ids
    assert [lp.token_id for lp in result.logprobs] == result.token_ids
    assert all(len(lp.top) == 2 and lp.logprob <= 0 for lp in result.logprobs)


def test_model_info_and_tokenize(client, tiny_engine):
    info = client.model_info()
    assert (info.max_model_len, info.vocab_size, info.dtype) == (512, tiny_engine.info.vocab_size, "float32")
    assert info.version and info.max_lora_rank == 0
    assert client.tokenize("Hello world") == tiny_engine.tokenize("Hello world")


def test_adapters_listing_before_adapter_serving(client):
    assert client.list_adapters() == []


def test_request_id_is_echoed_and_logged(client, caplog):
    caplog.set_level(logging.INFO, logger="tandem.requests")
    result = client.generate("Hello", max_new_tokens=3, request_id="trace-42")
    assert result.request_id == "trace-42"
    assert wait_until(lambda: any(getattr(r, "fields", {}).get("request_id") == "trace-42" for r in caplog.records))
    (line,) = [r.fields for r in caplog.records if getattr(r, "fields", {}).get("request_id") == "trace-42"]
    assert line["method"] == "Generate" and line["status"] == "OK"
    assert (line["generated_tokens"], line["finish_reason"]) == (3, "length")
    generated = client.generate("Hello", max_new_tokens=1)
    assert len(generated.request_id) == 32  # made up by the client when none was given


def test_metrics_scrape_shows_the_request(server, client):
    client.generate("Hello", max_new_tokens=4)
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10).read().decode()
    model = server.engine.info.name
    assert f'tandem:requests_total{{finished_reason="length",method="Generate",model_name="{model}",status="OK"}}' in text
    assert f'tandem:request_success_total{{finished_reason="length",model_name="{model}"}}' in text
    for name in (
        "tandem:time_to_first_token_seconds_count",
        "tandem:inter_token_latency_seconds_count",
        "tandem:e2e_request_latency_seconds_count",
        "tandem:generation_tokens_total",
        "tandem:prompt_tokens_total",
        "tandem:num_requests_running",
        "tandem:num_requests_waiting",
        "tandem:kv_cache_usage_perc",
        "tandem:num_preemptions_total",
        "tandem:lora_requests_info{",
        "tandem:lora_slots_in_use",
    ):
        assert name in text, name


def test_reflection_lists_the_services(server):
    """What grpcurl does: list services, then fetch their descriptors from the server."""
    with grpc.insecure_channel(server.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert {"tandem.v1.GenerationService", "tandem.v1.AdaptersService", "grpc.health.v1.Health"} <= set(database.get_services())
        pool = DescriptorPool(database)
        methods = {m.name for m in pool.FindServiceByName("tandem.v1.GenerationService").methods}
        assert methods == {"Generate", "GenerateStream", "Tokenize", "GetModelInfo"}
        assert "prompt" in pool.FindMessageTypeByName("tandem.v1.GenerateRequest").fields_by_name


def test_health_is_serving(client):
    assert client.health() == "SERVING"
    assert client.health("tandem.v1.GenerationService") == "SERVING"
    assert client.health("tandem.v1.AdaptersService") == "SERVING"
    # inf is no deadline, as for every other call (gRPC failed it at once as DEADLINE_EXCEEDED).
    assert client.health(timeout=math.inf) == "SERVING"


def _logged_line(caplog, request_id: str) -> dict | None:
    lines = [r.fields for r in caplog.records if getattr(r, "fields", {}).get("request_id") == request_id]
    return lines[0] if lines else None


def _logged_status(caplog, request_id: str) -> str | None:
    line = _logged_line(caplog, request_id)
    return line["status"] if line else None


def test_cancelled_stream_frees_its_kv_blocks(client, tiny_engine, caplog):
    caplog.set_level(logging.INFO, logger="tandem.requests")
    assert wait_until(lambda: all_blocks_free(tiny_engine))
    with held(tiny_engine, lambda steps: steps >= 3):  # only the cancel can end it and free its blocks
        stream = client.stream("Once upon a time", max_new_tokens=400, ignore_eos=True, request_id="gone")
        while next(stream).generated_tokens < 3:  # chunks read late come joined
            pass
        assert tiny_engine.stats().num_free_blocks < tiny_engine.stats().num_total_blocks
        stream.close()  # cancels the call
        assert wait_until(lambda: all_blocks_free(tiny_engine), timeout=30)
    assert wait_until(lambda: _logged_status(caplog, "gone") == "CANCELLED"), _logged_status(caplog, "gone")


def test_deadline_stops_generation_and_frees_blocks(client, tiny_engine, caplog):
    caplog.set_level(logging.INFO, logger="tandem.requests")
    assert wait_until(lambda: all_blocks_free(tiny_engine))
    with held(tiny_engine):  # only the deadline can end it and free its blocks
        with pytest.raises(TandemRpcError) as info:
            client.generate("Once upon a time", max_new_tokens=480, ignore_eos=True, timeout=0.3, request_id="late")
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert wait_until(lambda: all_blocks_free(tiny_engine), timeout=30)
    assert wait_until(lambda: _logged_status(caplog, "late") == "DEADLINE_EXCEEDED")
    # It was running, its first token out, when the deadline stopped it: not refused before the engine.
    line = _logged_line(caplog, "late")
    assert line["generated_tokens"] >= 1 and line["ttft_ms"] is not None, line


def test_errors_are_logged_with_their_status(client, caplog):
    caplog.set_level(logging.INFO, logger="tandem.requests")
    with pytest.raises(TandemRpcError):
        client.generate("hi", adapter="missing", request_id="bad-adapter")
    assert wait_until(lambda: _logged_status(caplog, "bad-adapter") == "NOT_FOUND")


@pytest.mark.parametrize("adapter", ["a" * (1 << 20), {"a" * (1 << 20): 1.0}], ids=["name", "mixture"])
def test_a_megabyte_adapter_name_is_refused_and_logged_cut(client, caplog, adapter):
    """The name was logged as given, before it was checked: a megabyte's log line, written
    on the event loop."""
    caplog.set_level(logging.INFO, logger="tandem.requests")
    with pytest.raises(TandemRpcError) as refused:
        client.generate("hi", adapter=adapter, request_id="long-adapter")
    assert refused.value.code == grpc.StatusCode.NOT_FOUND
    assert wait_until(lambda: _logged_status(caplog, "long-adapter") == "NOT_FOUND")
    logged = _logged_line(caplog, "long-adapter")["adapter"]
    assert logged.startswith("'aaa") and logged.endswith("…") and len(logged) < 300
