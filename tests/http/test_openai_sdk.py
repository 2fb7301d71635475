"""The OpenAI-compatible front through the real `openai` SDK: completions, chat, streaming
with usage, n, stop strings, logprobs, adapters as `model`, errors in OpenAI's shape, and
the same greedy tokens as the gRPC API."""

import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.api.conftest import wait_until
from tests.http.conftest import ADAPTER, sse_data

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def test_completion_equals_grpc_greedy(oai, grpc_client, base_model):
    http = oai.completions.create(model=base_model, prompt=PROMPT, max_tokens=12, temperature=0)
    grpc = grpc_client.generate(PROMPT, max_new_tokens=12)
    (choice,) = http.choices
    assert choice.text == grpc.text and choice.finish_reason == "length"
    assert http.usage.prompt_tokens == grpc.prompt_tokens and http.usage.completion_tokens == 12
    assert http.usage.total_tokens == grpc.prompt_tokens + 12
    assert http.object == "text_completion" and http.model == base_model


def test_chat_equals_grpc_greedy(oai, grpc_client, base_model):
    http = oai.chat.completions.create(model=base_model, messages=CHAT, max_tokens=10, temperature=0)
    grpc = grpc_client.generate(messages=CHAT, max_new_tokens=10)
    (choice,) = http.choices
    assert choice.message.role == "assistant" and choice.message.content == grpc.text
    assert http.usage.prompt_tokens == grpc.prompt_tokens


