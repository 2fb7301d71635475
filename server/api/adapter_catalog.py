"""What the Adapters service needs from the adapter registry, and the stand-in used until
the registry (issue 2) exists.

The registry will implement AdapterCatalog; the servicer knows nothing else about it.
"""

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Protocol

from server.errors import InvalidRequest, NotFound


class AdapterTier(str, Enum):
    DISK = "disk"
    HOST = "host"
    DEVICE = "device"


@dataclass
class AdapterInfo:
    """One registered adapter as the API reports it."""

    name: str
    rank: int
    target_modules: list[str] = field(default_factory=list)
    tier: AdapterTier = AdapterTier.DISK
    content_hash: str = ""
    in_use: int = 0
    path: str = ""


@dataclass
class SlotStats:
    """Device slot pool occupancy, for metrics."""

    max_loras: int
    slots_in_use: int
    evictions: int


class AdapterCatalog(Protocol):
    max_rank: int

    def list(self) -> list[AdapterInfo]: ...

    def load(self, name: str, directory: Path) -> AdapterInfo: ...

    def unload(self, name: str) -> None: ...

    def slot_stats(self) -> SlotStats: ...


def resolve_adapter_dir(adapters_dir: str | None, name: str, path: str) -> Path:
    """The directory to load `name` from: adapters_dir/path (default adapters_dir/name).

    Refuses paths that leave the adapters directory, so an admin token cannot read
    arbitrary server files through LoadAdapter.
    """
    if not name or "/" in name or name in (".", ".."):
        raise InvalidRequest(f"adapter name must be a non-empty single path component, got {name!r}")
    if adapters_dir is None:
        raise NotFound("the server has no adapters directory: start it with --adapters-dir")
    root = Path(adapters_dir).resolve()
    directory = (root / (path or name)).resolve()
    if not directory.is_relative_to(root):
        raise InvalidRequest(f"path {path!r} is outside the adapters directory")
    if not (directory / "adapter_config.json").is_file():
        raise NotFound(f"no adapter at {directory.relative_to(root)} in --adapters-dir (needs adapter_config.json)")
    return directory


class NoAdapterServing:
    """Stand-in catalog for a build without batched LoRA: nothing can be registered."""

    max_rank = 0

    def list(self) -> list[AdapterInfo]:
        return []

    def load(self, name: str, directory: Path) -> AdapterInfo:
        raise NotImplementedError(f"found adapter '{name}', but this build cannot serve adapters yet")

    def unload(self, name: str) -> None:
        raise NotFound(f"adapter '{name}' is not loaded")

    def slot_stats(self) -> SlotStats:
        return SlotStats(max_loras=0, slots_in_use=0, evictions=0)
