"""Every status code the API promises, each from a real bad request over a real channel."""

import asyncio
import time
from collections.abc import Iterator

import grpc
import pytest
import torch

from tandem.client import AsyncTandemClient, TandemClient, TandemRpcError
from tests.api.conftest import all_blocks_free, held, loopback, start_engine, wait_until
from tests.api.harness import ServerThread


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(TandemRpcError) as info:
        call()
    return info.value.code, info.value.message


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({}, "exactly one of prompt, messages"),
        ({"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, "got prompt, messages"),
        ({"prompt": "hi", "temperature": -1.0}, "temperature"),
        ({"prompt": "hi", "top_p": 1.5}, "top_p"),
        ({"prompt": "hi", "max_new_tokens": 10_000}, "maximum context length"),
        ({"prompt": "hi", "logprobs": 99}, "logprobs"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
        ({"prompt_token_ids": [10**6]}, "token ids"),
    ],
)
def test_invalid_argument(client, kwargs, words):
    code, message = code_of(lambda: client.generate(**kwargs))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and words in message


def test_invalid_argument_in_a_stream_comes_before_any_chunk(client):
    chunks = []

    def read() -> None:
        for chunk in client.stream("hi", temperature=-1.0):
            chunks.append(chunk)

    code, message = code_of(read)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "temperature" in message
    assert chunks == []  # the error came first


def test_tokenize_needs_exactly_one_input(client):
    assert code_of(lambda: client.tokenize())[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_not_found(client):
    code, message = code_of(lambda: client.generate("hi", adapter="no-such-adapter"))
    assert code == grpc.StatusCode.NOT_FOUND and "no-such-adapter" in message
    assert code_of(lambda: client.unload_adapter("no-such-adapter"))[0] == grpc.StatusCode.NOT_FOUND


def test_adapter_files_without_an_adapters_dir_are_a_failed_precondition(client):
    """They were NOT_FOUND, which clients read as a wrong name; fine-tuning off is FAILED_PRECONDITION.
    A malformed merge or compression is still the caller's INVALID_ARGUMENT."""
    for call in (
        lambda: client.load_adapter("sql"),
        lambda: client.merge_adapters("m", ["a0", "a1"], "ties"),
        lambda: client.compress_adapter("s", "a0"),
    ):
        code, message = code_of(call)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "start it with --adapters-dir" in message
    code, message = code_of(lambda: client.merge_adapters("m", ["a0", "a1"], "ties", density=1.5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "density must lie in (0, 1]" in message
    code, message = code_of(lambda: client.compress_adapter("s", "a0", density=0.0))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "density must lie in (0, 1]" in message


def test_out_of_memory_tells_the_caller_what_to_do_and_the_log_the_rest(client, tiny_engine, monkeypatch, caplog):
    """The caller's message held the allocator's text: CUDA's names the GPU's memory layout
    and the PIDs of other processes on it."""
    cuda_text = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB. Process 4242 has 61.5 GiB in use"
    execute = tiny_engine.engine.runner.execute
    failed = []

    def out_of_memory_once(scheduled):
        if not failed:
            failed.append(True)
            raise torch.OutOfMemoryError(cuda_text)
        return execute(scheduled)

    monkeypatch.setattr(tiny_engine.engine.runner, "execute", out_of_memory_once)
    with TandemClient(client.settings.target, max_retries=0) as impatient:
        code, message = code_of(lambda: impatient.generate("hi", max_new_tokens=2, request_id="oom-7"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert message == "the iteration that carried this request ran out of memory on this replica: retry, or ask for fewer tokens"
    assert any(r.getMessage().startswith("request oom-7-") and "Process 4242" in r.getMessage() for r in caplog.records)


def test_an_error_names_the_request_id_the_server_used(client):
    """The server replaces an id it finds malformed and says so in the initial metadata: a
    success reported its id, an error the caller's, which no log line holds."""

    def request_id_of(call) -> str:
        with pytest.raises(TandemRpcError) as info:
            call()
        return info.value.request_id

    async def failed_async() -> None:
        async with AsyncTandemClient(client.settings.target) as aio:
            await aio.generate("hi", adapter="no-such-adapter", request_id="not an id")

    ids = [
        request_id_of(lambda: client.generate("hi", adapter="no-such-adapter", request_id="not an id")),
        request_id_of(lambda: list(client.stream("hi", adapter="no-such-adapter", request_id="not an id"))),
        request_id_of(lambda: asyncio.run(failed_async())),
    ]
    assert all(len(rid) == 32 and rid != "not an id" for rid in ids), ids  # the server's uuid4 hex
    assert request_id_of(lambda: client.generate("hi", adapter="no-such-adapter", request_id="trace-7")) == "trace-7"


@pytest.fixture(scope="module")
def limited(tiny_model_dir, tmp_path_factory) -> Iterator[ServerThread]:
    """One running sequence, one waiting, 64 KiB messages, and an adapters directory."""
    adapters = tmp_path_factory.mktemp("adapters")
    (adapters / "style").mkdir()
    (adapters / "style" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    engine = start_engine(tiny_model_dir, max_num_seqs=1, max_waiting=1, adapters_dir=str(adapters), max_lora_rank=8)
    thread = ServerThread(loopback(max_message_bytes=64 << 10), engine)
    yield thread
    thread.stop()
    engine.shutdown()


def test_full_queue_is_refused_at_once(limited):
    async def scenario() -> tuple[grpc.StatusCode, str, float]:
        async with AsyncTandemClient(limited.target, max_retries=0) as client:

            async def consume() -> None:
                async for _ in client.stream("Once upon a time", max_new_tokens=500, ignore_eos=True):
                    pass

            busy = [asyncio.create_task(consume()) for _ in range(2)]  # one running, one waiting
            for _ in range(500):
                stats = limited.engine.stats()
                if stats.num_running + stats.num_waiting == 2:
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError(f"the two streams never filled the engine: {stats}")
            start = time.monotonic()
            try:
                await client.generate("hi", max_new_tokens=2)
            except TandemRpcError as error:
                return error.code, error.message, time.monotonic() - start
            finally:
                for task in busy:
                    task.cancel()
            raise AssertionError("a third request was admitted")

    with held(limited.engine):  # the two streams fill the engine until they are cancelled, and only that ends them
        code, message, seconds = asyncio.run(scenario())
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry" in message
        assert seconds < 2.0  # refused, not queued until a place frees: inherent to the test
        assert wait_until(lambda: all_blocks_free(limited.engine), timeout=30)


def test_oversized_message_is_refused(limited):
    with TandemClient(limited.target, max_retries=0) as client:
        code, _ = code_of(lambda: client.generate("word " * 20_000, max_new_tokens=1))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_an_adapter_without_weights_is_a_failed_precondition(limited):
    with TandemClient(limited.target) as client:
        code, message = code_of(lambda: client.load_adapter("style"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "'style' has no adapter_model.safetensors" in message
        code, message = code_of(lambda: client.generate("hi", adapter="style"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "style" in message
        assert code_of(lambda: client.load_adapter("x", path="../../etc"))[0] == grpc.StatusCode.INVALID_ARGUMENT
