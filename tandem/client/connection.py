"""Channel settings shared by the sync and asyncio clients: address, TLS, token, deadline,
retries. The token travels as `authorization: Bearer` metadata."""

import itertools
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from tandem.client.errors import TandemRpcError

REQUEST_ID_KEY = "x-request-id"


@dataclass
class ConnectionSettings:
    """target: "host:port". tls: use TLS (implied by ca_cert / client_cert); ca_cert: PEM
    file of the CA to trust (default: system roots); client_cert + client_key: mutual TLS.
    timeout: seconds for a whole call, retries included; None = no deadline.
    max_retries: extra attempts on UNAVAILABLE before any token arrived; a call that creates
    or changes something (CreateJob, CancelJob, MergeAdapters, CompressAdapter, UnloadAdapter)
    is sent again only when the first never reached a server (a second could do it twice).
    reconnect_seconds: how long a watch (WatchJob) goes on reconnecting on UNAVAILABLE, from
    the first failure after its last response, whatever max_retries says: a restarting server
    loads its model first.
    token: surrounding whitespace is dropped (a file's or a variable's trailing newline made
    the call fail as invalid metadata); whitespace inside is refused (a server's token is one word)."""

    target: str = "localhost:50051"
    token: str | None = None
    tls: bool = False
    ca_cert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    timeout: float | None = 60.0
    max_retries: int = 3
    reconnect_seconds: float = 120.0
    backoff_seconds: float = 0.2
    max_backoff_seconds: float = 5.0
    max_message_bytes: int = 4 << 20

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("mutual TLS needs both client_cert and client_key")
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"timeout is seconds > 0 (None or inf: no deadline), got {self.timeout}")
        if self.token is not None:
            self.token = self.token.strip()
            if any(c.isspace() for c in self.token):
                raise ValueError("the token has whitespace inside it: a bearer token is one word (check the file or variable it came from)")

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.ca_cert is not None or self.client_cert is not None

    def credentials(self) -> grpc.ChannelCredentials:
        read = lambda path: Path(path).read_bytes() if path else None  # noqa: E731
        return grpc.ssl_channel_credentials(read(self.ca_cert), read(self.client_key), read(self.client_cert))

    def options(self) -> list[tuple[str, int]]:
        """The channel's options. Its reconnect backoff is capped at the client's own: gRPC's
        grows 1.6x a try up to 120 s, and while it waits every call fails at once, so `tandem
        health --wait` and job watches saw a server that was back up to half a minute late
        (and a watch could give up on one that was up)."""
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.initial_reconnect_backoff_ms", max(1, int(self.backoff_seconds * 1000))),
            ("grpc.max_reconnect_backoff_ms", max(1, int(self.max_backoff_seconds * 1000))),
        ]

    def metadata(self, request_id: str) -> list[tuple[str, str]]:
        metadata = [(REQUEST_ID_KEY, request_id)]
        if self.token:
            metadata.append(("authorization", f"Bearer {self.token}"))
        return metadata


def new_request_id(request_id: str | None) -> str:
    return request_id or uuid.uuid4().hex


def request_id_from(initial_metadata, fallback: str) -> str:
    """The id the server used (it replaces ids it finds malformed)."""
    for key, value in initial_metadata or ():
        if key == REQUEST_ID_KEY:
            return value
    return fallback


# gRPC fails a call at once as DEADLINE_EXCEEDED when its deadline overflows (~1e10 s from
# now): a timeout this long is no deadline.
NO_DEADLINE_SECONDS = 1e9


class Deadline:
    """One deadline across all attempts of a call. timeout None or inf (or past
    NO_DEADLINE_SECONDS): none; 0: already passed."""

    def __init__(self, timeout: float | None):
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"a timeout is seconds >= 0 (None or inf: no deadline), got {timeout}")
        self._end = None if timeout is None or timeout >= NO_DEADLINE_SECONDS else time.monotonic() + timeout

    def remaining(self) -> float | None:
        return None if self._end is None else max(0.0, self._end - time.monotonic())


def retry_delays(settings: ConnectionSettings, endless: bool = False) -> Iterator[float]:
    """Exponential backoff with full jitter, max_retries delays long (endless: without end)."""
    for attempt in itertools.count() if endless else range(settings.max_retries):
        yield random.uniform(0, min(settings.max_backoff_seconds, settings.backoff_seconds * 2 ** min(attempt, 32)))


def is_retryable(error: grpc.RpcError) -> bool:
    """Only UNAVAILABLE: the server was loading, draining or unreachable. Not always before
    any work: a server that stops with calls still running, or a connection reset after the
    request went out, fails them with UNAVAILABLE too (never_sent tells those apart)."""
    code = getattr(error, "code", None)
    return callable(code) and code() == grpc.StatusCode.UNAVAILABLE


# gRPC's own words for a call that found no server to send it to.
_NOT_SENT = ("failed to connect to all addresses", "DNS resolution failed", "errors resolving")


def never_sent(error: grpc.RpcError) -> bool:
    """The call never reached a server: safe to send again whatever it does."""
    details = getattr(error, "details", None)
    return is_retryable(error) and callable(details) and (details() or "").startswith(_NOT_SENT)


class Attempts:
    """The deadline and the retry budget of one call, shared by all its attempts. A watch's
    budget is time instead (settings.reconnect_seconds from the first failure after its last
    response, not from the response: a queued job or a slow step is quiet for longer), renewed
    by every response: it may run for hours across server restarts."""

    def __init__(self, settings: ConnectionSettings, timeout: float | None, watch: bool = False):
        self.deadline = Deadline(timeout)
        self._settings = settings
        self._watch = watch
        self.responded()

    def responded(self) -> None:
        """A response arrived: a later failure starts a fresh budget."""
        self._delays = retry_delays(self._settings, endless=self._watch)
        self._patience: Deadline | None = None

    def pause_after(self, error: grpc.RpcError, request_id: str, retry: bool = True) -> float:
        """Seconds to wait before the next attempt; raises the call's TandemRpcError when
        there is none (retry False, not retryable, retries spent, or the deadline would pass first)."""
        if self._patience is None:
            self._patience = Deadline(self._settings.reconnect_seconds if self._watch else None)
        delay = next(self._delays, None) if retry and is_retryable(error) else None
        remaining = [r for r in (self.deadline.remaining(), self._patience.remaining()) if r is not None]
        if delay is None or any(delay >= r for r in remaining):
            raise TandemRpcError.wrap(error, _server_request_id(error, request_id)) from None
        return delay


def _server_request_id(error: grpc.RpcError, sent: str) -> str:
    """The id the server used for a failed call: it sends it in the initial metadata, which
    a call that never reached it has none of."""
    initial_metadata = getattr(error, "initial_metadata", None)
    return request_id_from(initial_metadata() if callable(initial_metadata) else None, sent)
