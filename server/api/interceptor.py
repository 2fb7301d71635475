"""Every tandem.v1 call passes through here: request id, auth, error mapping, one log line
and the request metrics. Health and reflection are left alone (probes send no token)."""

import logging
import re
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc

from server.api.auth import TokenTable
from server.api.call_record import CallRecord, reset_current_call, set_current_call
from server.api.status_mapping import status_for
from server.metrics import Metrics

log = logging.getLogger("tandem.requests")

API_PREFIX = "/tandem.v1."
REQUEST_ID_KEY = "x-request-id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/-]{1,128}")


def _request_id(metadata: dict[str, str]) -> str:
    given = metadata.get(REQUEST_ID_KEY, "")
    return given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


class CallInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: TokenTable | None, metrics: Metrics):
        self._tokens = tokens
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(API_PREFIX):
            return handler
        metadata = {m.key: m.value for m in details.invocation_metadata or ()}
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, details.method, metadata),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            self._wrap_unary(handler.unary_unary, details.method, metadata),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wrap_unary(self, behavior: Callable[..., Awaitable[Any]], method: str, metadata: dict[str, str]):
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            record, token = await self._open(method, metadata, context)
            ended: BaseException | None = None
            try:
                self._authorize(method, metadata)
                return await behavior(request, context)
            except BaseException as exc:
                ended = exc
                await self._fail(exc, record, context)
            finally:
                self._close(record, context, token, ended)

        return unary

    def _wrap_stream(self, behavior: Callable[..., AsyncIterator[Any]], method: str, metadata: dict[str, str]):
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            record, token = await self._open(method, metadata, context)
            ended: BaseException | None = None
            try:
                self._authorize(method, metadata)
                async for response in behavior(request, context):
                    yield response
            except BaseException as exc:
                ended = exc
                await self._fail(exc, record, context)
            finally:
                self._close(record, context, token, ended)

        return stream

    async def _open(self, method: str, metadata: dict[str, str], context: grpc.aio.ServicerContext) -> tuple[CallRecord, object]:
        record = CallRecord(request_id=_request_id(metadata), method=method.rsplit("/", 1)[-1], metrics=self._metrics)
        await context.send_initial_metadata(((REQUEST_ID_KEY, record.request_id),))
        return record, set_current_call(record)

    def _authorize(self, method: str, metadata: dict[str, str]) -> None:
        if self._tokens is not None:
            self._tokens.authorize(method, metadata)

    async def _fail(self, exc: BaseException, record: CallRecord, context: grpc.aio.ServicerContext) -> None:
        """Re-raises cancellation and aborts; turns every other exception into a status."""
        # An abort already carries its status; CancelledError / GeneratorExit mean the call is gone.
        if isinstance(exc, grpc.aio.AbortError) or not isinstance(exc, Exception):
            raise exc
        code, message = status_for(exc, record.request_id)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("unexpected error in %s (request id %s)", record.method, record.request_id)
        await context.abort(code, message)

    def _close(self, record: CallRecord, context: grpc.aio.ServicerContext, token: object, ended: BaseException | None) -> None:
        reset_current_call(token)
        status = _final_status(context, ended)
        latency = time.monotonic() - record.started
        self._metrics.requests.labels(record.method, status, record.finish_reason).inc()
        if record.is_generation and status == "OK":
            self._metrics.e2e_request_latency.observe(latency)
            self._metrics.prompt_tokens.inc(record.prompt_tokens)
            self._metrics.generation_tokens.inc(record.generated_tokens)
            self._metrics.request_success.labels(record.finish_reason).inc()
        log.info(
            "request",
            extra={
                "fields": {
                    "request_id": record.request_id,
                    "method": record.method,
                    "status": status,
                    "adapter": record.adapter,
                    "prompt_tokens": record.prompt_tokens,
                    "generated_tokens": record.generated_tokens,
                    "finish_reason": record.finish_reason,
                    "ttft_ms": None if record.first_token_at is None else round((record.first_token_at - record.started) * 1000, 1),
                    "latency_ms": round(latency * 1000, 1),
                }
            },
        )


def _final_status(context: grpc.aio.ServicerContext, ended: BaseException | None) -> str:
    """The status the call ends with, as far as the server can tell from its side.

    A call the client left (cancel, deadline) ends the handler with CancelledError, or for a
    stream with GeneratorExit, and sets no code.
    """
    code = context.code()
    if code is not None and code != grpc.StatusCode.OK:
        return code.name
    if (ended is not None and not isinstance(ended, Exception)) or context.cancelled():
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    return "OK"
