"""Every tandem.v1 call passes through here: request id, auth, error mapping, one log line
and the request metrics. Health and reflection are left alone (probes send no token).

Each call is counted in tandem:calls_received as it arrives, before grpc reads its request:
grpc ends a call whose cancel or deadline comes first, or whose request is too large,
without running its handler, so that only the difference from tandem:requests shows them.

A request that does not parse (invalid protobuf, a string field that is not UTF-8) reaches
the handler as Undecodable, so that it too is authorized, logged and counted, and answered
INVALID_ARGUMENT; a reply larger than max_reply_bytes becomes RESOURCE_EXHAUSTED here,
where it is logged, instead of failing inside grpc after the call was recorded as OK.
"""

import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError, Message

from tandem.server.api.auth import TokenTable
from tandem.server.api.call_record import CallRecord, request_id_of, set_current_call
from tandem.server.api.status_mapping import status_for
from tandem.server.errors import InvalidRequest, ResourceExhausted
from tandem.server.metrics import Metrics

log = logging.getLogger("tandem.requests")

API_PREFIX = "/tandem.v1."
REQUEST_ID_KEY = "x-request-id"
DEADLINE_SLACK_SECONDS = 0.1


@dataclass(frozen=True)
class Undecodable:
    """What a request that did not parse is handed to the handler as: why it did not."""

    reason: str


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserializer`, returning Undecodable instead of raising: grpc would answer UNKNOWN
    before any handler ran, unauthorized, unlogged and uncounted."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as exc:
            return Undecodable(str(exc))

    return deserialize


class CallInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: TokenTable | None, metrics: Metrics, max_reply_bytes: int):
        self._tokens = tokens
        self._metrics = metrics
        self._max_reply_bytes = max_reply_bytes

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(API_PREFIX):
            return handler
        self._metrics.calls_received.labels(_short(details.method)).inc()
        metadata = {m.key: m.value for m in details.invocation_metadata or ()}
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, details.method, metadata),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            self._wrap_unary(handler.unary_unary, details.method, metadata),
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _wrap_unary(self, behavior: Callable[..., Awaitable[Any]], method: str, metadata: dict[str, str]):
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            record = self._open(method, metadata)
            ended: BaseException | None = None
            try:
                await self._admit(request, record, method, metadata, context)
                return self._sized(await behavior(request, context))
            except BaseException as exc:
                ended = exc
                await self._fail(exc, record, context)
            finally:
                self._close(record, context, ended)

        return unary

    def _wrap_stream(self, behavior: Callable[..., AsyncIterator[Any]], method: str, metadata: dict[str, str]):
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            record = self._open(method, metadata)
            ended: BaseException | None = None
            try:
                await self._admit(request, record, method, metadata, context)
                async for response in behavior(request, context):
                    yield self._sized(response)
            except BaseException as exc:
                ended = exc
                await self._fail(exc, record, context)
            finally:
                self._close(record, context, ended)

        return stream

    def _open(self, method: str, metadata: dict[str, str]) -> CallRecord:
        record = CallRecord(request_id=request_id_of(metadata.get(REQUEST_ID_KEY, "")), method=_short(method), metrics=self._metrics)
        set_current_call(record)
        return record

    async def _admit(
        self, request: Any, record: CallRecord, method: str, metadata: dict[str, str], context: grpc.aio.ServicerContext
    ) -> None:
        """Sends the request id, then checks auth, so that a caller without a token learns
        nothing about its request. Within the call's try: a cancel or deadline landing on the
        send is closed and counted as any other."""
        await context.send_initial_metadata(((REQUEST_ID_KEY, record.request_id),))
        if self._tokens is not None:
            record.role = self._tokens.authorize(method, metadata)
        if isinstance(request, Undecodable):
            raise InvalidRequest(f"the request is not valid protobuf: {request.reason}")

    def _sized(self, response: Message) -> Message:
        size = response.ByteSize()
        if size > self._max_reply_bytes:
            raise ResourceExhausted(
                f"the reply would be {size} bytes, more than the server's limit of {self._max_reply_bytes} "
                "(--max-message-bytes): ask for less"
            )
        return response

    async def _fail(self, exc: BaseException, record: CallRecord, context: grpc.aio.ServicerContext) -> None:
        """Re-raises cancellation and aborts; turns every other exception into a status."""
        # An abort already carries its status; CancelledError / GeneratorExit mean the call is gone.
        if isinstance(exc, grpc.aio.AbortError) or not isinstance(exc, Exception):
            raise exc
        code, message = status_for(exc, record.request_id)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("unexpected error in %s (request id %s)", record.method, record.request_id)
        await context.abort(code, message)

    def _close(self, record: CallRecord, context: grpc.aio.ServicerContext, ended: BaseException | None) -> None:
        record.close(_final_status(context, ended))


def _short(method: str) -> str:
    """The method label of the metrics: Generate for /tandem.v1.GenerationService/Generate."""
    return method.rsplit("/", 1)[-1]


def _final_status(context: grpc.aio.ServicerContext, ended: BaseException | None) -> str:
    """The status the call ends with, as far as the server can tell from its side.

    A call the client left (cancel, deadline) ends the handler with CancelledError, or for a
    stream with GeneratorExit, and sets no code. The client's own deadline timer cancels the
    call too, and its cancel can reach the server a moment before the server's timer fires:
    a cancel within DEADLINE_SLACK_SECONDS of the deadline is the deadline.
    """
    code = context.code()
    if code is not None and code != grpc.StatusCode.OK:
        return code.name
    if (ended is not None and not isinstance(ended, Exception)) or context.cancelled():
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= DEADLINE_SLACK_SECONDS else "CANCELLED"
    return "OK"
