"""The OpenAI-compatible routes. Thin, as the gRPC servicers are: body -> convert -> the
shared generation path (admission, call record, engine) -> responses. Every failure becomes
OpenAI's error body with the status that status_mapping gives its gRPC code.

Each call is logged once and counted in tandem:requests like a gRPC call, under the method
names below, with the gRPC status name it would have had.
"""

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import grpc
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tandem.server.api import generation
from tandem.server.api.auth import TokenTable
from tandem.server.api.call_record import CallRecord, request_id_of, set_current_call
from tandem.server.api.serving_state import ServingState
from tandem.server.api.status_mapping import http_error_for, status_for
from tandem.server.engine.outputs import FinishReason, RequestOutput
from tandem.server.engine.sampling_params import SamplingParams
from tandem.server.errors import ContextLengthExceeded, InvalidRequest, NotFound, ResourceExhausted, TandemError, Unavailable, excerpt
from tandem.server.metrics import Metrics
from tandem.server.openai_api import convert, responses
from tandem.server.openai_api.convert import FieldError
from tandem.server.openai_api.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields, StreamOptions, TextPart

log = logging.getLogger("tandem.requests")

METHODS = {"/v1/completions": "Completions", "/v1/chat/completions": "ChatCompletions", "/v1/models": "ListModels"}
MODEL_PATH = "/v1/models/"  # + a model's id (a base model's may hold slashes): RetrieveModel


def method_of(path: str) -> str | None:
    """The method name a path's calls are recorded under; None outside the API."""
    return "RetrieveModel" if path.startswith(MODEL_PATH) else METHODS.get(path)
REQUEST_ID_HEADER = "x-request-id"
# What a call the server's stop cut short is told, streamed or not.
CUT_SHORT = "the server stopped before the completion was whole: retry the request"


class BodyTooLarge(ResourceExhausted):
    """A body over --max-message-bytes (RESOURCE_EXHAUSTED, as over gRPC): 413 here, which says
    the request itself is at fault, where the code's 429 would invite the same request again."""

    def __init__(self, limit: int):
        super().__init__(f"the request body is larger than the server's limit of {limit} bytes (--max-message-bytes)")


