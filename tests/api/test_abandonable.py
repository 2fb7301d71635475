"""Admin calls (load, merge, compress, a job's creation) run on threads of their own: slow
ones a caller gave up on cannot take the threads generation tokenizes and reads adapters on."""

import asyncio
import contextvars
import threading

from tandem.server.api.abandonable import run_abandonable

caller = contextvars.ContextVar("caller", default=None)


def test_admin_calls_holding_their_threads_leave_generation_its_own():
    release = threading.Event()

    def slow(abandoned: threading.Event) -> int:
        release.wait(60)
        return 1

    async def main() -> str:
        # More than the default executor's most threads (32): on it they left none to tokenize a prompt.
        admin = [asyncio.ensure_future(run_abandonable(slow)) for _ in range(40)]
        try:
            return await asyncio.wait_for(asyncio.to_thread(lambda: "tokens"), 10)
        finally:
            release.set()
            assert await asyncio.gather(*admin) == [1] * 40

    assert asyncio.run(main()) == "tokens"


def test_an_admin_call_runs_in_its_callers_context_and_learns_it_was_abandoned():
    entered, release = threading.Event(), threading.Event()
    seen: list = []

    def call(abandoned: threading.Event) -> None:
        seen.append(caller.get())
        entered.set()
        release.wait(10)
        seen.append(abandoned.is_set())

    async def main() -> None:
        caller.set("call-7")
        task = asyncio.ensure_future(run_abandonable(call))
        await asyncio.to_thread(entered.wait, 10)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        release.set()

    asyncio.run(main())
    while len(seen) < 2:
        threading.Event().wait(0.01)
    assert seen == ["call-7", True]
