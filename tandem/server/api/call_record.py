"""Per-call bookkeeping shared by the interceptor (which opens and logs it) and the
servicers (which fill in what only they know: adapter, token counts, finish reason)."""

import time
from contextvars import ContextVar
from dataclasses import dataclass, field

from tandem.server.api.auth import Role
from tandem.server.engine.outputs import RequestOutput
from tandem.server.metrics import CallSummary, Metrics


@dataclass
class CallRecord:
    """One RPC from arrival to its final status; times are time.monotonic() seconds.
    engine_request_id: the engine's id of the generation this call runs ("" if none), by
    which a drain aborts it. role: the caller's (admin when auth is off, as every method is open then)."""

    request_id: str
    method: str
    metrics: Metrics
    started: float = field(default_factory=time.monotonic)
    adapter: str = ""
    engine_request_id: str = ""
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finish_reason: str = ""
    first_token_at: float | None = None
    last_token_at: float | None = None
    role: Role = Role.ADMIN
    scheduled_at: float | None = None  # when the engine first scheduled the generation

    def on_output(self, out: RequestOutput) -> None:
        """Records one engine increment: TTFT on the first token, inter-token latency after."""
        now = time.monotonic()
        if self.scheduled_at is None:
            self.scheduled_at = out.first_scheduled_at
        self.prompt_tokens = out.prompt_tokens
        new_tokens = out.generated_tokens - self.generated_tokens
        if new_tokens > 0:
            if self.first_token_at is None:
                self.first_token_at = now
                self.metrics.time_to_first_token.observe(now - self.started)
                new_tokens -= 1
            if new_tokens > 0 and self.last_token_at is not None:
                gap = (now - self.last_token_at) / new_tokens
                for _ in range(new_tokens):
                    self.metrics.inter_token_latency.observe(gap)
            self.last_token_at = now
        self.generated_tokens = out.generated_tokens
        if out.finished and out.finish_reason is not None:
            self.finish_reason = out.finish_reason.value

    def summary(self, status: str) -> CallSummary:
        """The call as the request metrics count it, ending now with `status`."""
        return CallSummary(
            self.method, status, self.finish_reason, bool(self.engine_request_id), self.prompt_tokens,
            self.generated_tokens, self.started, time.monotonic(), self.scheduled_at, self.first_token_at, self.last_token_at,
        )

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
