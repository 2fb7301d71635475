"""Drive the engine from a background thread and stream its outputs into asyncio.

The event loop never runs model code: submissions and aborts go through a thread-safe inbox,
the engine thread steps whenever there is work, and a step's outputs are handed to their
requests' asyncio queues in one call_soon_threadsafe per event loop (one wake-up of the loop
per step, not one per stream). A reader that falls behind (a busy loop, a slow client) gets
the increments that piled up as one, as vLLM's output collector does: each message costs
the loop far more than its tokens. Leaving a stream early aborts its request, so a client
that disconnects frees its KV blocks within one iteration.

The capacity counts the requests the engine has or is about to have: a stream whose request
is over (finished, failed, stopped) no longer counts, though its reader has yet to take the
end, which a client that stopped reading may never let it do.
"""

import asyncio
import logging
import queue
import threading
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from tandem.server.adapters.mixture import Mixture
from tandem.server.adapters.peft_format import LoRAAdapter
from tandem.server.adapters.router_format import Router
from tandem.server.config import EngineConfig
from tandem.server.engine.chat import check_messages, render_chat
from tandem.server.engine.detokenizer import decode_text
from tandem.server.engine.llm_engine import Engine, StepFailed, use_device
from tandem.server.out_of_memory import out_of_memory
from tandem.server.engine.outputs import EngineStats, FinishReason, ModelInfo, RequestOutput
from tandem.server.engine.passing_thread import in_passing_thread
from tandem.server.engine.sampling_params import SamplingParams
from tandem.server.engine.token_bytes import TokenBytes, piece_text
from tandem.server.errors import ContextLengthExceeded, InvalidRequest, NotFound, ResourceExhausted, TandemError, Unavailable, excerpt
from tandem.server.finetune.jobs import JobManager

log = logging.getLogger(__name__)

# A reader this many outputs behind per completion has stopped reading (gRPC's own buffers
# absorb far more before a stream's handler waits); its request is stopped rather than
# buffered without bound.
MAX_UNREAD_OUTPUTS = 256
# No token of the tokenizers we serve spans this many characters: a longer text cannot fit
# the context, so it is refused before any tokenizing.
MAX_CHARS_PER_TOKEN = 32
# Early aborts remembered for requests that have not been queued yet (a drain's, one per call).
MAX_EARLY_ABORTS = 4096
# A reader stopped for falling behind that has still not taken its stream's end this long
# after is stuck, not slow: its client reads nothing, so the front's send of an earlier output
# waits on flow control for good. It is cancelled, which ends the call (its connection
# closed, its admission released). Until then a slow reader gets the stop's explanation.
STUCK_READER_SECONDS = 10.0


