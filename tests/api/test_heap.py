"""The server's loaded heap is frozen while it serves (tandem/server/heap.py)."""

import gc
import weakref

import pytest

from tandem.server.heap import frozen_heap


def test_the_heap_is_frozen_inside_and_released_after_even_on_error():
    loaded = [object() for _ in range(3)]
    with pytest.raises(RuntimeError):
        with frozen_heap():
            assert gc.get_freeze_count() >= len(loaded)
            raise RuntimeError("serving failed")
    assert gc.get_freeze_count() == 0


class _Node:
    """A container a weakref can watch: a list cannot have one."""


def test_cycles_made_while_frozen_are_still_collected():
    """By the collector's own runs while serving, not only by an explicit gc.collect()."""
    with frozen_heap():
        assert gc.isenabled() and gc.get_threshold()[0] > 0
        node = _Node()
        node.self = node
        dead = weakref.ref(node)
        del node
        # Containers kept alive count towards the youngest generation's threshold; the cycle
        # may have been promoted once (a run between its making and its del), so allow for
        # a middle-generation run too, with room to spare.
        first, middle = gc.get_threshold()[:2]
        kept = []
        for _ in range(4 * first * max(middle, 1)):
            kept.append([])
            if dead() is None:
                break
        assert dead() is None, "the cycle outlived automatic collections"
        del kept
        cycle: list = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1
