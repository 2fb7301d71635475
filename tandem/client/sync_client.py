"""The blocking Python client."""

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
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


class TandemClient:
    """Talks to one Tandem server. Use as a context manager or call close().

        with TandemClient("localhost:50051") as client:
            print(client.generate("What is the capital of France?", max_new_tokens=32).text)
    """

    def __init__(self, target: str = "localhost:50051", **settings: Any):
        self.settings = ConnectionSettings(target=target, **settings)
        s = self.settings
        if s.uses_tls:
            self._channel = grpc.secure_channel(s.target, s.credentials(), options=s.options())
        else:
            self._channel = grpc.insecure_channel(s.target, options=s.options())
        self._generation = generation_pb2_grpc.GenerationServiceStub(self._channel)
        self._adapters = adapters_pb2_grpc.AdaptersServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._stubs: dict[type, Any] = {}

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "TandemClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unary(
        self, method: Callable, request: Any, timeout: float | None, request_id: str | None, idempotent: bool = True
    ) -> tuple[Any, str]:
        """Calls with the deadline, metadata and retries (of a call that is not idempotent, only
        when it never reached a server); returns (response, server request id)."""
        request_id = new_request_id(request_id)
        attempts = Attempts(self.settings, self.settings.timeout if timeout is None else timeout)
        while True:
            try:
                response, call = method.with_call(
                    request, timeout=attempts.deadline.remaining(), metadata=self.settings.metadata(request_id)
                )
                return response, request_id_from(call.initial_metadata(), request_id)
            except grpc.RpcError as error:
                delay = attempts.pause_after(error, request_id, retry=idempotent or never_sent(error))
            time.sleep(delay)

    def _stub(self, kind: type) -> Any:
        if kind not in self._stubs:
            self._stubs[kind] = kind(self._channel)
        return self._stubs[kind]

    def _call(self, call: Call[T], timeout: float | None) -> T:
        response, _ = self._unary(getattr(self._stub(call.stub), call.method), call.request, timeout, None, call.idempotent)
        return call.result(response)

    def _watch(self, call: Call[T], timeout: float | None) -> Iterator[T]:
        """Runs a server stream whose every (re)connection starts with the whole current state,
        so it reconnects on UNAVAILABLE even after responses arrived. Such a stream may last
        hours: no deadline unless `timeout` is given."""
        request_id = new_request_id(None)
        attempts = Attempts(self.settings, timeout, watch=True)
        method = getattr(self._stub(call.stub), call.method)
        while True:
            responses = method(call.request, timeout=attempts.deadline.remaining(), metadata=self.settings.metadata(request_id))
            try:
                for response in responses:
                    attempts.responded()
                    yield call.result(response)
                return
            except grpc.RpcError as error:
                delay = attempts.pause_after(error, request_id)
            finally:
                responses.cancel()
            time.sleep(delay)

    def generate(
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
        """Generates a whole completion for a prompt, chat messages or token ids (exactly one)."""
        request = convert.generate_request(prompt, messages, prompt_token_ids, adapter, options)
        response, rid = self._unary(self._generation.Generate, request, timeout, request_id)
        return convert.completion(response, rid)

    def stream(
        self,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        adapter: str | Mapping[str, float] = "",
        timeout: float | None = None,
        request_id: str | None = None,
        **options: Unpack[SamplingOptions],
    ) -> Iterator[StreamChunk]:
        """Yields chunks as they are generated. Leaving the loop early cancels the request
        on the server. Retries only while no chunk has arrived."""
        request = convert.generate_request(prompt, messages, prompt_token_ids, adapter, options, generation_pb2.GenerateStreamRequest)
        request_id = new_request_id(request_id)
        attempts = Attempts(self.settings, self.settings.timeout if timeout is None else timeout)
        while True:
            call = self._generation.GenerateStream(
                request, timeout=attempts.deadline.remaining(), metadata=self.settings.metadata(request_id)
            )
            received = False
            try:
                for response in call:
                    received = True
                    yield convert.stream_chunk(response)
                return
            except grpc.RpcError as error:
                delay = attempts.pause_after(error, request_id, retry=not received)
            finally:
                call.cancel()
            time.sleep(delay)

    def tokenize(self, text: str | None = None, *, messages: Messages | None = None, timeout: float | None = None) -> list[int]:
        response, _ = self._unary(self._generation.Tokenize, convert.tokenize_request(text, messages), timeout, None)
        return list(response.token_ids)

    def model_info(self, timeout: float | None = None) -> ModelInfo:
        response, _ = self._unary(self._generation.GetModelInfo, generation_pb2.GetModelInfoRequest(), timeout, None)
        return convert.model_info(response)

    def list_adapters(self, timeout: float | None = None) -> list[AdapterInfo]:
        response, _ = self._unary(self._adapters.ListAdapters, adapters_pb2.ListAdaptersRequest(), timeout, None)
        return [convert.adapter_info(a) for a in response.adapters]

    def load_adapter(self, name: str, path: str = "", timeout: float | None = None) -> AdapterInfo:
        """Registers the adapter at <server --adapters-dir>/<path or name>; needs an admin token."""
        request = adapters_pb2.LoadAdapterRequest(name=name, path=path)
        response, _ = self._unary(self._adapters.LoadAdapter, request, timeout, None)
        return convert.adapter_info(response.adapter)

    def merge_adapters(
        self, name: str, adapters: Mapping[str, float] | Sequence[str], method: str, rank: int = 0, *,
        density: float | None = None, gamma: float | None = None, seed: int | None = None, timeout: float | None = None,
    ) -> MergeResult:
        """Merges adapters (names, or name -> weight) into a new adapter `name` by method
        linear, ties, dare_ties or breadcrumbs, at `rank` (0 = the inputs' largest); admin."""
        request = convert.merge_request(name, adapters, method, rank, density=density, gamma=gamma, seed=seed)
        response, _ = self._unary(self._adapters.MergeAdapters, request, timeout, None, idempotent=False)
        return convert.merge_result(response)

    def compress_adapter(self, name: str, source: str, density: float | None = None, timeout: float | None = None) -> AdapterInfo:
        """Publishes the ComPEFT-compressed form of adapter `source` as `name` (density unset = 0.5); admin."""
        request = adapters_pb2.CompressAdapterRequest(name=name, source=source, **({} if density is None else {"density": density}))
        response, _ = self._unary(self._adapters.CompressAdapter, request, timeout, None, idempotent=False)
        return convert.adapter_info(response.adapter)

    def unload_adapter(self, name: str, timeout: float | None = None) -> None:
        self._unary(self._adapters.UnloadAdapter, adapters_pb2.UnloadAdapterRequest(name=name), timeout, None, idempotent=False)

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """"SERVING", "NOT_SERVING" or "SERVICE_UNKNOWN"; "" asks about the process, a
        service name ("tandem.v1.GenerationService") about readiness."""
        deadline = Deadline(self.settings.timeout if timeout is None else timeout)  # inf: none, as for every call
        try:
            response = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=deadline.remaining())
        except grpc.RpcError as error:
            raise TandemRpcError.wrap(error, None) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def create_finetune_job(
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
        """Queues a job that trains `adapter` (a new version if it exists) on exactly one of
        training_file (a JSONL file in the server's --data-dir) and training_data (JSONL, or
        its lines as dicts); base_adapter continues a served adapter; router trains the gates
        of a router named `adapter` over its experts instead (lines may carry "task"). The
        server checks the whole dataset first: a bad line fails this call, not the job. Needs
        an admin token."""
        call = convert.create_finetune_job(adapter, training_file, training_data, base_adapter, lora, hyperparameters, router)
        return self._call(call, timeout)

    def get_finetune_job(self, job_id: str, timeout: float | None = None) -> FinetuneJob:
        return self._call(convert.get_finetune_job(job_id), timeout)

    def list_finetune_jobs(self, timeout: float | None = None) -> list[FinetuneJob]:
        """Every job, newest first, a page per call (timeout: each call's)."""
        jobs, token = [], ""
        while True:
            page, token = self._call(convert.list_finetune_jobs(token), timeout)
            jobs += page
            if not token:
                return jobs

    def cancel_finetune_job(self, job_id: str, timeout: float | None = None) -> FinetuneJob:
        """Stops a queued or running job; nothing is published. FAILED_PRECONDITION once it ended."""
        return self._call(convert.cancel_finetune_job(job_id), timeout)

    def watch_finetune_job(self, job_id: str, timeout: float | None = None) -> Iterator[FinetuneJob]:
        """Yields the job now, then after every change (status, each optimizer step), and
        ends after the snapshot in which it ended. timeout None: no deadline (jobs take hours)."""
        return self._watch(convert.watch_finetune_job(job_id), timeout)
