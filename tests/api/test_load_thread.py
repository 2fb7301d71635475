"""The model loads in a thread of its own that ends with the load: a thread that ran torch ops
keeps an OpenMP worker team while it lives, and extra teams slow the engine thread's GEMMs."""

import asyncio
import threading

import pytest

from tandem.server.serve import _in_own_thread


def test_the_load_runs_in_a_thread_that_has_ended_when_it_returns():
    ran_in = {}

    def load(x: int) -> int:
        ran_in["thread"] = threading.current_thread()
        return x + 1

    assert asyncio.run(_in_own_thread(load, 1)) == 2
    ran_in["thread"].join(timeout=5)
    assert not ran_in["thread"].is_alive()
    assert ran_in["thread"] is not threading.main_thread()


def test_a_failed_load_raises_its_own_error_in_the_caller():
    def load() -> None:
        raise ValueError("not a model file")

    with pytest.raises(ValueError, match="not a model file"):
        asyncio.run(_in_own_thread(load))
