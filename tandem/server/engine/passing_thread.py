"""Run torch work on a thread that ends with it, so that no long-lived thread keeps an OpenMP team."""

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def in_passing_thread(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) on a thread that ends with it. The model's load runs torch's parallel ops,
    and OpenMP keeps a team of worker threads for every thread that ran one for as long as
    that thread lives; with more such workers than cores libgomp stops spinning between
    parallel regions, and the engine thread's small GEMMs ran ~1.7x slower (a bf16 LoRA
    shrink 18 -> 32 us, a 64-row MLP projection 155 -> 228 us, after the constructing thread
    had run torch work and stayed alive: an in-process AsyncEngine built on the main thread)."""
    box: list = []

    def run() -> None:
        try:
            box.append((fn(*args), None))
        except BaseException as exc:  # re-raised on the calling thread
            box.append((None, exc))

    thread = threading.Thread(target=run, name="tandem-build")
    thread.start()
    thread.join()
    result, error = box[0]
    if error is not None:
        raise error
    return result