def test_text_parts_are_joined_as_vllm_joins_them(oai, grpc_client, base_model):
    """Parts were joined with nothing between them: "Hello" and "world" read "Helloworld"."""
    parts = [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": "of France?"}]
    http = oai.chat.completions.create(model=base_model, messages=[{"role": "user", "content": parts}], max_tokens=8, temperature=0)
    grpc = grpc_client.generate(messages=[{"role": "user", "content": "What is the capital\nof France?"}], max_new_tokens=8)
    assert http.choices[0].message.content == grpc.text and http.usage.prompt_tokens == grpc.prompt_tokens


def test_chat_stream_with_usage(oai, grpc_client, base_model):
    chunks = list(
        oai.chat.completions.create(
            model=base_model, messages=CHAT, max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    grpc = grpc_client.generate(messages=CHAT, max_new_tokens=10)
    *content, usage = chunks
    assert content[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in content) == grpc.text
    assert [c.choices[0].finish_reason for c in content][-1] == "length"
    assert usage.choices == [] and usage.usage.completion_tokens == 10
    assert usage.usage.prompt_tokens == grpc.prompt_tokens


def test_completion_stream_without_usage(oai, base_model):
    chunks = list(oai.completions.create(model=base_model, prompt=PROMPT, max_tokens=6, temperature=0, stream=True))
    whole = oai.completions.create(model=base_model, prompt=PROMPT, max_tokens=6, temperature=0)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert all(c.usage is None for c in chunks)


def test_n_completions_are_seeded_and_counted(oai, base_model):
    ask = dict(model=base_model, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7, n=2)
    first = oai.completions.create(**ask)
    again = oai.completions.create(**ask)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.choices[0].text != first.choices[1].text
    assert first.usage.completion_tokens == 16
    streamed = list(oai.completions.create(**ask, stream=True))
    for i in (0, 1):
        assert "".join(c.choices[0].text for c in streamed if c.choices[0].index == i) == first.choices[i].text


def test_stop_string_cuts_the_text(oai, base_model):
    full = oai.completions.create(model=base_model, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = oai.completions.create(model=base_model, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(stop)]


def test_logprobs_match_grpc(oai, grpc_client, base_model):
    grpc = grpc_client.generate(PROMPT, max_new_tokens=5, logprobs=2)
    completion = oai.completions.create(model=base_model, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2).choices[0]
    assert completion.logprobs.token_logprobs == pytest.approx([lp.logprob for lp in grpc.logprobs], abs=1e-5)
    assert "".join(completion.logprobs.tokens) == completion.text
    assert completion.logprobs.text_offset[0] == 0 and all(len(top) == 2 for top in completion.logprobs.top_logprobs)
    chat = oai.chat.completions.create(model=base_model, messages=CHAT, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)  # greedy takes the top token
    assert bytes(content[0].bytes).decode() == content[0].token


def test_prompt_logprobs_extension(oai, base_model):
    body = oai.completions.create(model=base_model, prompt=PROMPT, max_tokens=1, temperature=0, extra_body={"prompt_logprobs": 1})
    prompt_logprobs = body.model_extra["choices"][0]["prompt_logprobs"] if body.model_extra.get("choices") else body.choices[0].model_extra["prompt_logprobs"]
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == body.usage.prompt_tokens
    assert all(1 <= len(entry) <= 2 for entry in prompt_logprobs[1:])


def test_prompt_logprobs_on_chat_beside_the_choices_and_refused_when_streamed(oai, base_model):
    """They were accepted and dropped: a 200 without them."""
    body = oai.chat.completions.create(model=base_model, messages=CHAT, max_tokens=1, temperature=0, extra_body={"prompt_logprobs": 1})
    prompt_logprobs = body.model_extra["prompt_logprobs"]
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == body.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs is not served on streamed chat completions"):
        oai.chat.completions.create(model=base_model, messages=CHAT, max_tokens=1, stream=True, extra_body={"prompt_logprobs": 1})


def test_adapter_as_model(oai, grpc_client, base_model):
    models = oai.models.list().data
    assert [(m.id, m.model_extra["parent"]) for m in models] == [(base_model, None), (ADAPTER, base_model)]
    tuned = oai.completions.create(model=ADAPTER, prompt=PROMPT, max_tokens=10, temperature=0).choices[0].text
    assert tuned == grpc_client.generate(PROMPT, max_new_tokens=10, adapter=ADAPTER).text
    assert tuned != oai.completions.create(model=base_model, prompt=PROMPT, max_tokens=10, temperature=0).choices[0].text
    assert oai.completions.create(model="", prompt=PROMPT, max_tokens=3, temperature=0).model == base_model


def test_a_model_is_retrieved_by_its_id(oai, base_model):
    """The SDK's models.retrieve: the list's entry, the base model's id slashes and all."""
    listed = {m.id: m for m in oai.models.list().data}
    for name in (base_model, ADAPTER):
        assert oai.models.retrieve(name) == listed[name]
    with pytest.raises(openai.NotFoundError) as caught:
        oai.models.retrieve("no-such-adapter")
    assert caught.value.code == "model_not_found" and "GET /v1/models" in caught.value.message


def test_unknown_model_is_404_in_openai_shape(oai):
    with pytest.raises(openai.NotFoundError) as caught:
        oai.chat.completions.create(model="no-such-adapter", messages=CHAT, max_tokens=2)
    error = caught.value
    assert error.status_code == 404 and error.code == "model_not_found" and error.param == "model"
    assert "no-such-adapter" in error.message and error.type == "not_found_error"
    # A Hugging Face id, which no adapter can be named: a 400 about adapter names before.
    with pytest.raises(openai.NotFoundError) as caught:
        oai.chat.completions.create(model="meta-llama/Llama-3.2-1B-Instruct", messages=CHAT, max_tokens=2)
    assert caught.value.code == "model_not_found" and "GET /v1/models" in caught.value.message


def test_bad_requests_are_400_and_name_the_field(oai, base_model):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.completions.create(model=base_model, prompt=PROMPT, temperature=-1)
    assert "temperature" in caught.value.message and caught.value.code == "invalid_argument"
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        oai.completions.create(model=base_model, prompt=PROMPT, logit_bias={"5": 1.0})
    with pytest.raises(openai.BadRequestError, match="messages"):
        oai.chat.completions.create(model=base_model, messages=[], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="role"):
        oai.chat.completions.create(model=base_model, messages=[{"role": "wizard", "content": "x"}], max_tokens=2)
    # Named as the caller sent them, not by the engine's (gRPC's) names.
    with pytest.raises(openai.BadRequestError, match="max_tokens must be at least 1"):
        oai.completions.create(model=base_model, prompt=PROMPT, max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="max_completion_tokens must be at least 1"):
        oai.chat.completions.create(model=base_model, messages=CHAT, max_completion_tokens=0)
    # Past the context too (it named max_new_tokens, a field the caller never sent).
    with pytest.raises(openai.BadRequestError, match=r"\+ max_tokens \(100000\) exceeds the maximum context length"):
        oai.completions.create(model=base_model, prompt=PROMPT, max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match=r"\+ max_completion_tokens \(100000\) exceeds the maximum context length"):
        oai.chat.completions.create(model=base_model, messages=CHAT, max_completion_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="top_logprobs must be in"):
        oai.chat.completions.create(model=base_model, messages=CHAT, max_tokens=2, logprobs=True, top_logprobs=25)
    # What would change the answer is refused, never dropped in silence.
    called = [{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]
    for refused, ask in [
        ("tool_choice", dict(tool_choice="auto")),
        ("modalities", dict(modalities=["text", "audio"])),
        ("audio", dict(audio={"voice": "alloy", "format": "wav"})),
        ("messages\\[1\\].tool_calls", dict(messages=CHAT + called)),
        ("stream_options", dict(stream_options={"include_usage": True})),
    ]:
        with pytest.raises(openai.BadRequestError, match=refused):
            oai.chat.completions.create(**{"model": base_model, "messages": CHAT, "max_tokens": 2} | ask)
    allowed = oai.chat.completions.create(model=base_model, messages=CHAT, max_tokens=2, tool_choice="none", modalities=["text"])
    assert allowed.usage.completion_tokens == 2


def test_a_chat_without_max_tokens_runs_to_the_contexts_end(oai, base_model, adapter_engine):
    """OpenAI's chat has no default cap, and its SDK sends none: a cap of 256 cut answers short."""
    reply = oai.chat.completions.create(model=base_model, messages=CHAT, temperature=0, extra_body={"ignore_eos": True})
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.total_tokens == adapter_engine.info.max_model_len


def test_a_prompt_over_the_context_is_openais_context_length_exceeded(oai, base_model):
    """The code LiteLLM and LangChain catch to fall back on a model with a longer context."""
    for ask in (
        lambda: oai.completions.create(model=base_model, prompt=PROMPT, max_tokens=100_000),
        lambda: oai.chat.completions.create(model=base_model, messages=[{"role": "user", "content": "hi " * 100_000}], max_tokens=2),
    ):
        with pytest.raises(openai.BadRequestError) as caught:
            ask()
        assert caught.value.code == "context_length_exceeded" and "maximum context length" in caught.value.message


@pytest.mark.parametrize("field, value, streamed", [
    ("top_k", 10**30, False), ("top_k", 10**30, True), ("seed", 10**30, False), ("n", 10**30, False),
    ("n", 10**30, True), ("logprobs", 10**30, False), ("max_tokens", 10**30, False), ("prompt_logprobs", 10**30, False),
    ("stop_token_ids", [10**30], False), ("prompt", [10**30], False),
])
def test_integers_past_any_machine_word_are_400_and_others_generate_on(oai, grpc_client, base_model, field, value, streamed):
    """JSON integers have no bound: one that reached a tensor unchecked failed the whole
    engine step, and every caller's generation with it."""
    stream = grpc_client.stream(PROMPT, max_new_tokens=24, ignore_eos=True, temperature=0)
    first = next(stream)
    body = {"prompt": PROMPT, "max_tokens": 4, "stream": streamed, field: value}
    with pytest.raises(openai.BadRequestError) as caught:
        oai.completions.create(model=base_model, **{k: body.pop(k) for k in ("prompt", "max_tokens")}, extra_body=body)
    assert field in caught.value.message or "vocabulary" in caught.value.message
    assert len(first.token_ids) + sum(len(chunk.token_ids) for chunk in stream) == 24


def test_unpaired_surrogates_are_400_and_name_the_field(http_server, base_model):
    """JSON can escape half a surrogate pair; the tokenizer cannot take it (it was a 500).
    The SDK cannot send one (it encodes its body as UTF-8): json.dumps escapes it."""
    url = f"http://127.0.0.1:{http_server.server.http_port}/v1"
    for path, body, message in [
        ("completions", {"prompt": "hi \ud800"}, "prompt is not valid Unicode: an unpaired surrogate (\\ud800) at character 3"),
        ("chat/completions", {"messages": [*CHAT, {"role": "user", "content": "\udc00"}]}, "messages[1].content is not valid Unicode"),
        ("completions", {"prompt": "hi", "model": "a\ud800"}, "model is not valid Unicode"),  # it was a 500
    ]:
        data = json.dumps({"model": base_model, "max_tokens": 2, **body}).encode()
        request = urllib.request.Request(f"{url}/{path}", data=data, headers={"content-type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=30)
        assert caught.value.code == 400 and json.loads(caught.value.read())["error"]["message"].startswith(message)


def test_framework_refusals_are_in_openai_shape(http_server):
    port = http_server.server.http_port
    too_large = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    too_large.putrequest("POST", "/v1/completions")
    too_large.putheader("content-type", "application/json")
    too_large.putheader("content-length", str(5 << 20))  # over --max-message-bytes; the body is never sent
    too_large.endheaders()
    reply = too_large.getresponse()
    assert reply.status == 413 and "--max-message-bytes" in json.loads(reply.read())["error"]["message"]
    url = f"http://127.0.0.1:{port}"
    for request, status in [
        (urllib.request.Request(f"{url}/v1/nothing-here"), 404),
        (urllib.request.Request(f"{url}/v1/completions", data=b"{not json", headers={"content-type": "application/json"}), 400),
    ]:
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=30)
        assert caught.value.code == status
        assert json.loads(caught.value.read())["error"]["message"]


def test_an_unexpected_error_is_a_500_in_openai_shape_logged_once_with_its_request_id(http_server, adapter_engine, monkeypatch, caplog):
    """It was logged twice: by the app with the request id, then by uvicorn as "Exception in
    ASGI application" without it (the framework re-raises what Exception's handler answered)."""

    def broken() -> list[str]:
        raise RuntimeError("a bug")

    monkeypatch.setattr(adapter_engine.engine.registry, "servable_names", broken)
    url = f"http://127.0.0.1:{http_server.server.http_port}"
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(urllib.request.Request(f"{url}/v1/models", headers={"x-request-id": "bug-7"}), timeout=30)
    assert caught.value.code == 500 and caught.value.headers["x-request-id"] == "bug-7"
    assert json.loads(caught.value.read())["error"] == {
        "message": "internal error (request id bug-7); see the server log", "type": "server_error", "param": None, "code": "internal",
    }
    # The server's loop has served another call since: anything it was to log of the first is logged.
    urllib.request.urlopen(f"{url}/health", timeout=30).close()
    logged = [r for r in caplog.records if r.exc_info and str(r.exc_info[1]) == "a bug"]
    assert [r.getMessage() for r in logged] == ["unexpected error in /v1/models (request id bug-7)"]


def _post(server, path: str, body: dict) -> tuple[int, dict]:
    """A raw POST (the SDK leaves out what it does not know, or nulls): (status, JSON body)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.server.http_port}/v1/{path}", data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_nulls_mean_the_default_and_vllms_top_k_minus_one_is_no_top_k(http_server, base_model):
    """OpenAI marks these nullable and vLLM takes -1 for "no top-k": each was a 400."""
    nulls = {"n": None, "stream": None, "echo": None, "ignore_eos": None, "model": None}
    status, body = _post(http_server, "completions", {"prompt": PROMPT, "max_tokens": 2, "top_k": -1, **nulls})
    assert status == 200 and len(body["choices"]) == 1
    status, body = _post(http_server, "chat/completions", {"messages": CHAT, "max_tokens": 2, "logprobs": None, "n": None})
    assert status == 200 and body["choices"][0]["logprobs"] is None


def test_the_older_function_calling_fields_are_refused_like_tools(http_server, base_model):
    """They were ignored: a function-calling client got plain text and a 200."""
    for field, value in (("functions", [{"name": "f", "parameters": {}}]), ("function_call", "auto")):
        status, body = _post(http_server, "chat/completions", {"model": base_model, "messages": CHAT, "max_tokens": 2, field: value})
        assert status == 400 and body["error"]["message"] == f"{field} is not supported by this server: drop it from the request"


def test_function_call_none_passes_as_tool_choice_none_does(http_server, base_model):
    """Legacy clients send function_call "none" to call no function: a 400, where tool_choice
    "none" passed."""
    for field in ("tool_choice", "function_call"):
        status, body = _post(http_server, "chat/completions", {"model": base_model, "messages": CHAT, "max_tokens": 2, field: "none"})
        assert status == 200 and body["usage"]["completion_tokens"] <= 2, (field, body)


@pytest.mark.parametrize("path", ["completions", "chat/completions"])
def test_with_include_usage_every_chunk_before_the_usage_has_it_null(http_server, base_model, path):
    """OpenAI's spec: with include_usage every chunk has a usage field, null but in the last
    chunk's; it was left out. Without include_usage there is none."""
    ask = {"prompt": PROMPT} if path == "completions" else {"messages": CHAT}
    for include_usage in (True, False):
        body = {"model": base_model, "max_tokens": 3, "temperature": 0, "stream": True, **ask}
        if include_usage:
            body["stream_options"] = {"include_usage": True}
        request = urllib.request.Request(
            f"http://127.0.0.1:{http_server.server.http_port}/v1/{path}", data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as reply:
            *chunks, done = sse_data(reply.read())
        chunks = [json.loads(chunk) for chunk in chunks]
        assert done == "[DONE]" and len(chunks) > 2
        if include_usage:
            *chunks, last = chunks
            assert last["choices"] == [] and last["usage"]["completion_tokens"] == 3
            assert all("usage" in chunk and chunk["usage"] is None for chunk in chunks)
        else:
            assert all("usage" not in chunk for chunk in chunks)


def test_vllms_fields_that_change_the_output_are_refused_by_name(http_server, base_model):
    """vLLM serves them and clients written for it send them (extra_body): a 200 that ignored
    a guided_json schema or min_tokens broke the caller's contract without a word. Sent with
    the value that changes nothing, they pass."""
    refused = (
        ("completions", "guided_json", {"type": "object"}), ("chat/completions", "guided_choice", ["yes", "no"]),
        ("completions", "min_tokens", 4), ("chat/completions", "chat_template_kwargs", {"enable_thinking": False}),
        ("chat/completions", "add_generation_prompt", False), ("completions", "include_stop_str_in_output", True),
    )
    for path, field, value in refused:
        ask = {"prompt": PROMPT} if path == "completions" else {"messages": CHAT}
        status, body = _post(http_server, path, {"model": base_model, "max_tokens": 2, field: value, **ask})
        assert status == 400 and body["error"]["message"] == f"{field} is not supported by this server: drop it from the request"
    status, body = _post(http_server, "completions", {"prompt": PROMPT, "max_tokens": 2, "response_format": {"type": "json_object"}})
    assert status == 400 and "response_format" in body["error"]["message"]
    stream = {"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    status, body = _post(http_server, "completions", {"prompt": PROMPT, "max_tokens": 2, **stream})
    assert status == 400 and body["error"]["message"].startswith("stream_options.continuous_usage_stats is not supported")
    neutral = {"min_tokens": 0, "skip_special_tokens": True, "guided_json": None, "add_generation_prompt": True, "priority": 0}
    status, body = _post(http_server, "chat/completions", {"messages": CHAT, "max_tokens": 2, **neutral})
    assert status == 200 and body["usage"]["completion_tokens"] <= 2


def test_max_tokens_left_out_generates_to_the_end_of_the_context(oai, base_model):
    """The default (16, or 256 for chat) past the context was a 400 naming max_new_tokens,
    a field the caller never sent."""
    prompt = [5] * 500  # the tiny model's context: 512 tokens
    body = oai.completions.create(model=base_model, prompt=prompt, temperature=0, extra_body={"ignore_eos": True})
    assert body.choices[0].finish_reason == "length" and body.usage.completion_tokens == 12


def test_a_stream_holding_text_back_still_sends_offsets_and_prompt_logprobs_as_a_whole_reply_does(oai, base_model):
    """A stop string the text might still complete holds it back: the stream's text offsets
    lagged (counted from the characters sent) and a first chunk with no text dropped its
    prompt_logprobs."""
    ask = dict(model=base_model, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=1, stop=["Z" * 30], extra_body={"prompt_logprobs": 1})
    whole = oai.completions.create(**ask).choices[0]
    offsets, prompt_logprobs = [], None
    for chunk in oai.completions.create(**ask, stream=True):
        for choice in chunk.choices:
            if choice.logprobs is not None:
                offsets += choice.logprobs.text_offset
            prompt_logprobs = (choice.model_extra or {}).get("prompt_logprobs", prompt_logprobs)
    assert offsets == whole.logprobs.text_offset and len(offsets) == 12
    assert prompt_logprobs == whole.model_extra["prompt_logprobs"]


def test_a_batch_of_prompts_answers_each_as_its_own_request_would(oai, base_model, adapter_engine):
    """A list of prompts (LangChain's legacy LLM batches them) was refused. Prompt p's
    completion i is choice p * n + i, each the same tokens as the prompt sent alone."""
    prompts = [PROMPT, "Once upon a time", "1, 2, 3,"]
    ask = dict(model=base_model, max_tokens=6, temperature=1.0, seed=3, n=2, logprobs=1, extra_body={"prompt_logprobs": 1})
    batch = oai.completions.create(prompt=prompts, **ask)
    alone = [oai.completions.create(prompt=p, **ask) for p in prompts]
    assert [c.index for c in batch.choices] == list(range(6))
    for p, reply in enumerate(alone):
        for i in range(2):
            got, want = batch.choices[p * 2 + i], reply.choices[i]
            assert (got.text, got.logprobs.tokens) == (want.text, want.logprobs.tokens)
            assert got.model_extra["prompt_logprobs"] == want.model_extra["prompt_logprobs"]
    assert batch.usage.prompt_tokens == sum(r.usage.prompt_tokens for r in alone)
    assert batch.usage.completion_tokens == 6 * 6
    streamed = list(oai.completions.create(prompt=prompts, stream=True, stream_options={"include_usage": True}, **ask))
    for i, choice in enumerate(batch.choices):
        assert "".join(c.choices[0].text for c in streamed if c.choices and c.choices[0].index == i) == choice.text
    assert streamed[-1].usage.prompt_tokens == batch.usage.prompt_tokens
    assert adapter_engine.stats().num_free_blocks == adapter_engine.stats().num_total_blocks


@pytest.mark.parametrize("streamed", [False, True])
def test_one_bad_prompt_in_a_batch_fails_the_call_before_anything_is_sent(oai, base_model, adapter_engine, streamed):
    """A 400 naming the prompt, not an error event after the other prompts' tokens, and no
    prompt left running."""
    with pytest.raises(openai.BadRequestError) as caught:
        reply = oai.completions.create(model=base_model, prompt=[[1, 2, 3], [5] * 600], max_tokens=4, stream=streamed)
        list(reply) if streamed else reply
    assert caught.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match=r"prompt\[1\] is empty"):
        oai.completions.create(model=base_model, prompt=[PROMPT, ""], max_tokens=4, stream=streamed)
    # The first prompt's abort reaches the engine thread after the reply.
    assert wait_until(lambda: adapter_engine.stats().num_free_blocks == adapter_engine.stats().num_total_blocks, timeout=30)
    assert oai.completions.create(model=base_model, prompt=[PROMPT], max_tokens=2).usage.completion_tokens == 2


@pytest.mark.parametrize("n, streamed", [(1, False), (2, True)])
def test_a_batch_larger_than_the_engine_holds_is_400_before_any_request_is_made(oai, base_model, adapter_engine, monkeypatch, n, streamed):
    """A million prompts in a 4 MiB body made a million engine streams and tasks on the event
    loop (a minute of it, gigabytes) before the engine's capacity check refused them."""
    made = []
    generate = adapter_engine.generate
    monkeypatch.setattr(adapter_engine, "generate", lambda *args, **kwargs: made.append(args) or generate(*args, **kwargs))
    limit = adapter_engine.engine.capacity
    prompts = limit // n + 1
    with pytest.raises(openai.BadRequestError, match=f"ask for {prompts * n} completions at once; the server holds at most {limit}"):
        reply = oai.completions.create(model=base_model, prompt=[[0]] * prompts, n=n, max_tokens=1, stream=streamed)
        list(reply) if streamed else reply
    assert made == []
    # n is checked before the product it sizes: n = 0 made a product of 0 that passed.
    with pytest.raises(openai.BadRequestError, match=r"n must be in \[1, 16\], got 0"):
        oai.completions.create(model=base_model, prompt=[[0]] * prompts, n=0, max_tokens=1, stream=streamed)
    assert made == []
    within = oai.completions.create(model=base_model, prompt=[[0], [1]], n=n, max_tokens=1)
    assert len(within.choices) == 2 * n and len(made) == 2


def test_a_whole_reply_of_several_choices_with_logprobs_is_its_stream_joined(oai, base_model):
    """Each choice's text, finish and log-probabilities, joined from its interleaved increments."""
    ask = dict(model=base_model, prompt=[PROMPT, "1, 2, 3,"], max_tokens=7, temperature=1.0, seed=11, n=2, logprobs=1)
    whole = oai.completions.create(**ask)
    streamed = [c.choices[0] for c in oai.completions.create(**ask, stream=True) if c.choices]
    for choice in whole.choices:
        parts = [c for c in streamed if c.index == choice.index]
        assert choice.text == "".join(c.text for c in parts) and choice.finish_reason == parts[-1].finish_reason
        assert choice.logprobs.tokens == [t for c in parts if c.logprobs for t in c.logprobs.tokens]
        assert choice.logprobs.token_logprobs == [p for c in parts if c.logprobs for p in c.logprobs.token_logprobs]
        assert choice.logprobs.text_offset == [o for c in parts if c.logprobs for o in c.logprobs.text_offset]
    chat = dict(model=base_model, messages=CHAT, max_tokens=5, temperature=1.0, seed=11, n=2, logprobs=True, top_logprobs=2)
    whole = oai.chat.completions.create(**chat)
    streamed = [c.choices[0] for c in oai.chat.completions.create(**chat, stream=True) if c.choices]
    for choice in whole.choices:
        parts = [c for c in streamed if c.index == choice.index]
        assert choice.message.content == "".join(c.delta.content or "" for c in parts)
        assert choice.logprobs.content == [t for c in parts if c.logprobs for t in c.logprobs.content]


def test_listing_the_models_leaves_the_event_loop_free(http_server, oai, base_model, adapter_engine, monkeypatch):
    """The adapters directory was listed on the event loop: every other call, health probes
    included, waited for it."""
    registry = adapter_engine.engine.registry
    servable_names = registry.servable_names
    listing, listed = threading.Event(), threading.Event()

    def slow_listing() -> set[str]:
        listing.set()
        time.sleep(1)
        listed.set()
        return servable_names()

    monkeypatch.setattr(registry, "servable_names", slow_listing)
    with ThreadPoolExecutor(1) as pool:
        models = pool.submit(oai.models.list)
        assert listing.wait(30)
        with urllib.request.urlopen(f"http://127.0.0.1:{http_server.server.http_port}/health", timeout=30) as reply:
            assert reply.status == 200 and not listed.is_set()
        assert [m.id for m in models.result().data] == [base_model, ADAPTER]



@pytest.mark.parametrize("path, field, value", [
    ("chat/completions", "echo", True), ("completions", "add_special_tokens", False),
    ("chat/completions", "add_special_tokens", True), ("completions", "return_tokens_as_token_ids", True),
    ("chat/completions", "return_tokens_as_token_ids", True), ("chat/completions", "reasoning_effort", "low"),
    ("chat/completions", "reasoning_effort", "none"),
])
def test_more_fields_that_change_the_output_are_refused_by_name(http_server, base_model, path, field, value):
    """Each was accepted and ignored: chat's echo (the reply prefixed with the last message),
    add_special_tokens other than its endpoint's default (completions true, chat false, as
    vLLM), return_tokens_as_token_ids, and reasoning_effort (the model has no reasoning mode)."""
    ask = {"prompt": PROMPT} if path == "completions" else {"messages": CHAT}
    status, body = _post(http_server, path, {"model": base_model, "max_tokens": 2, field: value, **ask})
    assert status == 400 and body["error"]["message"] == f"{field} is not supported by this server: drop it from the request"


def test_those_fields_at_their_neutral_values_pass(http_server):
    """echo false, add_special_tokens at its endpoint's default, return_tokens_as_token_ids false, nulls."""
    neutral = {"add_special_tokens": True, "return_tokens_as_token_ids": False, "echo": False}
    status, body = _post(http_server, "completions", {"prompt": PROMPT, "max_tokens": 2, **neutral})
    assert status == 200 and body["usage"]["completion_tokens"] == 2
    neutral = {"add_special_tokens": False, "return_tokens_as_token_ids": False, "echo": False, "reasoning_effort": None}
    status, body = _post(http_server, "chat/completions", {"messages": CHAT, "max_tokens": 2, **neutral})
    assert status == 200 and body["usage"]["completion_tokens"] == 2
    status, body = _post(http_server, "chat/completions", {"messages": CHAT, "max_tokens": 2, "echo": None, "add_special_tokens": None})
    assert status == 200


NAMED_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}{% if m.name is defined %} ({{ m.name }}){% endif %}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def test_a_messages_name_reaches_the_chat_template(oai, grpc_client, base_model, adapter_engine, monkeypatch):
    """vLLM passes a message's `name` to the template; it was dropped. Without one, the
    messages render as before (SmolLM2's template, the gRPC API's tokens)."""
    import tandem.server.engine.async_engine as async_engine

    rendered = []
    render_chat = async_engine.render_chat
    monkeypatch.setattr(async_engine, "render_chat", lambda *args, **kwargs: rendered.append(render_chat(*args, **kwargs)) or rendered[-1])
    plain = oai.chat.completions.create(model=base_model, messages=CHAT, max_tokens=4, temperature=0)
    smollm2 = adapter_engine.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert rendered == [smollm2]
    grpc = grpc_client.generate(messages=CHAT, max_new_tokens=4)
    assert (plain.choices[0].message.content, plain.usage.prompt_tokens) == (grpc.text, grpc.prompt_tokens)
    rendered.clear()
    monkeypatch.setattr(adapter_engine.tokenizer, "chat_template", NAMED_TEMPLATE)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi", "name": "ada"}]
    reply = oai.chat.completions.create(model=base_model, messages=messages, max_tokens=2, temperature=0)
    assert rendered == ["system: Be brief.\nuser (ada): Hi\nassistant: "]
    assert reply.usage.prompt_tokens == len(adapter_engine.tokenize(rendered[0]))


def test_legacy_top_logprobs_always_hold_the_sampled_token(oai, base_model):
    """OpenAI's legacy format: "the API will always return the logprob of the sampled token,
    so there may be up to logprobs+1 elements" (vLLM too). A sampled token outside the top N
    was left out, and logprobs 0 gave no top_logprobs at all."""
    ask = dict(model=base_model, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=5)
    choice = oai.completions.create(**ask, logprobs=1).choices[0]
    lp = choice.logprobs
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top[token] == pytest.approx(logprob) and len(top) in (1, 2)
    assert any(len(top) == 2 for top in lp.top_logprobs)  # the sampled token was not the likeliest
    streamed = [c.choices[0].logprobs for c in oai.completions.create(**ask, logprobs=1, stream=True) if c.choices[0].logprobs]
    assert [top for part in streamed for top in part.top_logprobs] == lp.top_logprobs


def test_legacy_logprobs_zero_gives_the_sampled_token_alone(oai, base_model):
    """As vLLM: one entry per token, the sampled one (top_logprobs was null)."""
    lp = oai.completions.create(model=base_model, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=5, logprobs=0).choices[0].logprobs
    assert len(lp.tokens) == 8
    assert lp.top_logprobs == [{t: p} for t, p in zip(lp.tokens, lp.token_logprobs, strict=True)]


def test_refusals_name_the_field_as_openais_param(http_server, base_model):
    """OpenAI's `param` names the field a refusal is about; it was null for all but `model`.
    The engine's own range checks (SamplingParams, shared with gRPC) leave it null."""
    called = {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    for path, ask, param in [
        ("completions", {"logit_bias": {"5": 1.0}}, "logit_bias"),
        ("completions", {"guided_json": {"type": "object"}}, "guided_json"),
        ("completions", {"logprobs": 30}, "logprobs"),
        ("completions", {"prompt": [PROMPT, ""]}, "prompt[1]"),
        ("completions", {"stream_options": {"include_usage": True}}, "stream_options"),
        ("completions", {"temperature": "hot"}, "temperature"),  # the protocol's own validation
        ("completions", {"n": [1]}, "n"),
        ("chat/completions", {"modalities": ["audio"]}, "modalities"),
        ("chat/completions", {"messages": [*CHAT, called]}, "messages[1].tool_calls"),
        ("chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ("chat/completions", {"messages": [{"content": "hi"}]}, "messages[0].role"),
        ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
        ("chat/completions", {"logprobs": True, "top_logprobs": 25}, "top_logprobs"),
        ("chat/completions", {"model": "no-such-adapter"}, "model"),
        ("completions", {"temperature": -1}, None),  # SamplingParams.validate
        ("completions", {"max_tokens": 0}, None),
        ("chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, None),  # the engine's check
    ]:
        base = {"prompt": PROMPT} if path == "completions" else {"messages": CHAT}
        status, body = _post(http_server, path, {"model": base_model, "max_tokens": 2, **base, **ask})
        assert status in (400, 404) and body["error"]["param"] == param, (ask, body)
    status, body = _post(http_server, "chat/completions", ["not", "an", "object"])
    assert status == 400 and body["error"]["param"] is None
