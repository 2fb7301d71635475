"""`tandem serve`: health up at once, model loaded off the event loop, ready when loaded,
graceful drain on SIGTERM/SIGINT."""

import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from tandem.server.api.grpc_server import TandemServer, build_server
from tandem.server.config import EngineConfig, ServerConfig
from tandem.server.errors import ModelLoadError
from tandem.server.heap import frozen_heap

log = logging.getLogger("tandem.serve")

T = TypeVar("T")


async def serve(engine_config: EngineConfig, server_config: ServerConfig) -> int:
    """Runs until SIGTERM or SIGINT, then drains and ends the process (exit status 0; 1 on a
    second signal during the drain); returns 1 when the model cannot be loaded."""
    from tandem.server.engine.async_engine import AsyncEngine  # torch import: only when serving
    from tandem.server.model.loader import served_name

    server = build_server(server_config, model_name=served_name(engine_config.model))
    # Before start() logs "listening": a SIGTERM from then on must drain, not kill.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()

    loading = asyncio.create_task(_in_own_thread(AsyncEngine, engine_config))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not loading.done():
        await _exit_during_load(server)
    try:
        engine = loading.result()
    except (ModelLoadError, OSError, ValueError) as exc:
        log.error("cannot load the model: %s", exc)
        await server.drain(grace=0)
        return 1
    except Exception:  # out of memory for the KV cache, a library's own error: still a clean stop
        log.exception("cannot load the model")
        await server.drain(grace=0)
        return 1
    with frozen_heap():
        engine.start()
        await server.attach_engine(engine)
        await stopping
        log.info("signal received: draining")
        for sig in (signal.SIGTERM, signal.SIGINT):  # a second one: stop waiting
            loop.add_signal_handler(sig, _second_signal)
        await server.drain()
        # Off the loop: the engine thread ends its iteration first (a time-sliced training
        # micro-batch, a checkpoint, a publish), and a second signal must still be heard.
        await _in_own_thread(engine.shutdown)
    # Not a return: asyncio.run would then wait, without end, for the worker threads of calls
    # the drain cancelled (a merge, a job's dataset write: their files are written atomically).
    _exit_now(0)


def _second_signal() -> NoReturn:
    log.info("second signal received: exiting without finishing the drain")
    _exit_now(1)


async def _in_own_thread(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in a thread that ends with it. Not the loop's executor: OpenMP keeps a team
    of worker threads for every thread that ran a parallel torch op, for as long as that thread
    lives, and with more such workers than cores libgomp stops spinning between parallel
    regions, which made every small GEMM of the engine thread ~2x slower (the served path ran
    at 0.69x of the engine in-process; bench/served_vs_engine.py)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if done.done():  # cancelled: the server is exiting during the load
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)

    def run() -> None:
        try:
            loop.call_soon_threadsafe(settle, fn(*args), None)
        except BaseException as exc:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(settle, None, exc)

    threading.Thread(target=run, name="tandem-load", daemon=True).start()
    return await done


async def _exit_during_load(server: TandemServer) -> NoReturn:
    """Stops serving health and ends the process now. The model load runs in a thread that
    cannot be interrupted, and returning would wait for it (asyncio.run joins its executor,
    the interpreter its threads) for up to minutes, past Kubernetes' grace period."""
    log.info("signal received while loading the model: exiting without waiting for the load")
    await server.drain(grace=0)
    _exit_now(0)


def _exit_now(code: int) -> NoReturn:
    """Ends the process now, logs flushed, without joining threads that may not end soon."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
