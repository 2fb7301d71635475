"""Per-call bookkeeping shared by the fronts (the gRPC interceptor and the HTTP front open
it and close it with the call's status) and the generation path (which fills in what only
it knows: adapter, token counts, finish reason)."""

import logging
import re
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field

from tandem.server.api.auth import Role
from tandem.server.engine.outputs import RequestOutput
from tandem.server.engine.sampling_params import MAX_N
from tandem.server.metrics import CallSummary, Metrics

log = logging.getLogger("tandem.requests")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/-]{1,128}")


def request_id_of(given: str) -> str:
    """The caller's x-request-id when it is a plain id, else a new one."""
    return given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


@dataclass
class _Completion:
    """One completion of an engine request as vLLM's request metrics count it: vLLM runs
    each prompt of a batch, and each of a prompt's n completions, as a request of its own.
    Times are time.monotonic() seconds; None where it never got there. prompt_tokens_counted:
    its prompt's tokens in the token counter, added with its first token."""

    engine_request_id: str
    generated_tokens: int = 0
    prompt_tokens_counted: int = 0
    finish_reason: str = ""
    scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None


@dataclass
class CallRecord:
    """One RPC from arrival to its final status; times are time.monotonic() seconds.
    engine_request_ids: the engine's ids of the generations this call runs (one per prompt),
    by which a drain aborts them. role: the caller's (admin when auth is off, as every method is open then)."""

    request_id: str
    method: str
    metrics: Metrics
    started: float = field(default_factory=time.monotonic)
    adapter: str = ""
    adapters: tuple[str, ...] = ()  # the adapters' names, a mixture's each (what the metrics show)
    engine_request_ids: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finish_reason: str = ""
    first_token_at: float | None = None
    last_token_at: float | None = None
    role: Role = Role.ADMIN
    scheduled_at: float | None = None  # when the engine first scheduled the generation
    # By completion index (a call's later prompts number theirs on): what each did.
    _completions: dict[int, _Completion] = field(default_factory=dict, repr=False)
    _prompt_tokens_of: dict[str, int] = field(default_factory=dict, repr=False)  # per engine request
    _engine_requests: list[tuple[str, int, int]] = field(default_factory=list, repr=False)  # (id, first index, n)

    def add_engine_request(self, engine_id: str, first_index: int, n: int) -> None:
        """Registers one engine request of the call, whose n completions are indices
        first_index to first_index + n - 1: each is counted in the request metrics when the
        call ends, even one that never sent an output (aborted while queued). n is the
        caller's, not checked yet (the engine checks it): nothing here is sized by it."""
        self.engine_request_ids.append(engine_id)
        self._engine_requests.append((engine_id, first_index, n))

    def on_output(self, out: RequestOutput) -> None:
        """Records one engine increment: TTFT on each completion's first token, inter-token
        latency after; its tokens in the token counters as they come, the prompt's with the
        first token (counted when the call ended, a long stream added nothing for minutes,
        then all of it at once)."""
        now = time.monotonic()
        completion = self._completions.setdefault(out.index, _Completion(out.request_id))
        if completion.scheduled is None:
            completion.scheduled = out.first_scheduled_at
        if self.scheduled_at is None:
            self.scheduled_at = out.first_scheduled_at
        # A running total: re-summing every prompt's count at each output was quadratic in a batch's prompts.
        self.prompt_tokens += out.prompt_tokens - self._prompt_tokens_of.get(out.request_id, 0)
        self._prompt_tokens_of[out.request_id] = out.prompt_tokens
        # Counted from the increment itself, per completion: the outputs of n completions
        # interleave, and one's tokens follow its own last one, not another's (n = 4 read
        # three quarters of its gaps as ~0).
        new_tokens = len(out.token_ids)
        if new_tokens > 0:
            if self.first_token_at is None:
                self.first_token_at = now
            last = completion.last_token
            if last is None:  # this completion's first token ends no interval: it is its TTFT
                completion.first_token = now
                self.metrics.time_to_first_token.observe(now - self.started)
                self.metrics.prompt_tokens.inc(out.prompt_tokens)
                completion.prompt_tokens_counted = out.prompt_tokens
                new_tokens -= 1
            elif new_tokens > 0:
                gap = (now - last) / new_tokens
                for _ in range(new_tokens):
                    self.metrics.inter_token_latency.observe(gap)
            completion.last_token = now
            self.last_token_at = now
        completion.generated_tokens += len(out.token_ids)
        self.generated_tokens += len(out.token_ids)
        self.metrics.generation_tokens.inc(len(out.token_ids))
        if out.finished and out.finish_reason is not None:
            completion.finish_reason = out.finish_reason.value
            completion.finished = now
            self.finish_reason = out.finish_reason.value

    def close(self, status: str) -> None:
        """Counts the call in the request metrics with the status it ended with (a gRPC
        status code name, whichever front served it), each of its completions as one of
        vLLM's requests, and logs its one `request` line."""
        latency = time.monotonic() - self.started
        self.metrics.observe_call(self.summary(status), self.request_summaries(status))
        log.info(
            "request",
            extra={
                "fields": {
                    "request_id": self.request_id,
                    "method": self.method,
                    "status": status,
                    "adapter": self.adapter,
                    "prompt_tokens": self.prompt_tokens,
                    "generated_tokens": self.generated_tokens,
                    "finish_reason": self.finish_reason,
                    "ttft_ms": None if self.first_token_at is None else round((self.first_token_at - self.started) * 1000, 1),
                    "latency_ms": round(latency * 1000, 1),
                }
            },
        )

    def summary(self, status: str) -> CallSummary:
        """The call as the request metrics count it, ending now with `status`."""
        return CallSummary(
            self.method, status, self.finish_reason, bool(self.engine_request_ids), self.prompt_tokens,
            self.generated_tokens, self.started, time.monotonic(), self.scheduled_at, self.first_token_at, self.last_token_at,
        )

    def request_summaries(self, status: str) -> list[CallSummary]:
        """Each completion as vLLM's request metrics count a request: its engine request's
        prompt tokens, its own tokens, finish reason and times; it ended when its last
        output came (else now, with the call's `status`)."""
        now = time.monotonic()
        for engine_id, first_index, n in self._engine_requests:
            # The completions that sent nothing; none for an n the engine refused (a 10**30 was
            # as many loop turns on the event loop).
            for index in range(first_index, first_index + n if 1 <= n <= MAX_N else first_index):
                self._completions.setdefault(index, _Completion(engine_id))
        return [
            CallSummary(
                self.method, status, c.finish_reason, True, self._prompt_tokens_of.get(c.engine_request_id, 0),
                c.generated_tokens, self.started, now if c.finished is None else c.finished, c.scheduled, c.first_token, c.last_token,
                prompt_tokens_counted=c.prompt_tokens_counted, generated_tokens_counted=c.generated_tokens,
            )
            for _, c in sorted(self._completions.items())
        ]

    @property
    def waiting(self) -> bool:
        return self.first_token_at is None


_current: ContextVar[CallRecord] = ContextVar("tandem_call")


def current_call() -> CallRecord:
    """The record of the RPC being served by this task (set by the interceptor)."""
    return _current.get()


def set_current_call(record: CallRecord) -> None:
    """Makes `record` the current call of this task. Never reset: grpc.aio serves each call in
    a task of its own, whose context ends with it, and a stream that the garbage collector
    closes runs its cleanup in another task, where resetting would raise."""
    _current.set(record)
