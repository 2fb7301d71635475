"""A real Tandem server on a loopback port, run on its own event loop in a thread so that
tests can talk to it with the blocking client."""

import asyncio
import threading
from concurrent.futures import Future
from collections.abc import Coroutine
from typing import Any

from tandem.server.api.grpc_server import TandemServer, build_server
from tandem.server.config import ServerConfig
from tandem.server.engine.async_engine import AsyncEngine


class ServerThread:
    def __init__(self, config: ServerConfig, engine: AsyncEngine | None, model_name: str = ""):
        """engine: a started engine the caller owns; None leaves the server loading (not ready).
        model_name: build_server's, the model's name known before it loads ("" = at attach)."""
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)
        self._thread.start()
        self.engine: AsyncEngine | None = None
        self.server: TandemServer = self.run(self._start(config, model_name))
        if engine is not None:
            self.attach(engine)

    async def _start(self, config: ServerConfig, model_name: str = "") -> TandemServer:
        server = build_server(config, model_name=model_name)
        await server.start()
        return server

    def submit(self, coro: Coroutine[Any, Any, Any]) -> Future:
        """Starts a coroutine on the server's loop."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
        """Runs a coroutine on the server's loop and waits for its result."""
        return self.submit(coro).result(timeout)

    def attach(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.run(self.server.attach_engine(engine))

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def stop(self) -> None:
        """Drains at once, then ends the loop."""
        self.run(self.server.drain(grace=0))
        self.close()

    def close(self) -> None:
        """Ends the loop of a server that has already been drained."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