@dataclass
class _Stream:
    """A request's outputs on their way to its reader. delivered is counted by the engine
    thread, read by the reader's loop: each counter has one writer. items, waiter and reader
    are touched only on the reader's loop; held, started and finished only on the engine
    thread; counted only under AsyncEngine._lock."""

    loop: asyncio.AbstractEventLoop
    completions: int = 1  # n: each step delivers an output per completion
    items: deque = field(default_factory=deque)
    waiter: asyncio.Future | None = None
    reader: asyncio.Task | None = None  # the task that last waited for items
    delivered: int = 0
    read: int = 0
    # Per completion index: the increments held back until stream_interval tokens are due.
    held: dict[int, RequestOutput] = field(default_factory=dict)
    started: set[int] = field(default_factory=set)
    finished: int = 0  # completions whose last output was delivered
    counted: bool = True  # against the capacity: until its request is over or its reader has left
    cancel_stuck_reader: bool = False  # AsyncEngine.generate's

    @property
    def unread(self) -> int:
        return self.delivered - self.read

    def ends(self, item: RequestOutput | Exception) -> bool:
        """Whether item ends the request: an error, or the last completion's last output."""
        if isinstance(item, Exception):
            return True
        self.finished += item.finished
        return self.finished >= self.completions

    def due(self, out: RequestOutput, interval: int) -> RequestOutput | None:
        """out joined with what was held for its completion if it is to be sent now (its
        completion's first output, a finished one, or interval tokens), else None (held)."""
        earlier = self.held.pop(out.index, None)
        if earlier is not None:
            out = earlier.followed_by(out)
        if out.finished or out.index not in self.started or len(out.token_ids) >= interval:
            self.started.add(out.index)
            return out
        self.held[out.index] = out
        return None

    def release_held(self) -> list[RequestOutput]:
        """What is held, to be sent before an error ends the stream."""
        held = list(self.held.values())
        self.held.clear()
        return held

    def put(self, item: RequestOutput | Exception) -> None:
        self.items.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def take(self) -> list[RequestOutput | Exception]:
        """Everything delivered and not yet read, waiting for at least one item."""
        self.reader = asyncio.current_task()
        while not self.items:
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        items = list(self.items)
        self.items.clear()
        self.read += len(items)
        return items

    def end_stuck_reader(self) -> None:
        """Cancels the reader if the stream's end is still unread: it has not come back for
        it since it was stopped, and would hold its call open for as long as its client does."""
        if self.cancel_stuck_reader and self.items and self.reader is not None:
            self.reader.cancel()


def _coalesced(items: list[RequestOutput | Exception]) -> list[RequestOutput | Exception]:
    """items with each completion's consecutive increments joined into one, in order; an
    error ends the list (nothing after it is read)."""
    joined: dict[int, RequestOutput] = {}
    for item in items:
        if isinstance(item, Exception):
            return [*joined.values(), item]
        earlier = joined.get(item.index)
        joined[item.index] = item if earlier is None else earlier.followed_by(item)
    return list(joined.values())


