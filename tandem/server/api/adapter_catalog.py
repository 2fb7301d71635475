"""What the Adapters service needs from the adapter registry, and the catalog of a server
that serves no adapters.

server/adapters/registry.py implements AdapterCatalog; the servicer knows nothing else of it.
"""

import threading
from typing import Protocol

from tandem.server.adapters.compeft_format import check_density
from tandem.server.adapters.merging import MergeSpec
from tandem.server.adapters.registry import AdapterInfo, SlotStats, check_writable_name
from tandem.server.errors import FailedPrecondition, NotFound, excerpt

NO_ADAPTERS_DIR = "the server has no adapters directory (start it with --adapters-dir)"


class AdapterCatalog(Protocol):
    max_rank: int

    def list(self) -> list[AdapterInfo]: ...

    def servable_names(self) -> set[str]: ...

    def load(self, name: str, path: str = "", abandoned: threading.Event | None = None) -> AdapterInfo: ...

    def unload(self, name: str, abandoned: threading.Event | None = None) -> None: ...

    def merge(self, name: str, spec: MergeSpec, abandoned: threading.Event | None = None) -> tuple[AdapterInfo, dict[str, float]]: ...

    def compress(self, name: str, source: str, density: float, abandoned: threading.Event | None = None) -> AdapterInfo: ...

    def slot_stats(self) -> SlotStats: ...


class NoAdapterServing:
    """The catalog of a server started without --adapters-dir: adapters cannot be served.
    Reading or writing one is FAILED_PRECONDITION, as fine-tuning is when it is off: NOT_FOUND
    told clients the name was wrong. A malformed merge or compression is still INVALID_ARGUMENT."""

    max_rank = 0

    def list(self) -> list[AdapterInfo]:
        return []

    def servable_names(self) -> set[str]:
        return set()

    def load(self, name: str, path: str = "", abandoned: threading.Event | None = None) -> AdapterInfo:
        raise FailedPrecondition(f"cannot load adapter {excerpt(name)}: {NO_ADAPTERS_DIR}")

    def unload(self, name: str, abandoned: threading.Event | None = None) -> None:
        raise NotFound(f"adapter {excerpt(name)} is not loaded")

    def merge(self, name: str, spec: MergeSpec, abandoned: threading.Event | None = None) -> tuple[AdapterInfo, dict[str, float]]:
        spec.check(max_rank=spec.rank)  # no slots to hold its rank to: the spec's other checks
        check_writable_name(name)
        raise FailedPrecondition(f"cannot merge into adapter {excerpt(name)}: {NO_ADAPTERS_DIR}")

    def compress(self, name: str, source: str, density: float, abandoned: threading.Event | None = None) -> AdapterInfo:
        check_writable_name(name)
        check_density(density)
        raise FailedPrecondition(f"cannot compress adapter {excerpt(source)}: {NO_ADAPTERS_DIR}")

    def slot_stats(self) -> SlotStats:
        return SlotStats(
            max_loras=0, slots_in_use=0, loads=0, evictions=0, load_seconds_total=0.0, host_evictions=0, prefetches=0
        )
