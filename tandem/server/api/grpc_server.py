"""Assembles the gRPC server: services, health, reflection, interceptor, limits, TLS, and
the start → attach engine → drain lifecycle. `build_server()` is what the CLI and tests call."""

import asyncio
import logging
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from tandem.server.api.adapters_service import AdaptersServicer
from tandem.server.api.auth import TokenTable
from tandem.server.api.finetuning_service import FineTuningServicer
from tandem.server.api.generation_service import GenerationServicer
from tandem.server.api.interceptor import CallInterceptor
from tandem.server.api.serving_state import ServingState
from tandem.server.config import ServerConfig
from tandem.server.metrics import Metrics
from tandem.server.openai_api.app import build_app
from tandem.server.openai_api.front import HttpFront
from tandem.v1 import adapters_pb2, adapters_pb2_grpc, finetuning_pb2, finetuning_pb2_grpc, generation_pb2, generation_pb2_grpc

if TYPE_CHECKING:
    from tandem.server.engine.async_engine import AsyncEngine

log = logging.getLogger("tandem.server")

SERVICES = [
    generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name,
    adapters_pb2.DESCRIPTOR.services_by_name["AdaptersService"].full_name,
    finetuning_pb2.DESCRIPTOR.services_by_name["FineTuningService"].full_name,
]
# How long aborted generations get to send their last message before the server stops.
ABORT_WAIT_SECONDS = 5.0
# Then how long calls get to finish on the wire: a call is idle once its handler is past its
# last message, before gRPC has sent that message's status; stopped at once, such a call
# ended CANCELLED ("Cancelling all calls") instead of OK after its last message, once in a CI
# run under load. A call still open after it (a watch) is cancelled.
STOP_GRACE_SECONDS = 1.0
# Long generations stream for minutes: let clients keep the connection alive with pings.
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]


class TandemServer:
    """A built server: `start()` serves health at once, `attach_engine()` makes it ready,
    `drain()` stops it gracefully. The OpenAI-compatible HTTP front (http, None when off)
    shares its state: same engine, same admission, same drain."""

    def __init__(
        self, server: grpc.aio.Server, state: ServingState, metrics: Metrics, config: ServerConfig, port: int, http: HttpFront | None
    ):
        self._server = server
        self.state = state
        self.metrics = metrics
        self.config = config
        self.port = port
        self.http = http
        self.metrics_port: int | None = None

    @property
    def http_port(self) -> int | None:
        return None if self.http is None else self.http.port

    async def start(self) -> None:
        """Serves health, the HTTP front and metrics. Metrics bind first: a port in use there
        fails before anything serves, with what to change, and leaves nothing bound."""
        try:
            self.metrics_port = self.metrics.serve(self.config.host, self.config.metrics_port)
        except OSError as exc:
            await self._server.stop(grace=0)
            if self.http is not None:
                await self.http.close()
            where = f"{self.config.host}:{self.config.metrics_port}"
            raise OSError(f"cannot listen for metrics on {where}: is another process using it? ({exc})") from exc
        await self.state.mark_loading()
        await self._server.start()
        if self.http is not None:
            await self.http.start()
        log.info(
            "listening",
            extra={"fields": {
                "port": self.port, "http_port": self.http_port, "metrics_port": self.metrics_port,
                "tls": self.config.tls_cert is not None, "mutual_tls": self.config.tls_client_ca is not None,
                "auth": self.config.auth_tokens_file is not None,
            }},
        )
        if self.http is not None and self.config.tls_cert is not None:
            log.warning(
                "TLS covers the gRPC port only: the HTTP front is plaintext; terminate HTTPS in front of it, or --http-port off",
                extra={"fields": {"http_port": self.http_port}},
            )

    async def attach_engine(self, engine: "AsyncEngine") -> None:
        if self.metrics.model_name != engine.info.name:
            if self.metrics.model_name:  # the name given to build_server was not the loaded one: every series jumps
                log.warning(
                    "model name changed on load", extra={"fields": {"expected": self.metrics.model_name, "loaded": engine.info.name}}
                )
            self.metrics.model_name = engine.info.name
        await self.state.attach(engine)
        log.info("ready", extra={"fields": {"model": engine.info.name}})

    async def drain(self, grace: float | None = None) -> bool:
        """Readiness off, new calls refused, in-flight calls given `grace` seconds (default:
        the config's); then generations end with FINISH_REASON_ABORT and what is left is
        cancelled. True if all finished within the grace period."""
        grace = self.config.drain_grace_seconds if grace is None else grace
        # The listener closes first, so that once the state says draining no new HTTP
        # connection can land in its backlog (to be reset when it closes, not refused).
        if self.http is not None:
            self.http.stop_accepting()
        await self.state.begin_drain()
        # gRPC's stop closes the listener and sends GOAWAY at once, so that clients still
        # connected here (kube-proxy keeps their TCP connection) reconnect to another replica
        # instead of being refused UNAVAILABLE for the whole grace; the calls in flight run on.
        stopping = asyncio.create_task(self._server.stop(grace=grace + ABORT_WAIT_SECONDS + STOP_GRACE_SECONDS))
        log.info("draining", extra={"fields": {"grace_seconds": grace}})
        finished = await self.state.wait_idle(grace)
        if not finished:
            self.state.abort_generations()
            await self.state.wait_idle(ABORT_WAIT_SECONDS)
        # The most restrictive grace wins: a call still open (a watch) is not waited for past it.
        await self._server.stop(grace=STOP_GRACE_SECONDS)
        await stopping
        if self.http is not None:
            await self.http.close()
        self.metrics.close()
        log.info("stopped", extra={"fields": {"in_flight_finished": finished}})
        return finished

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