@dataclass(frozen=True)
class _Add:
    """Inbox command: queue a request (adapter: the exact version(s) it runs with)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: LoRAAdapter | Router | Mixture | None


@dataclass(frozen=True)
class _Abort:
    """Inbox command: stop a request and free what it holds."""

    request_id: str


class AsyncEngine:
    def __init__(self, config: EngineConfig, engine: Engine | None = None):
        self.config = config
        self.engine = engine if engine is not None else in_passing_thread(Engine.from_config, config)
        self._token_bytes = TokenBytes(self.engine.tokenizer)
        self._inbox: queue.SimpleQueue[_Add | _Abort] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._counted = 0  # streams counted against the capacity (_Stream.counted)
        self._lock = threading.Lock()
        # Deliveries of the engine thread's current pass, posted together by _flush.
        self._pending: list[tuple[_Stream, RequestOutput | Exception]] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        # Requests aborted before they were queued (abort), in the order they came.
        self._aborted_early: dict[str, bool] = {}
        # What stopped the engine thread, if an error escaped it; then nothing is served.
        self.failure: Exception | None = None
        # Called (on the engine thread) when it stops on such an error: readiness and
        # liveness go off, so the replica leaves the load balancer and is restarted.
        self.on_failure: Callable[[], None] | None = None
        # Time-sliced training waits until then while inference has work (timeslice_share).
        self._training_due = 0.0
        self.jobs: JobManager | None = None
        if config.data_dir is not None:
            self.jobs = JobManager(self.engine, config.data_dir, config.max_training_file_bytes, wake=self._wake.set)

    @property
    def info(self) -> ModelInfo:
        return self.engine.info

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="tandem-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop the engine thread; requests still in flight end with Unavailable."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:
            stream.loop.call_soon_threadsafe(stream.put, Unavailable("the server is shutting down"))
        if self.jobs is not None:
            self.jobs.close()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text).input_ids

    def decode(self, token_ids: list[int]) -> str:
        return decode_text(self.tokenizer, token_ids)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        """Render chat messages with the model's template, ready for the assistant's turn."""
        text = render_chat(self.tokenizer, messages, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    async def encode(self, prompt: "str | list[dict[str, str]]") -> list[int]:
        """The tokens of a text, or of chat messages rendered with the chat template.

        Checked and capped first, then tokenized off the event loop: megabytes of text take
        seconds, which would stall every other call, health probes included."""
        if isinstance(prompt, str):
            self._check_length(len(prompt), "the text")
            return await asyncio.to_thread(self.tokenize, prompt)
        check_messages(prompt)
        self._check_length(sum(len(m["content"]) for m in prompt), "the messages' text")
        return await asyncio.to_thread(self.apply_chat_template, prompt)

    async def token_bytes(self, token_ids: list[int]) -> list[bytes]:
        """Each token's own bytes (server/engine/token_bytes.py), off the event loop."""
        return await asyncio.to_thread(self._token_bytes, token_ids)

    async def token_texts(self, token_ids: list[int]) -> list[str]:
        """Each token's text on its own: its bytes as UTF-8, U+FFFD for part of a character."""
        return [piece_text(piece) for piece in await self.token_bytes(token_ids)]

    def _check_length(self, chars: int, what: str) -> None:
        limit = self.info.max_model_len * MAX_CHARS_PER_TOKEN
        if chars > limit:
            raise ContextLengthExceeded(
                f"{what} is {chars} characters long; no more than {limit} can fit the maximum context length of "
                f"{self.info.max_model_len} tokens: shorten it"
            )

    async def generate(
        self,
        prompt: "str | Sequence[int] | list[dict[str, str]]",
        params: SamplingParams,
        request_id: str,
        adapter: str | None = None,
        mixture: list[tuple[str, float]] | None = None,
        top_experts: bool = False,
        cancel_stuck_reader: bool = False,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs for a text, token ids, or chat messages; errors are
        raised before the first output. With params.n > 1 the n completions' outputs
        interleave (RequestOutput.index tells them apart); the stream ends when all have.
        mixture: (adapter, weight) pairs served as one weighted sum, instead of adapter.
        top_experts: the caller wants each token's top expert, which only a router has.
        cancel_stuck_reader: a reader stopped for falling behind that has not taken its end
        STUCK_READER_SECONDS later is cancelled. HTTP's: that closes its connection. Not
        gRPC's: grpc sends a cancelled handler's client no status, so one that came back to
        read would wait for its deadline, or for good, where it now reads the stop's error."""
        if self._thread is None or self._stopping:
            raise Unavailable("the engine is not running (starting up or shutting down): retry shortly")
        self._check_alive()
        if adapter and mixture:
            raise InvalidRequest("name one adapter or a mixture of adapters, not both")
        lora = None
        if adapter or mixture:
            if self.engine.registry is None:
                shown = excerpt(adapter or mixture[0][0])
                raise NotFound(f"adapter {shown} not found: the server has no adapters directory (--adapters-dir)")
            # A first use reads the adapter from disk: keep that off the event loop.
            if mixture:
                lora = await asyncio.to_thread(self.engine.registry.mixture, mixture)
            else:
                lora = await asyncio.to_thread(self.engine.registry.get, adapter)
        if top_experts and not isinstance(lora, Router):
            what = "the base model" if lora is None else f"{excerpt(adapter)} is an adapter" if adapter else "a mixture"
            raise InvalidRequest(f"return_top_experts needs a router in adapter, and {what} has no experts to name: drop the flag or name a router")
        is_text = isinstance(prompt, str) or (bool(prompt) and isinstance(prompt[0], dict))
        prompt_ids = await self.encode(prompt) if is_text else prompt
        self.engine.validate(prompt_ids, params)
        prompt_ids = list(prompt_ids)  # token ids as given may be a protobuf container: copied once checked
        stream = _Stream(asyncio.get_running_loop(), params.n, cancel_stuck_reader=cancel_stuck_reader)
        with self._lock:
            self._check_alive()  # under the lock: a failure after it still finds this stream
            if self._stopping:  # shutdown's snapshot of the streams, taken or due, would miss this one
                raise Unavailable("the engine is shutting down: retry on another replica")
            if request_id in self._streams:
                raise InvalidRequest(f"request id {request_id!r} is already in use")
            aborted = self._aborted_early.pop(request_id, False)
            if not aborted:
                self.engine.check_capacity(self._counted)
                self._streams[request_id] = stream
                self._counted += 1
        if aborted:  # before it got here (a drain's end while its adapter was read): ends as it would have
            for i in range(params.n):
                yield RequestOutput(request_id, "", [], True, FinishReason.ABORT, len(prompt_ids), 0, index=i)
            return
        self._inbox.put(_Add(request_id, prompt_ids, params, lora))
        self._wake.set()
        unfinished = params.n
        try:
            while unfinished:
                for item in _coalesced(await stream.take()):
                    if isinstance(item, Exception):
                        raise item
                    unfinished -= item.finished
                    yield item
        finally:
            with self._lock:
                del self._streams[request_id]
                self._uncount(stream)
            if unfinished:
                self._inbox.put(_Abort(request_id))
                self._wake.set()

    def abort(self, request_id: str) -> None:
        """Stop a request, with finish reason ABORT; one not yet queued (its adapter or prompt
        still being read) ends so as soon as it would be."""
        with self._lock:
            if request_id not in self._streams:
                self._aborted_early[request_id] = True
                while len(self._aborted_early) > MAX_EARLY_ABORTS:  # ids that never came: the oldest go
                    del self._aborted_early[next(iter(self._aborted_early))]
        self._inbox.put(_Abort(request_id))
        self._wake.set()

    def _uncount(self, stream: _Stream) -> None:
        """Under the lock: the stream no longer counts against the capacity."""
        if stream.counted:
            stream.counted = False
            self._counted -= 1

    def _in_flight(self) -> list[str]:
        """The requests whose streams still wait for their end."""
        with self._lock:
            return [request_id for request_id, stream in self._streams.items() if stream.counted]

    def _check_alive(self) -> None:
        if self.failure is not None:
            raise Unavailable(
                "this replica's engine stopped on an internal error (its log has the trace) and must be restarted: "
                "retry on another replica"
            )

    def _loop(self) -> None:
        """The engine thread. An error that escapes an iteration (the per-step and per-job
        handlers catch their own) stops it: every stream ends with UNAVAILABLE and new calls
        are refused, rather than waiting forever on a thread that is gone."""
        try:
            self._serve()
        except Exception as exc:
            log.exception("the engine thread stopped on an internal error; this replica can no longer generate")
            with self._lock:
                self.failure = exc
            for request_id in self._in_flight():
                self._deliver(request_id, Unavailable(f"this replica's engine stopped on an internal error ({type(exc).__name__}): retry on another replica"))
            self._flush()
            if self.on_failure is not None:
                self.on_failure()

    def _serve(self) -> None:
        if self.engine.device.type == "cuda":
            use_device(self.engine.device)
        while not self._stopping:
            self._drain_inbox()
            self._flush()
            inference = self.engine.has_work()
            training = self.jobs is not None and self.jobs.has_work()
            if not inference and not training:
                self._wake.wait()
                self._wake.clear()
                continue
            if inference:
                self._step()
                self._flush()
            # One training micro-batch between inference iterations (issue 5 fuses them).
            if training and (not inference or time.monotonic() >= self._training_due):
                self._train_once()
        self.engine.abort_all()

    def _train_once(self) -> None:
        """One call of the job manager; time-sliced, paced to timeslice_share of the engine's
        time while inference waits (co-served work is paced inside the iterations)."""
        started = time.monotonic()
        self.jobs.run_once()
        share = self.config.timeslice_share
        if self.config.finetune_mode == "timeslice" and share < 1:
            ended = time.monotonic()
            self._training_due = ended + (ended - started) * (1 - share) / share

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except StepFailed as failed:
            log.exception("engine step failed; failing the requests in its batch")
            self._fail([out.request_id for out in failed.outputs], failed.__cause__)
            return
        except Exception as exc:  # outside the iteration's work (scheduling): nothing says whom it concerns
            log.exception("engine step failed; failing every request")
            self.engine.abort_all()
            self._deliver_failures()  # first: a request whose adapter failed to load gets that error
            # Then every stream still waiting, not only abort_all's: a request that finished
            # earlier in the step has left the engine, and its last output was lost with the step.
            self._fail(self._in_flight(), exc)
            return
        finally:
            # Requests whose adapter failed to load are in no group any more: on every path
            # (one that failed the step too left their callers waiting for good).
            self._deliver_failures()
        for out in outputs:
            self._deliver(out.request_id, out)
            self._stop_if_unread(out)

    def _stop_if_unread(self, out: RequestOutput) -> None:
        """Abort a running request whose reader has stopped reading (its outputs would pile
        up in memory without bound) and end its stream with RESOURCE_EXHAUSTED."""
        with self._lock:
            stream = self._streams.get(out.request_id)
            over = stream is None or not stream.counted  # ended, or already stopped
        # Per completion: n = 16 fell 256 outputs behind 16 steps after its reader paused.
        if over or stream.unread <= MAX_UNREAD_OUTPUTS * stream.completions:
            return
        self.engine.abort(out.request_id)
        self._deliver(
            out.request_id,
            ResourceExhausted(
                f"the stream's reader fell {stream.unread} outputs behind, so the request was stopped: "
                "read a stream as it arrives, or ask for the whole reply at once (gRPC's Generate, or \"stream\": false over HTTP)"
            ),
        )
        stream.loop.call_soon_threadsafe(stream.loop.call_later, STUCK_READER_SECONDS, stream.end_stuck_reader)

    def _drain_inbox(self) -> None:
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                try:
                    self.engine.add_request(command.request_id, command.prompt_ids, command.params, command.adapter)
                except TandemError as exc:
                    self._deliver(command.request_id, exc)
            else:
                for out in self.engine.abort(command.request_id):
                    self._deliver(out.request_id, out)

    def _deliver_failures(self) -> None:
        for request_id, exc in self.engine.take_failures():
            log.error("request %s failed: %s", request_id, exc)
            self._deliver(request_id, exc)

    def _fail(self, request_ids: list[str], exc: BaseException | None) -> None:
        """Each aborted request's error: out of memory is RESOURCE_EXHAUSTED, which clients
        retry (the next iteration may fit), anything else an internal error. The allocator's
        text stays in the log: CUDA's names the GPU's memory layout and other processes' PIDs."""
        for request_id in dict.fromkeys(request_ids):
            if exc is not None and out_of_memory(exc):
                log.error("request %s failed: out of memory: %s", request_id, exc)
                error: Exception = ResourceExhausted(
                    "the iteration that carried this request ran out of memory on this replica: retry, or ask for fewer tokens"
                )
            else:
                error = RuntimeError(f"internal engine error: {type(exc).__name__}: {exc}")
            self._deliver(request_id, error)

    def _deliver(self, request_id: str, item: RequestOutput | Exception) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
            if stream is not None and stream.ends(item):
                self._uncount(stream)
        if stream is None:
            return
        if self.config.stream_interval > 1:
            if isinstance(item, Exception):
                for out in stream.release_held():
                    stream.delivered += 1
                    self._pending.append((stream, out))
            elif (item := stream.due(item, self.config.stream_interval)) is None:
                return
        stream.delivered += 1
        self._pending.append((stream, item))

    def _flush(self) -> None:
        """Post the pending deliveries: one callback per event loop, in delivery order."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput | Exception]]] = defaultdict(list)
        for stream, item in self._pending:
            by_loop[stream.loop].append((stream, item))
        self._pending = []
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[_Stream, RequestOutput | Exception]]) -> None:
    for stream, item in items:
        stream.put(item)
