"""Whether the server can take work, and which work is in flight.

Start-up and drain are one state machine: LOADING (no engine yet) → SERVING → DRAINING.
Readiness in grpc.health.v1 follows it, and every RPC is admitted through `admit()`, which
refuses with UNAVAILABLE outside SERVING and counts the calls a drain waits for.
"""

import asyncio
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from tandem.server.adapters.registry import SlotStats
from tandem.server.api.adapter_catalog import AdapterCatalog, NoAdapterServing
from tandem.server.api.call_record import CallRecord, current_call
from tandem.server.errors import Unavailable
from tandem.server.metrics import LoraActivity

if TYPE_CHECKING:
    from tandem.server.engine.async_engine import AsyncEngine
    from tandem.server.engine.outputs import EngineStats
    from tandem.server.finetune.jobs import FinetuneStats

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# What callers are told once the engine thread has stopped on an error: never the error itself
# (its text can hold paths, tensor shapes, a library's internals); the log has the trace.
ENGINE_FAILED = "this replica's engine stopped on an internal error and must be restarted: retry on another replica"


class ServingState:
    """The engine slot, the drain flag, the in-flight calls and the readiness they imply."""

    def __init__(self, health: health_aio.HealthServicer, services: list[str]):
        self._health = health
        self._services = services
        self._engine: "AsyncEngine | None" = None
        self.catalog: AdapterCatalog = NoAdapterServing()
        self._draining = False
        self._in_flight: dict[int, CallRecord] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    async def mark_loading(self) -> None:
        """Liveness SERVING, readiness NOT_SERVING: the process is up, the model is not."""
        await self._health.set("", SERVING)
        for service in self._services:
            await self._health.set(service, NOT_SERVING)

    async def attach(self, engine: "AsyncEngine") -> None:
        """Makes a started engine (and its adapter registry, if any) available; readiness on,
        until the engine thread stops on an error (then liveness goes off too)."""
        self._engine = engine
        loop = asyncio.get_running_loop()
        engine.on_failure = lambda: asyncio.run_coroutine_threadsafe(self._mark_failed(), loop)
        if engine.engine.registry is not None:
            self.catalog = engine.engine.registry
        if engine.failure is not None:  # it failed before on_failure was there to tell us
            await self._mark_failed()
        elif not self._draining:
            for service in self._services:
                await self._health.set(service, SERVING)

    async def _mark_failed(self) -> None:
        """Liveness and readiness NOT_SERVING: the process is up but cannot serve, so the
        orchestrator restarts it."""
        for service in ("", *self._services):
            await self._health.set(service, NOT_SERVING)

    async def begin_drain(self) -> None:
        """Readiness off and new work refused; calls already admitted keep running."""
        self._draining = True
        for service in self._services:
            await self._health.set(service, NOT_SERVING)

    def abort_generations(self) -> None:
        """Ends every generation in flight with finish reason ABORT: each stream gets its last
        message, as the proto promises, instead of an error when the server stops."""
        if self._engine is not None:
            for call in list(self._in_flight.values()):
                for engine_id in call.engine_request_ids:
                    self._engine.abort(engine_id)

    async def wait_idle(self, timeout: float) -> bool:
        """True once no admitted call is left, False if `timeout` seconds pass first."""
        if self._idle.is_set():  # wait_for with a timeout of 0 gives up even on a set event
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def engine(self) -> "AsyncEngine | None":
        return self._engine

    def check_ready(self) -> "AsyncEngine":
        """The engine, or Unavailable while loading or draining, or once the engine has
        failed: what every call is refused with, and what HTTP /health answers (no token needed)."""
        if self._draining:
            raise Unavailable("the server is shutting down: retry on another replica")
        if self._engine is None:
            raise Unavailable("the model is still loading: retry in a few seconds")
        if self._engine.failure is not None:
            raise Unavailable(ENGINE_FAILED)
        return self._engine

    @contextmanager
    def admit(self) -> Iterator["AsyncEngine"]:
        """Yields the engine for one call, or raises Unavailable while loading or draining."""
        engine = self.check_ready()
        record = current_call()
        self._in_flight[id(record)] = record
        self._idle.clear()
        try:
            yield engine
        finally:
            del self._in_flight[id(record)]
            if not self._in_flight:
                self._idle.set()

    def engine_stats(self) -> "EngineStats | None":
        return None if self._engine is None else self._engine.stats()

    def finetune_stats(self) -> "FinetuneStats | None":
        jobs = None if self._engine is None else self._engine.jobs
        return None if jobs is None else jobs.stats()

    def slot_stats(self) -> SlotStats:
        return self.catalog.slot_stats()

    def adapter_names(self) -> set[str]:
        """The adapters and routers loaded now (read, and not unloaded since)."""
        return {info.name for info in self.catalog.list()}

    def lora_activity(self) -> LoraActivity:
        calls = list(self._in_flight.values())
        return LoraActivity(
            running=[name for c in calls if not c.waiting for name in c.adapters],
            waiting=[name for c in calls if c.waiting for name in c.adapters],
        )