def _credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """The TLS credentials, the files checked first: gRPC refuses a bad certificate or key
    only by failing to bind, which read as "is another process using the port?"."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    cert, key = _read_tls_file("--tls-cert", config.tls_cert), _read_tls_file("--tls-key", config.tls_key)
    client_ca = _read_tls_file("--tls-client-ca", config.tls_client_ca) if config.tls_client_ca is not None else None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except ssl.SSLError as exc:
        raise ValueError(
            f"--tls-cert {config.tls_cert} and --tls-key {config.tls_key} are not a PEM certificate chain and its private key ({exc})"
        ) from exc
    if client_ca is not None:
        try:
            context.load_verify_locations(config.tls_client_ca)
        except ssl.SSLError as exc:
            raise ValueError(f"--tls-client-ca {config.tls_client_ca} is not a PEM CA bundle ({exc})") from exc
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None)


def _read_tls_file(flag: str, path: str) -> bytes:
    """The file's bytes; an unreadable one named with its flag (OSError said only "[Errno 2]
    No such file or directory")."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{flag} {path} cannot be read: {exc.strerror or exc}") from exc


def build_server(config: ServerConfig, metrics: Metrics | None = None, model_name: str = "") -> TandemServer:
    """Builds (but does not start) a server bound to config.host:config.port.

    model_name: the model's name as model/loader.py's served_name gives it, so that every series
    carries it from the start: calls refused while the model loads were counted under
    model_name="" and then moved, counts and all, to the model's name when it attached, so
    rate() never saw them. "" leaves it to attach_engine.

    Call it inside the asyncio loop that will run the server.
    """
    credentials = _credentials(config)  # before anything is made: a bad file fails the start at once
    metrics = metrics or Metrics()
    if model_name:
        metrics.model_name = model_name
    tokens = TokenTable.from_file(config.auth_tokens_file) if config.auth_tokens_file is not None else None
    server = grpc.aio.server(
        interceptors=[CallInterceptor(tokens, metrics, config.max_message_bytes)],
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            # Without it a second server on the same port binds too and takes connections.
            ("grpc.so_reuseport", 0),
            *KEEPALIVE_OPTIONS,
        ],
    )
    health = health_aio.HealthServicer()
    state = ServingState(health, SERVICES)
    metrics.bind(state)
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(GenerationServicer(state), server)
    adapters_pb2_grpc.add_AdaptersServiceServicer_to_server(AdaptersServicer(state, metrics), server)
    finetuning_pb2_grpc.add_FineTuningServiceServicer_to_server(FineTuningServicer(state), server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection([*SERVICES, "grpc.health.v1.Health", reflection.SERVICE_NAME], server)
    address = f"[{config.host}]:{config.port}" if ":" in config.host else f"{config.host}:{config.port}"  # IPv6 in brackets
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: is another process using it? ({exc})") from exc
    if port == 0:
        raise OSError(f"cannot listen on {address}: is another process using it?")
    return TandemServer(server, state, metrics, config, port, _http_front(config, state, tokens, metrics))


def _http_front(config: ServerConfig, state: ServingState, tokens: TokenTable | None, metrics: Metrics) -> HttpFront | None:
    """The OpenAI-compatible front on config.http_port, bound now (None when turned off)."""
    if config.http_port is None:
        return None
    app = build_app(state, tokens, metrics, config.max_message_bytes)
    try:
        return HttpFront(app, config.host, config.http_port)
    except OSError as exc:
        raise OSError(f"cannot listen for HTTP on {config.host}:{config.http_port}: is another process using it? ({exc})") from exc
