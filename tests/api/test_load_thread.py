"""The model loads in a thread of its own that ends with the load: a thread that ran torch ops
keeps an OpenMP worker team while it lives, and extra teams slow the engine thread's GEMMs."""

import asyncio
import threading

import pytest

from tandem.server.serve import _in_own_thread


def test_the_load_runs_in_a_thread_of_its_own_that_ends_after_it():
    """Not the loop's executor, whose idle workers live on until the loop closes: the thread
    ends while the loop still runs. Not checked: that it has ended by the time the call
    returns (_in_own_thread settles its result from the thread, without joining it)."""
    ran_in = {}

    def load(x: int) -> int:
        ran_in["thread"] = threading.current_thread()
        return x + 1

    async def load_and_join() -> int:
        loaded = await _in_own_thread(load, 1)
        ran_in["thread"].join(timeout=5)  # with the loop, and its executor, still running
        ran_in["alive"] = ran_in["thread"].is_alive()
        return loaded

    assert asyncio.run(load_and_join()) == 2
    assert not ran_in["alive"]
    ran_in["thread"].join(timeout=5)
    assert not ran_in["thread"].is_alive()
    assert ran_in["thread"] is not threading.main_thread()


def test_a_failed_load_raises_its_own_error_in_the_caller():
    def load() -> None:
        raise ValueError("not a model file")

    with pytest.raises(ValueError, match="not a model file"):
        asyncio.run(_in_own_thread(load))
