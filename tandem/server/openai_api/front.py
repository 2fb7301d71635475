"""The HTTP front's server: uvicorn on a socket bound here (so that port 0 works and a port
in use is an OSError, never sys.exit), started and stopped by TandemServer, in its event loop.

uvicorn's own serve() is not used: it installs signal handlers, and the process's signals
belong to tandem serve, which drains both fronts together.
"""

import asyncio
import logging
import socket

import uvicorn
from fastapi import FastAPI

from tandem.server.metrics import listen_address

log = logging.getLogger("tandem.server")

# Seconds an HTTP connection still open after the drain (an idle keep-alive, a response
# being written) gets before it is closed.
CLOSE_GRACE_SECONDS = 5


class HttpFront:
    def __init__(self, app: FastAPI, host: str, port: int):
        address, dual_stack = listen_address(host)
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self._sock = socket.create_server((address, port), family=family, dualstack_ipv6=dual_stack, reuse_port=False)
        self.port: int = self._sock.getsockname()[1]
        config = uvicorn.Config(
            app, lifespan="off", log_config=None, access_log=False, timeout_graceful_shutdown=CLOSE_GRACE_SECONDS
        )
        self._server = uvicorn.Server(config)
        self._ticks: asyncio.Task | None = None

    async def start(self) -> None:
        # What uvicorn's serve() does before startup(), without its signal handlers.
        config = self._server.config
        config.load()
        self._server.lifespan = config.lifespan_class(config)
        await self._server.startup(sockets=[self._sock])
        # uvicorn's tick loop keeps the Date header current; it ends when should_exit is set.
        self._ticks = asyncio.create_task(self._server.main_loop())

    def stop_accepting(self) -> None:
        """Close the listening socket: new connections are refused, open ones carry on."""
        for server in getattr(self._server, "servers", []):
            server.close()

    async def close(self) -> None:
        """Close every connection (in-flight responses finish first, up to CLOSE_GRACE_SECONDS)."""
        self._server.should_exit = True
        if self._ticks is not None:
            await self._ticks
        if self._server.started:
            await self._server.shutdown()
        self._sock.close()
