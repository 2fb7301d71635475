"""Calls that change server state on a caller's behalf, run off the event loop, told when
their caller has gone.

They run on a few threads of their own, not on the loop's default executor: that one also
tokenizes prompts, reads adapters on first use and renders logprob bytes for generation, and
has min(32, cores + 4) threads (6 on a 2-core pod). A thread cannot be stopped, so abandoned
slow calls (a caller retrying a merge or a load from a slow disk on a short deadline) kept
theirs until done: a handful of them held every thread, and every text request waited."""

import asyncio
import contextvars
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

# Admin calls beyond these wait for one another, never for generation's threads, nor it for them.
ADMIN_THREADS = 4
_admin = ThreadPoolExecutor(max_workers=ADMIN_THREADS, thread_name_prefix="tandem-admin")


async def run_abandonable(call: Callable[[threading.Event], T]) -> T:
    """Runs call(abandoned) on an admin thread, in the caller's context (its call record). A
    thread cannot be stopped: when the caller goes (its deadline passed, it cancelled), the
    event tells the call not to commit, or one timed out on (a merge, a load from a slow disk,
    a job's dataset being read) could end after the caller's next call for that name (sent
    again corrected, an unload) and undo it, or start work nobody waits for."""
    abandoned = threading.Event()
    context = contextvars.copy_context()
    try:
        return await asyncio.get_running_loop().run_in_executor(_admin, context.run, call, abandoned)
    except asyncio.CancelledError:
        abandoned.set()
        raise