def _error_body(message: str, kind: str, code: str | None, param: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error(exc: BaseException, request_id: str) -> JSONResponse:
    """The reply to a call that failed, with OpenAI's own codes where clients act on them:
    NotFound is always the `model` (an adapter) here, and a prompt over the context is
    `context_length_exceeded`, which LiteLLM and LangChain catch to fall back on. `param`
    is the field a refusal of this front names (FieldError); null for the engine's checks."""
    error = http_error_for(exc, request_id)
    status, kind, code, param = error.status, error.type, error.code, exc.param if isinstance(exc, FieldError) else None
    if isinstance(exc, NotFound):
        code, param = "model_not_found", "model"
    elif isinstance(exc, ContextLengthExceeded):
        code = "context_length_exceeded"
    elif isinstance(exc, BodyTooLarge):
        status, kind = 413, "invalid_request_error"
    body = _error_body(error.message, kind, code, param)
    return JSONResponse(body, status_code=status, headers={REQUEST_ID_HEADER: request_id})


# Every field name of the request bodies: in a validation error's location, what is not one
# of them (nor an index) names a member of a union ("str", "list[TextPart]"), no field.
_FIELD_NAMES = frozenset(
    name for model in (CompletionRequest, ChatCompletionRequest, ChatMessage, TextPart, StreamOptions) for name in model.model_fields
)


def _validation_error(exc: RequestValidationError) -> InvalidRequest:
    """The body's first problems, and its first one's field as OpenAI's `param`
    ("messages[0].content"), where it is one."""
    problems = []
    for e in exc.errors()[:5]:
        where = ".".join(str(part) for part in e["loc"] if part != "body")
        problems.append(f"{where}: {e['msg']}" if where else e["msg"])
    message = "invalid request body: " + "; ".join(problems)
    loc = exc.errors()[0]["loc"] if exc.errors() else ()
    if loc[:1] != ("body",) or len(loc) < 2 or loc[1] not in _FIELD_NAMES:
        return InvalidRequest(message)  # not JSON, or not an object
    param = loc[1]
    for part in loc[2:]:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part in _FIELD_NAMES:
            param += f".{part}"
        else:
            break
    return FieldError(message, param)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


class AnswerUnexpected:
    """Answers an unexpected error (a bug) with the app's 500 in OpenAI's shape, through
    handler, which logs it once with the call's request id. As the handler of Exception, the
    framework's outermost middleware re-raised it after answering, and uvicorn logged it a
    second time ("Exception in ASGI application", without the request id). One that comes
    after the reply has started is left to uvicorn, which logs it and closes the connection."""

    def __init__(self, app: ASGIApp, handler: Callable[[Request, Exception], Awaitable[Response]]):
        self.app = app
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:
            if started:
                raise
            response = await self.handler(Request(scope, receive), exc)
            await response(scope, receive, send)


@dataclass
class StreamEnd:
    """How a streamed call ended: the status its record is closed with, once."""

    record: CallRecord
    status: str = "CANCELLED"


class EventStream(StreamingResponse):
    """A streamed call's server-sent events. Ending, however it ends, closes the events, then
    the call's outputs, then its record (with the status the events set). The events alone
    could not: a client that leaves before the first event makes the framework cancel the
    response before the generator's first step, so none of its finally runs, and the call was
    neither logged nor counted."""

    def __init__(
        self, events: AsyncGenerator[str, None], outputs: AsyncGenerator[RequestOutput, None], end: StreamEnd,
        headers: dict[str, str],
    ):
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self.events = events
        self.outputs = outputs
        self.end = end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.events.aclose()
            await self.outputs.aclose()
            self.end.record.close(self.end.status)


class BodyLimit:
    """Refuses a body over --max-message-bytes: its first read fails with 413 when its
    Content-Length says so (none of it is read), else the read that passes the limit does. The
    app answers that as its own refusals (BodyTooLarge). (FastAPI's own max_body_size answers a
    declared length in plain text whatever the app replies.)"""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        too_large = declared.isdigit() and int(declared) > self.limit
        read = 0

        async def counted() -> Message:
            nonlocal read
            if too_large:
                raise HTTPException(413)
            message = await receive()
            read += len(message.get("body", b""))
            if read > self.limit:
                raise HTTPException(413)
            return message

        await self.app(scope, counted, send)


def build_app(state: ServingState, tokens: TokenTable | None, metrics: Metrics, max_body_bytes: int) -> FastAPI:
    """The app for one server; state is the gRPC services' own (same engine, same drain)."""
    app = FastAPI(title="Tandem (OpenAI-compatible)", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    created = int(time.time())

    def new_record(request: Request) -> CallRecord:
        return CallRecord(request_id_of(request.headers.get(REQUEST_ID_HEADER, "")), method_of(request.url.path), metrics)

    def authorize(request: Request) -> None:
        if tokens is not None:
            tokens.authorize(request.url.path, {"authorization": request.headers.get("authorization", "")})

    async def open_call(request: Request) -> CallRecord:
        """Opens the call's record (async: it must run in the endpoint's own context), then
        checks its token before anything of the body is used."""
        record = new_record(request)
        set_current_call(record)
        request.state.record = record
        authorize(request)
        return record

    async def handle_error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, RequestValidationError):
            exc = _validation_error(exc)
        record = getattr(request.state, "record", None)
        if record is None and method_of(request.url.path) is not None:
            # Refused before open_call ran (a body that is not JSON, not UTF-8, too large): a
            # caller without a valid token learns that, not what was wrong with the body (as
            # over gRPC).
            record = new_record(request)
            try:
                authorize(request)
            except TandemError as refused:
                exc = refused
        request_id = record.request_id if record else request_id_of("")
        code, _ = status_for(exc, request_id)
        if code == grpc.StatusCode.INTERNAL:
            log.error("unexpected error in %s (request id %s)", request.url.path, request_id, exc_info=exc)
        if record is not None:
            record.close(code.name)
        return _error(exc, request_id)

    async def handle_http(request: Request, exc: HTTPException) -> Response:
        """The framework's own refusals in OpenAI's error shape: of a body (not UTF-8, too large)
        as the app's own refusals are answered; of a route (none there, wrong method) as they are."""
        if exc.status_code == 413:
            return await handle_error(request, BodyTooLarge(max_body_bytes))
        if exc.status_code == 400:
            return await handle_error(request, InvalidRequest(f"invalid request body: {exc.detail}"))
        message = f"{request.method} {request.url.path}: {exc.detail}"
        body = _error_body(message, "invalid_request_error", None)
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    # TandemError (what users cause) is answered by the framework's exception middleware;
    # Exception (a bug) by AnswerUnexpected, around it.
    app.add_exception_handler(TandemError, handle_error)
    app.add_exception_handler(RequestValidationError, handle_error)
    app.add_exception_handler(HTTPException, handle_http)
    app.add_middleware(AnswerUnexpected, handler=handle_error)

    async def token_pieces(outputs: list[RequestOutput]) -> responses.TokenPieces:
        ids = responses.token_ids_in(outputs)
        if not ids or state.engine is None:
            return {}
        return dict(zip(ids, await state.engine.token_bytes(ids)))

    async def run(
        request: Request,
        record: CallRecord,
        body: SamplingFields,
        prompts: list[str | list[int]] | list[list[dict[str, str]]],
        params: SamplingParams,
        renderer: responses.CompletionRenderer,
    ) -> Response:
        """Starts the generation (one per prompt); errors before its first output are the
        call's HTTP status."""
        base_model = state.engine.info.name if state.engine is not None else ""
        outputs = generation.generate_each(state, prompts, params, convert.adapter_of(body.model, base_model), cancel_stuck_reader=True)
        headers = {REQUEST_ID_HEADER: record.request_id}
        if body.stream:
            # The framework watches a stream's client only once it streams: a client that
            # leaves while its request still waits for a first token must abort it here.
            firsts: list[RequestOutput] = []

            async def first_output() -> None:
                firsts.append(await anext(outputs))

            if not await _unless_disconnected(request, first_output()):
                await outputs.aclose()
                record.close("CANCELLED")
                return Response(status_code=499)
            first = firsts[0]
            if first.finish_reason == FinishReason.ABORT and not first.token_ids:
                # Stopped (a drain) before anything was generated: nothing is streamed yet, so
                # a 503 the client retries, as a whole reply gets, not a 200 with empty text.
                await outputs.aclose()
                record.close("UNAVAILABLE")
                return _error(Unavailable("the server stopped before the completion began: retry the request"), record.request_id)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            end = StreamEnd(record)
            return EventStream(stream(outputs, first, renderer, include_usage, end), outputs, end, headers)
        seen: list[RequestOutput] = []

        async def collect() -> None:
            async with aclosing(outputs):
                async for out in outputs:
                    seen.append(out)

        if not await _unless_disconnected(request, collect()):
            record.close("CANCELLED")
            return Response(status_code=499)  # nobody is there to read it
        if any(out.finish_reason == FinishReason.ABORT for out in seen):
            # The server stopped before the reply was whole: a 5xx, which clients retry,
            # rather than a 200 with a finish_reason OpenAI never sends.
            record.close("UNAVAILABLE")
            return _error(Unavailable(CUT_SHORT), record.request_id)
        choices = responses.Choices(seen, params.n, len(prompts))  # n is in range now: the engine took the request
        reply = renderer.whole(choices, await token_pieces(seen))
        record.close("OK")
        return JSONResponse(reply, headers=headers)

    async def stream(
        outputs: AsyncIterator[RequestOutput], first: RequestOutput, renderer: responses.CompletionRenderer, include_usage: bool,
        end: StreamEnd,
    ) -> AsyncGenerator[str, None]:
        """SSE events until [DONE]; an error after the first event ends the stream with an
        error event, as OpenAI's servers do, and so does the server's stop (an abort): its text
        is sent, but no finish, usage or [DONE], which would pass the part for the whole. With
        include_usage each chunk has a usage, null until the last. end.status is how the
        stream ended (EventStream closes the record with it)."""
        record = end.record
        progress = responses.Progress(renderer.choices)
        try:
            async with aclosing(outputs):
                out: RequestOutput | None = first
                while out is not None:
                    pieces = await token_pieces([out])
                    for chunk in renderer.chunks(out, pieces, progress):
                        yield _sse({**chunk, "usage": None} if include_usage else chunk)
                    if out.finish_reason == FinishReason.ABORT:
                        raise Unavailable(CUT_SHORT)
                    progress.add(out)
                    out = await anext(outputs, None)
            if include_usage:
                yield _sse({**renderer.base, "choices": [], "usage": progress.usage()})
            yield "data: [DONE]\n\n"
            end.status = "OK"
        except Exception as exc:
            error = http_error_for(exc, record.request_id)
            end.status = status_for(exc, record.request_id)[0].name
            if error.status == 500:
                log.error("unexpected error in a stream (request id %s)", record.request_id, exc_info=exc)
            yield _sse(_error_body(error.message, error.type, error.code))

    def served_name(model: str) -> str:
        """The `model` a reply names: the one asked for, the base model's when none was (an
        empty name broke clients' cost tracking, which reads it)."""
        return model or (state.engine.info.name if state.engine is not None else "")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, record: CallRecord = Depends(open_call)) -> Response:
        prompts = convert.completion_prompts(body)
        renderer = responses.CompletionRenderer(f"cmpl-{record.request_id}", served_name(body.model), body.n, len(prompts))
        return await run(request, record, body, prompts, convert.completion_params(body), renderer)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request, record: CallRecord = Depends(open_call)) -> Response:
        renderer = responses.ChatRenderer(f"chatcmpl-{record.request_id}", served_name(body.model), body.n)
        return await run(request, record, body, [convert.chat_messages(body)], convert.chat_params(body), renderer)

    async def model_entries() -> list[dict]:
        """The base model, then every adapter or router a request may name, as vLLM lists
        LoRA adapters (read off the event loop: it lists the adapters directory)."""
        with state.admit() as engine:
            base = engine.info.name
            names = await asyncio.to_thread(state.catalog.servable_names)
        data = [{"id": base, "object": "model", "created": created, "owned_by": "tandem", "root": base, "parent": None, "max_model_len": engine.info.max_model_len}]
        return data + [
            {"id": name, "object": "model", "created": created, "owned_by": "tandem", "root": name, "parent": base}
            for name in sorted(names)
        ]

    @app.get("/v1/models")
    async def models(record: CallRecord = Depends(open_call)) -> Response:
        data = await model_entries()
        record.close("OK")
        return JSONResponse({"object": "list", "data": data}, headers={REQUEST_ID_HEADER: record.request_id})

    @app.get(MODEL_PATH + "{model_id:path}")
    async def model(model_id: str, record: CallRecord = Depends(open_call)) -> Response:
        """One entry of the list (the SDK's models.retrieve)."""
        found = next((m for m in await model_entries() if m["id"] == model_id), None)
        if found is None:
            raise NotFound(f"no model or adapter {excerpt(model_id)} is served here: GET /v1/models lists them")
        record.close("OK")
        return JSONResponse(found, headers={REQUEST_ID_HEADER: record.request_id})

    @app.get("/health")
    async def health() -> Response:
        """200 once the model is loaded and while not draining (readiness), else 503; 503 too
        once the engine thread has stopped on an error (gRPC health says NOT_SERVING then).
        No token is needed, so the body says what a refused call is told, never the engine's
        error itself (its text is for the log)."""
        try:
            state.check_ready()
        except Unavailable as exc:
            return _error(exc, request_id_of(""))
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        """With tokens, any role's token: on the API port the metrics name adapters in use and
        the jobs' losses (the metrics port is for the cluster's scraper, behind its policy)."""
        authorize(request)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def _unless_disconnected(request: Request, work: Coroutine[Any, Any, None]) -> bool:
    """Runs work to its end (True), or cancels it when the client disconnects first (False):
    a generation nobody waits for is aborted, as a cancelled gRPC call's is. (Once a stream
    streams, the framework cancels it when its client has gone.)"""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return False
    task.result()
    return True


async def _disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
