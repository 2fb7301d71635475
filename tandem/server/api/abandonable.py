"""Calls that change server state on a caller's behalf, run off the event loop, told when
their caller has gone."""

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def run_abandonable(call: Callable[[threading.Event], T]) -> T:
    """Runs call(abandoned) on a thread of its own. A thread cannot be stopped: when the caller
    goes (its deadline passed, it cancelled), the event tells the call not to commit, or one
    timed out on (a merge, a load from a slow disk, a job's dataset being read) could end after
    the caller's next call for that name (sent again corrected, an unload) and undo it, or
    start work nobody waits for."""
    abandoned = threading.Event()
    try:
        return await asyncio.to_thread(call, abandoned)
    except asyncio.CancelledError:
        abandoned.set()
        raise
