"""The asyncio Python client; the same calls as TandemClient, awaitable."""

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, TypeVar, Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.client import convert
from tandem.client.connection import Attempts, ConnectionSettings, Deadline, never_sent, new_request_id, request_id_from
from tandem.client.convert import Call, Messages, TrainingData
from tandem.client.errors import TandemRpcError
from tandem.client.types import (
    AdapterInfo, Completion, FinetuneJob, Hyperparameters, LoraOptions, MergeResult, ModelInfo, RouterTraining, SamplingOptions,
    StreamChunk,
)
from tandem.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc

T = TypeVar("T")


class AsyncTandemClient:
    """Talks to one Tandem server from asyncio code. Create it inside the running loop.

        async with AsyncTandemClient("localhost:50051") as client:
            async for chunk in client.stream("Tell me a story", max_new_tokens=64):
                print(chunk.text, end="")
    """

    def __init__(self, target: str = "localhost:50051", **settings: Any):
        self.settings = ConnectionSettings(target=target, **settings)
        s = self.settings
        if s.uses_tls:
            self._channel = grpc.aio.secure_channel(s.target, s.credentials(), options=s.options())
        else:
            self._channel = grpc.aio.insecure_channel(s.target, options=s.options())
        self._generation = generation_pb2_grpc.GenerationServiceStub(self._channel)
        self._adapters = adapters_pb2_grpc.AdaptersServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._stubs: dict[type, Any] = {}

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncTandemClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _unary(
        self, method: Callable, request: Any, timeout: float | None, request_id: str | None, idempotent: bool = True
    ) -> tuple[Any, str]:
        """As TandemClient._unary."""
        request_id = new_request_id(request_id)
        attempts = Attempts(self.settings, self.settings.timeout if timeout is None else timeout)
        while True:
            call = method(request, timeout=attempts.deadline.remaining(), metadata=self.settings.metadata(request_id))
            try:
                response = await call
                return response, request_id_from(await call.initial_metadata(), request_id)
            except grpc.RpcError as error:
                delay = attempts.pause_after(error, request_id, retry=idempotent or never_sent(error))
            await asyncio.sleep(delay)

    def _stub(self, kind: type) -> Any:
        if kind not in self._stubs:
            self._stubs[kind] = kind(self._channel)
        return self._stubs[kind]

    async def _call(self, call: Call[T], timeout: float | None) -> T:
        response, _ = await self._unary(getattr(self._stub(call.stub), call.method), call.request, timeout, None, call.idempotent)
        return call.result(response)

    async def _watch(self, call: Call[T], timeout: float | None) -> AsyncIterator[T]:
        """As TandemClient._watch: reconnects on UNAVAILABLE at any point; no deadline unless given."""
        request_id = new_request_id(None)
        attempts = Attempts(self.settings, timeout, watch=True)
        method = getattr(self._stub(call.stub), call.method)
        while True:
            responses = method(call.request, timeout=attempts.deadline.remaining(), metadata=self.settings.metadata(request_id))
            try:
                async for response in responses:
                    attempts.responded()
                    yield call.result(response)
                return
            except grpc.RpcError as error:
                delay = attempts.pause_after(error, request_id)
            finally:
                responses.cancel()
            await asyncio.sleep(delay)

    async def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        adapter: str | Mapping[str, float] = "",
        timeout: float | None = None,
        request_id: str | None = None,
        **options: Unpack[SamplingOptions],
    ) -> Completion:
        request = convert.generate_request(prompt, messages, prompt_token_ids, adapter, options)
        response, rid = await self._unary(self._generation.Generate, request, timeout, request_id)
        return convert.completion(response, rid)

    async def stream(
        self,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        adapter: str | Mapping[str, float] = "",
        timeout: float | None = None,
        request_id: str | None = None,
        **options: Unpack[SamplingOptions],
    ) -> AsyncIterator[StreamChunk]:
        """Yields chunks as they are generated; closing the iterator cancels the request."""
        request = convert.generate_request(prompt, messages, prompt_token_ids, adapter, options, generation_pb2.GenerateStreamRequest)
        request_id = new_request_id(request_id)
        attempts = Attempts(self.settings, self.settings.timeout if timeout is None else timeout)
        while True:
            call = self._generation.GenerateStream(
                request, timeout=attempts.deadline.remaining(), metadata=self.settings.metadata(request_id)
            )
            received = False
            try:
                async for response in call:
                    received = True
                    yield convert.stream_chunk(response)
                return
            except grpc.RpcError as error:
                delay = attempts.pause_after(error, request_id, retry=not received)
            finally:
                call.cancel()
            await asyncio.sleep(delay)

    async def tokenize(self, text: str | None = None, *, messages: Messages | None = None, timeout: float | None = None) -> list[int]:
        response, _ = await self._unary(self._generation.Tokenize, convert.tokenize_request(text, messages), timeout, None)
        return list(response.token_ids)

    async def model_info(self, timeout: float | None = None) -> ModelInfo:
        response, _ = await self._unary(self._generation.GetModelInfo, generation_pb2.GetModelInfoRequest(), timeout, None)
        return convert.model_info(response)

    async def list_adapters(self, timeout: float | None = None) -> list[AdapterInfo]:
        response, _ = await self._unary(self._adapters.ListAdapters, adapters_pb2.ListAdaptersRequest(), timeout, None)
        return [convert.adapter_info(a) for a in response.adapters]

    async def load_adapter(self, name: str, path: str = "", timeout: float | None = None) -> AdapterInfo:
        request = adapters_pb2.LoadAdapterRequest(name=name, path=path)
        response, _ = await self._unary(self._adapters.LoadAdapter, request, timeout, None)
        return convert.adapter_info(response.adapter)

    async def merge_adapters(
        self, name: str, adapters: Mapping[str, float] | Sequence[str], method: str, rank: int = 0, *,
        density: float | None = None, gamma: float | None = None, seed: int | None = None, timeout: float | None = None,
    ) -> MergeResult:
        """Merges adapters (names, or name -> weight) into a new adapter `name` by method
        linear, ties, dare_ties or breadcrumbs, at `rank` (0 = the inputs' largest); admin."""
        request = convert.merge_request(name, adapters, method, rank, density=density, gamma=gamma, seed=seed)
        response, _ = await self._unary(self._adapters.MergeAdapters, request, timeout, None, idempotent=False)
        return convert.merge_result(response)

    async def compress_adapter(self, name: str, source: str, density: float | None = None, timeout: float | None = None) -> AdapterInfo:
        """Publishes the ComPEFT-compressed form of adapter `source` as `name` (density unset = 0.5); admin."""
        request = adapters_pb2.CompressAdapterRequest(name=name, source=source, **({} if density is None else {"density": density}))
        response, _ = await self._unary(self._adapters.CompressAdapter, request, timeout, None, idempotent=False)
        return convert.adapter_info(response.adapter)

    async def unload_adapter(self, name: str, timeout: float | None = None) -> None:
        await self._unary(self._adapters.UnloadAdapter, adapters_pb2.UnloadAdapterRequest(name=name), timeout, None, idempotent=False)

    async def health(self, service: str = "", timeout: float | None = None) -> str:
        deadline = Deadline(self.settings.timeout if timeout is None else timeout)  # inf: none, as for every call
        try:
            response = await self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=deadline.remaining())
        except grpc.RpcError as error:
            raise TandemRpcError.wrap(error, None) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def create_finetune_job(
        self,
        adapter: str,
        *,
        training_file: str | None = None,
        training_data: TrainingData | None = None,
        base_adapter: str = "",
        lora: LoraOptions | None = None,
        hyperparameters: Hyperparameters | None = None,
        router: RouterTraining | None = None,
        timeout: float | None = None,
    ) -> FinetuneJob:
        """As TandemClient.create_finetune_job."""
        call = convert.create_finetune_job(adapter, training_file, training_data, base_adapter, lora, hyperparameters, router)
        return await self._call(call, timeout)

    async def get_finetune_job(self, job_id: str, timeout: float | None = None) -> FinetuneJob:
        return await self._call(convert.get_finetune_job(job_id), timeout)

    async def list_finetune_jobs(self, timeout: float | None = None) -> list[FinetuneJob]:
        """Every job, newest first, a page per call (timeout: each call's)."""
        jobs, token = [], ""
        while True:
            page, token = await self._call(convert.list_finetune_jobs(token), timeout)
            jobs += page
            if not token:
                return jobs

    async def cancel_finetune_job(self, job_id: str, timeout: float | None = None) -> FinetuneJob:
        return await self._call(convert.cancel_finetune_job(job_id), timeout)

    def watch_finetune_job(self, job_id: str, timeout: float | None = None) -> AsyncIterator[FinetuneJob]:
        """As TandemClient.watch_finetune_job: `async for job in client.watch_finetune_job(id)`."""
        return self._watch(convert.watch_finetune_job(job_id), timeout)
