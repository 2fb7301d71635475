"""The server's loaded heap is frozen while it serves (tandem/server/heap.py)."""

import gc

import pytest

from tandem.server.heap import frozen_heap


def test_the_heap_is_frozen_inside_and_released_after_even_on_error():
    loaded = [object() for _ in range(3)]
    with pytest.raises(RuntimeError):
        with frozen_heap():
            assert gc.get_freeze_count() >= len(loaded)
            raise RuntimeError("serving failed")
    assert gc.get_freeze_count() == 0


def test_cycles_made_while_frozen_are_still_collected():
    with frozen_heap():
        cycle: list = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1
