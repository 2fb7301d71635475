"""The disk and host tiers: adapters by name, read lazily, kept in an LRU host cache.

Thousands of adapters may sit in the adapters directory; one is read the first time a
request or LoadAdapter names it. The host cache holds parsed adapters up to a byte budget;
an adapter used by a queued or running request is pinned and never evicted. The budget is
also the cache's memory, a host slab (host_slab.py) that PEFT files are read into: a read
evicts least recently used adapters until its block fits, and takes new memory only when
the adapters in use leave no room. Requests hold
the LoRAAdapter object they started with, so reloading a name (a new content hash) never
mixes versions inside one request. Thread-safe: API threads and the engine thread share it.

The adapters directory may be shared by several replicas (a ReadWriteMany volume): a cached
adapter's files are checked (one stat each) at most every `refresh_seconds` when a request
names it, and a changed file is read as a new version, so what one replica publishes the
others serve without a restart.

A folder of the adapters directory holding router_config.json is a router (a mixture of
expert adapters, router_format.py): got, loaded, listed, pinned and unloaded under its name
like an adapter (a changed router is read again by LoadAdapter). get() resolves its experts
to their current versions each time, and refuses experts that are unknown, routers
themselves, or that do not adapt what its gates route.
"""

import errno
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import TypeVar

import torch

from tandem.server.adapters.compeft_format import WEIGHTS_FILE as COMPRESSED_FILE
from tandem.server.adapters.compeft_format import (
    check_density, compressed_files, compressed_of_bytes, dense_slices, is_compressed, read_compressed,
)
from tandem.server.adapters.host_slab import HostSlab
from tandem.server.adapters.lora_init import draw_order
from tandem.server.adapters.merging import MergeSpec, merge_adapters
from tandem.server.adapters.mixture import Mixture, check_members
from tandem.server.adapters.peft_format import (
    CONFIG_FILE, WEIGHTS_FILE, LoRAAdapter, adapter_files, adapter_of_bytes, config_of_bytes, read_adapter,
)
from tandem.server.adapters.router_format import CONFIG_FILE as ROUTER_CONFIG_FILE
from tandem.server.adapters.router_format import GATES_FILE, Router, check_experts, is_router, read_router, router_of_bytes, router_settings
from tandem.server.adapters.slot_pool import SlotPool
from tandem.server.atomic_files import TEMP_NAME_BYTES, remove_leftovers, write_directory
from tandem.server.errors import (
    FailedPrecondition, IncompatibleAdapter, InvalidRequest, NotFound, ResourceExhausted, TandemError, Unavailable, excerpt,
)
from tandem.server.model.llama import LlamaModel
from tandem.server.model.lora_targets import TARGETS, module_path, target_of
from tandem.server.out_of_memory import out_of_memory

log = logging.getLogger("tandem.adapters")

# Interrupted publishes older than this are removed at start-up; younger ones may be another
# replica's write in flight (the adapters directory can be a shared volume).
LEFTOVER_AGE_SECONDS = 3600.0
NAME_MAX_BYTES = 255  # the longest file name Linux file systems take (NAME_MAX)
PATH_MAX_BYTES = 4096  # and the longest path (PATH_MAX)
# What identifies one version of an adapter's files without reading them: (inode, size,
# mtime) of the config and the weights. An atomic publish makes new inodes; a copy in place
# changes the size or the mtime, unless it keeps the size and lands within the mtime tick of
# the server's look at the files (see RACY_STAMP_NS).
FileStamp = tuple[tuple[int, int, int], ...]
# A stamp is trusted only once its files' mtimes are this much older than the start of the
# read it was taken for (git's "racy" index entries). A file rewritten in place at the same
# size (cp, rsync --inplace) within the tick of its mtime keeps its stamp: the old or a torn
# version was served until a restart or a LoadAdapter. A tick is a jiffy's few ms on Linux's
# coarse clock, 1 s on NFS servers with second timestamps, 2 s on FAT-style SMB and some FUSE
# mounts: 2 s covers them all. A file that recent is read again at the next check instead
# (its stamp stored as unknown, None), so a new version's files are read about once more.
# The mtimes of a network file system are its server's clock: a skew beyond this is not covered.
RACY_STAMP_NS = 2_000_000_000


class AdapterTier(str, Enum):
    DISK = "disk"
    HOST = "host"
    DEVICE = "device"


@dataclass
class AdapterInfo:
    """One known adapter as the API reports it."""

    name: str
    rank: int
    target_modules: list[str] = field(default_factory=list)
    tier: AdapterTier = AdapterTier.DISK
    content_hash: str = ""
    in_use: int = 0
    path: str = ""
    experts: list[str] = field(default_factory=list)  # a router's experts, in gate order
    format: str = "peft"  # how its weights are stored: "peft", "compeft" or "router"
    compression_ratio: float = 1.0  # float32 PEFT bytes / host cache bytes; 0 for a router


@dataclass
class SlotStats:
    """Device slot pool occupancy and churn, for metrics."""

    max_loras: int
    slots_in_use: int
    loads: int
    evictions: int
    load_seconds_total: float
    host_evictions: int
    prefetches: int


def check_adapter_name(name: str) -> None:
    """A name must be one directory of the adapters directory (InvalidRequest otherwise)."""
    if not name or "/" in name or name in (".", ".."):
        raise InvalidRequest(f"adapter name must be a non-empty single path component, got {excerpt(name)}")
    # Hidden entries of the adapters directory are the server's own (interrupted writes).
    if name.startswith("."):
        raise InvalidRequest(f"adapter name must not start with '.', got {excerpt(name)}")
    # vLLM's lora_requests_info lists adapters comma-separated: "x,sql-expert" read there as
    # two adapters, and the Gateway API Inference Extension sent sql-expert's traffic here.
    if "," in name:
        raise InvalidRequest(f"adapter name must not contain ',' (the metrics list adapters comma-separated), got {excerpt(name)}")
    _check_file_name("adapter name", name, NAME_MAX_BYTES)


def check_writable_name(name: str) -> None:
    """A name the server may write an adapter under: check_adapter_name's, short enough for
    the temp directory an atomic write builds beside it (InvalidRequest otherwise: a 250-byte
    name passed, and its job trained to the end before publishing failed)."""
    check_adapter_name(name)
    _check_file_name("adapter name", name, NAME_MAX_BYTES - TEMP_NAME_BYTES)


def resolve_adapter_dir(adapters_dir: Path | None, name: str, path: str) -> Path:
    """The directory to read `name` from: adapters_dir/path (default adapters_dir/name).

    Refuses paths that leave the adapters directory, so an admin token cannot make the
    server read arbitrary files, and names or paths the file system would refuse.
    """
    check_adapter_name(name)
    for part in path.split("/"):
        _check_file_name("path", part, NAME_MAX_BYTES)
    if adapters_dir is None:
        raise NotFound(f"adapter {excerpt(name)} not found: the server has no adapters directory (start it with --adapters-dir)")
    root = Path(adapters_dir).resolve()
    directory = (root / (path or name)).resolve()
    if not directory.is_relative_to(root):
        named = f"path {excerpt(path, 200)}" if path else f"adapter {excerpt(name)} (a link out of it)"
        raise InvalidRequest(f"{named} is outside the adapters directory")
    if not root.is_dir():
        # The path is the server's own (its start-up warning names it), not the caller's to see.
        raise NotFound(f"adapter {excerpt(name)} not found: the server's adapters directory (--adapters-dir) does not exist yet")
    _check_file_name("path", str(directory / "adapter_config.json"), PATH_MAX_BYTES - 1)
    if not (directory / "adapter_config.json").is_file() and not is_router(directory):
        shown = excerpt(f"{directory.relative_to(root)}/adapter_config.json", 200)
        raise NotFound(f"adapter {excerpt(name)} not found: no {shown} in the adapters directory")
    return directory


def _check_file_name(label: str, text: str, limit: int) -> None:
    """Names the OS would refuse (a NUL byte, too long) are the caller's error, not the server's."""
    if "\0" in text:
        raise InvalidRequest(f"{label} must not contain a NUL character")
    size = len(text.encode(errors="surrogatepass"))
    if size > limit:
        raise InvalidRequest(f"{label} is too long: {size} bytes where the file system allows {limit}")


# Reads of an adapter whose files keep changing under them before it is refused (Unavailable;
# a cached version stays served).
_READ_ATTEMPTS = 3
_Read = TypeVar("_Read")


def file_stamp(directory: Path) -> FileStamp | None:
    """The stamp of an adapter's (or a router's) files now; None while they are missing (being replaced)."""
    if is_router(directory):
        names = (ROUTER_CONFIG_FILE, GATES_FILE)
    else:
        names = (CONFIG_FILE, COMPRESSED_FILE if is_compressed(directory) else WEIGHTS_FILE)
    try:
        stats = [os.stat(directory / name) for name in names]
    except OSError:
        return None
    return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)


def trusted_stamp(stamp: FileStamp | None, looked_at_ns: int) -> FileStamp | None:
    """stamp, or None (unknown: read the files again at the next check) while one of its
    files was modified too close to looked_at_ns (time.time_ns() before the stamp was taken)
    for a later write in the same mtime tick to be told apart (RACY_STAMP_NS)."""
    if stamp is None or any(mtime_ns >= looked_at_ns - RACY_STAMP_NS for _, _, mtime_ns in stamp):
        return None
    return stamp


class AdapterRegistry:
    def __init__(
        self, adapters_dir: str | None, model: LlamaModel, max_rank: int, host_bytes: int, pool: SlotPool,
        refresh_seconds: float = 2.0, prefault: bool = False,
    ):
        self.adapters_dir = None if adapters_dir is None else Path(adapters_dir).resolve()
        self.model = model
        self.max_rank = max_rank
        self.host_bytes = host_bytes
        self.pool = pool
        self.refresh_seconds = refresh_seconds
        # The cache's budget as memory touched once (page-locked on CUDA) that reads fill.
        self.slab = HostSlab(host_bytes, pin=pool.device.type == "cuda", prefault=prefault)
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, LoRAAdapter] = OrderedDict()
        # name -> (stamp of the files the cached version was read from, when last checked)
        self._stamps: dict[str, tuple[FileStamp | None, float]] = {}
        # A cached adapter's newer version on disk whose files were refused: (directory, stamp).
        self._unreadable: dict[str, tuple[Path, FileStamp]] = {}
        self._known: dict[str, AdapterInfo] = {}
        self._routers: dict[str, Router] = {}
        self._in_use: dict[str, int] = {}
        # Cold reads under way: name -> the adapter they will give (get's single flight).
        self._reading: dict[str, Future[LoRAAdapter]] = {}
        # Names an admin unloaded: refused until loaded again (in memory; a restart forgets).
        self._unloaded: set[str] = set()
        # Folders of adapters_dir that could not be entered, already logged (servable_names).
        self._unlistable: set[str] = set()
        # name -> how many admin loads and unloads it has had (see _commit_name).
        self._admin_changes: dict[str, int] = {}
        # name -> (its publishes' lock, how many publishes hold or wait for it): _publishing_lock.
        self._publishing: dict[str, tuple[threading.Lock, int]] = {}
        self.host_evictions = 0
        if self.adapters_dir is not None and self.adapters_dir.is_dir():
            self._remove_leftovers()
        elif self.adapters_dir is not None:
            # Served once it appears (a volume still being filled): until then every adapter is NOT_FOUND.
            log.warning(
                "the adapters directory does not exist (yet): no adapter can be served until it does",
                extra={"fields": {"adapters_dir": str(self.adapters_dir)}},
            )

    def _remove_leftovers(self) -> None:
        # A serving replica may mount a shared adapters directory read-only: only the
        # replica that publishes can clean it, and the others must start all the same.
        try:
            remove_leftovers(self.adapters_dir, min_age_seconds=LEFTOVER_AGE_SECONDS)
        except OSError as exc:
            log.warning("interrupted adapter writes left in place: %s", exc)

    def get(self, name: str) -> LoRAAdapter | Router:
        """The adapter a new request should use: from the host cache (re-read if its files
        changed since, checked at most every refresh_seconds), else from disk (unless an
        admin unloaded it; from where it was last loaded, which LoadAdapter's path may have
        set). A router comes with its experts' current versions."""
        with self._lock:
            self._check_not_unloaded(name)
            router = self._routers.get(name)
            adapter = self._cache.get(name)
            known = self._known.get(name)
            if adapter is not None:
                self._cache.move_to_end(name)
                stamp, checked_at = self._stamps[name]
                if time.monotonic() - checked_at < self.refresh_seconds:
                    return adapter
                self._stamps[name] = (stamp, time.monotonic())
        if router is not None:
            return self._with_experts(router)
        asked = known.path if known is not None else name
        if adapter is None:
            directory = resolve_adapter_dir(self.adapters_dir, name, asked)
            if is_router(directory):
                return self._with_experts(self._read_router(name, directory, asked))
            return self._read_once(name, directory, asked)
        return self._refreshed(adapter, stamp, asked)

    def _read_once(self, name: str, directory: Path, asked: str) -> LoRAAdapter:
        """A cold read of name that every request asking for it meanwhile shares: a burst of
        requests for an adapter not in memory (each resolved in its own thread) reads,
        hashes and parses its file once, not once per request; a failure reaches them all."""
        with self._lock:
            pending = self._reading.get(name)
            reader = pending is None
            if reader:
                pending = self._reading[name] = Future()
        if not reader:
            return pending.result()
        try:
            adapter = self._read_and_cache(name, directory, asked)
        except BaseException as exc:
            pending.set_exception(exc)
            raise
        finally:
            with self._lock:
                del self._reading[name]
        pending.set_result(adapter)
        return adapter

    def mixture(self, members: list[tuple[str, float]]) -> Mixture:
        """The current versions of a per-request mixture's adapters, with their weights;
        refused when a member is unknown (NotFound), a router, or the mixture is malformed
        (InvalidRequest)."""
        check_members(members, self.pool.num_slots)
        adapters = []
        for name, _ in members:
            adapter = self.get(name)
            if isinstance(adapter, Router):
                raise InvalidRequest(f"a mixture names {excerpt(name)}, a router: a mixture mixes LoRA adapters")
            adapters.append(adapter)
        return Mixture(tuple(adapters), tuple(float(w) for _, w in members))

    def _read_router(
        self, name: str, directory: Path, asked: str, revive: bool = False, abandoned: threading.Event | None = None
    ) -> Router:
        """asked: the path it was read by (relative to the adapters directory, links not
        followed). revive: an admin's load, which serves an unloaded name again once its read
        succeeds. abandoned: as for load."""
        with self._lock:
            seen = self._admin_changes.get(name, 0)
        _, router = self._read_whole(name, directory, lambda: read_router(name, directory, self.model, self.check_router_fits))
        experts = self._with_experts(router).adapters
        with self._lock:
            if not self._commit_name(name, revive, seen, abandoned):
                return router
            self._routers[name] = router
            # A name is one thing at a time: a LoRA version cached under it is no longer served.
            self._cache.pop(name, None)
            self._stamps.pop(name, None)
            self._known[name] = AdapterInfo(
                name=name, rank=max(a.rank for a in experts), target_modules=_union(a.targets for a in experts),
                content_hash=router.content_hash, path=asked, experts=list(router.experts), format="router", compression_ratio=0.0,
            )
        return router

    def check_router_fits(self, name: str, num_experts: int) -> None:
        """A router runs only with all its experts in device slots at once."""
        if num_experts > self.pool.num_slots:
            raise FailedPrecondition(
                f"router {name!r} mixes {num_experts} experts, more than the server's {self.pool.num_slots} "
                "adapter slots: raise --max-loras (and --lora-pool-bytes)"
            )

    def _with_experts(self, router: Router) -> Router:
        """The router with its experts' current versions; refused with the exact reason
        when an expert is unknown, a router, or leaves a gated linear alone."""
        adapters = []
        for expert in router.experts:
            try:
                check_adapter_name(expert)
                if expert in self._routers or (self.adapters_dir is not None and is_router(self.adapters_dir / expert)):
                    raise FailedPrecondition(f"router {router.name!r} uses {expert!r}, a router: experts must be LoRA adapters")
                adapters.append(self.get(expert))
            except NotFound as exc:
                raise NotFound(f"router {router.name!r} uses expert {expert!r}, which cannot be served: {exc}") from exc
            except InvalidRequest as exc:
                raise FailedPrecondition(f"router {router.name!r} names an invalid expert: {exc}") from exc
            except IncompatibleAdapter as exc:
                raise IncompatibleAdapter(f"router {router.name!r} uses expert {expert!r}, which cannot be served: {exc}") from exc
        check_experts(router, adapters)
        return replace(router, adapters=tuple(adapters))

    def _refreshed(self, adapter: LoRAAdapter, stamp: FileStamp | None, asked: str) -> LoRAAdapter:
        """`adapter`, or the newer version its files hold now, found again by the path it was
        read by: a link re-pointed to another folder (git-sync's and Kubernetes volumes'
        atomic swap) serves the new folder. Files missing (an adapter being replaced) or
        unreadable (copied by hand, half written) keep the cached version: a request is never
        failed for a version it did not ask for. A version whose files were refused is not read
        again until they change (each refresh read all of a broken file on a request's thread);
        one whose read failed (permissions, an I/O error, memory) is tried at the next refresh."""
        directory = now = None
        looked_at = time.time_ns()
        try:
            directory = resolve_adapter_dir(self.adapters_dir, adapter.name, asked)
            now = file_stamp(directory)
            with self._lock:
                refused = self._unreadable.get(adapter.name) == (directory, now)
            if now is None or (now == stamp and directory == adapter.path) or refused:
                return adapter
            return self._read_and_cache(adapter.name, directory, asked)
        except (IncompatibleAdapter, NotFound, InvalidRequest, Unavailable, ResourceExhausted, OSError) as exc:
            log.warning("adapter %s changed on disk but cannot be read; serving the cached version: %s", adapter.name, exc)
            # Refused files are not read again until their stamp changes: only a stamp that
            # can be trusted to change (an in-place copy still being made may end within
            # the tick of the mtime seen here, at the same size).
            refusal = not isinstance(exc, (OSError, Unavailable, ResourceExhausted)) and not isinstance(exc.__cause__, OSError)
            if refusal and trusted_stamp(now, looked_at) is not None:
                with self._lock:
                    self._unreadable[adapter.name] = (directory, now)
            return adapter

    def load(self, name: str, path: str = "", abandoned: threading.Event | None = None) -> AdapterInfo:
        """(Re)read an adapter from disk (adapters_dir/path, default adapters_dir/name);
        a changed file becomes a new version at once, and an unloaded name is usable again.
        abandoned: set once the caller has gone: then nothing is loaded, or a load timed out
        on a slow disk, ending after a later unload or load of the name, undid it."""
        directory = resolve_adapter_dir(self.adapters_dir, name, path)
        if is_router(directory):
            self._read_router(name, directory, path or name, revive=True, abandoned=abandoned)
        else:
            self._read_and_cache(name, directory, path or name, revive=True, abandoned=abandoned)
        with self._lock:
            if (info := self._known.get(name)) is None:
                raise NotFound(f"adapter {excerpt(name)} was unloaded while it was being loaded: load it again to serve it")
            return self._live(info)

    def publish(self, name: str, config: dict, tensors: dict[str, torch.Tensor], a_init_seed: int | None = None) -> AdapterInfo:
        """Write a new version of `name` into the adapters directory, atomically, and make it
        the version new requests get (loading it, as an admin would); requests already
        running finish on theirs. a_init_seed: the trainer's, for an adapter trained here
        from a seed (LoRAAdapter.a_init_seed)."""
        return self._publish(name, adapter_files(config, tensors, a_init_seed))

    def publish_router(self, name: str, files: dict[str, bytes]) -> AdapterInfo:
        """Write a new version of router `name` (router_format's files) atomically and load it."""
        return self._publish(name, files)

    def merge(self, name: str, spec: MergeSpec, abandoned: threading.Event | None = None) -> tuple[AdapterInfo, dict[str, float]]:
        """Merge adapters into a new version of `name` (merging.py), published like a trained
        adapter; returns it and each projection's relative reconstruction error. abandoned:
        set once the caller has gone (its deadline passed): then nothing is published."""
        spec.check(self.max_rank)
        check_writable_name(name)
        adapters = [self._plain(n, "merge") for n in spec.adapters]
        base_model = adapters[0].config.get("base_model_name_or_path", "")
        result = merge_adapters(adapters, spec, base_model)
        return self._publish(name, adapter_files(result.config, result.tensors), abandoned), result.errors

    def compress(self, name: str, source: str, density: float, abandoned: threading.Event | None = None) -> AdapterInfo:
        """Write the ComPEFT-compressed form of adapter `source` (compeft_format.py) as a new
        version of `name`, and load it; abandoned as for merge."""
        check_writable_name(name)
        check_density(density)  # before the source is looked up and read
        adapter = self._plain(source, "compress")
        modules = {(layer, target_of(layer, group, s)): ab for ((layer, group), s), ab in dense_slices(adapter).items()}
        tensors = {}
        for layer, target in draw_order(modules):  # the order compressed_files draws the initial As in
            prefix = f"base_model.model.{module_path(layer, target)}"
            tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = modules[(layer, target)]
        # The config read with these weights: the file may hold a newer version, of another rank or scale.
        return self._publish(name, compressed_files(adapter.config, tensors, density, adapter.a_init_seed), abandoned)

    def _publish(self, name: str, files: Mapping[str, bytes], abandoned: threading.Event | None = None) -> AdapterInfo:
        """Writes a new adapter's folder, once its files pass the checks of the load that
        follows (_check_files), and loads it. A directory this server cannot write
        (Kubernetes mounts the serving replicas' read-only) is the caller's to fix, not an
        internal error. A caller that has gone gets nothing written: a merge it timed out on
        and sent again, corrected, was overwritten by the first when that one ended last.
        Publishes of one name run one at a time, the write and the load together, and a
        caller's going is checked again just before its version takes the name: a merge whose
        caller gave up mid-write (fsyncs) landed and was loaded after the corrected merge sent
        again meanwhile, which was then overwritten on disk and in the cache."""
        check_writable_name(name)
        if self.adapters_dir is None:
            raise IncompatibleAdapter("writing an adapter needs an adapters directory (start the server with --adapters-dir)")

        def check_not_abandoned() -> None:
            if abandoned is not None and abandoned.is_set():
                raise FailedPrecondition(f"the call that would write adapter {name!r} was cancelled: nothing was written")

        check_not_abandoned()
        self._check_files(name, files)
        with self._publishing_lock(name):
            try:
                write_directory(self.adapters_dir / name, files, before_swap=check_not_abandoned)
            except OSError as exc:
                if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT):
                    raise
                raise FailedPrecondition(
                    f"cannot write adapter {name!r} into the adapters directory ({exc.strerror}): publish it on a server "
                    "whose --adapters-dir is writable (in the Kubernetes layout, the trainer)"
                ) from exc
            # Loaded whatever `abandoned` says now: these files are the name's version on
            # disk, and no later publish of the name can land before this load (the lock).
            return self.load(name)

    def _check_files(self, name: str, files: Mapping[str, bytes]) -> None:
        """Refuse files that the load after their write would refuse, by the readers' own checks
        (a rank past --max-lora-rank, weights that overflow the slots' dtype, a router whose
        experts cannot serve under it): written first, they took the name and stayed its
        version on disk, served after an eviction, a restart or by another replica, though the
        publish had failed."""
        path = self.adapters_dir / name
        if ROUTER_CONFIG_FILE in files:
            settings = router_settings(name, files[ROUTER_CONFIG_FILE], self.check_router_fits)
            self._with_experts(router_of_bytes(name, path, settings, bytearray(files[GATES_FILE]), self.model))
            return
        config = config_of_bytes(name, files[CONFIG_FILE])
        if COMPRESSED_FILE in files:
            compressed_of_bytes(name, path, config, files[COMPRESSED_FILE], self.model, self.max_rank, self.pool.dtype)
        else:
            adapter_of_bytes(name, path, config, bytearray(files[WEIGHTS_FILE]), self.model, self.max_rank, self.pool.dtype)

    @contextmanager
    def _publishing_lock(self, name: str) -> Iterator[None]:
        """Held by a publish of name while it writes and loads (never the registry's lock,
        which no file I/O may hold): requests and other names go on meanwhile."""
        with self._lock:
            lock, holders = self._publishing.get(name) or (threading.Lock(), 0)
            self._publishing[name] = (lock, holders + 1)
        try:
            with lock:
                yield
        finally:
            with self._lock:
                holders = self._publishing[name][1] - 1
                if holders:
                    self._publishing[name] = (lock, holders)
                else:
                    del self._publishing[name]

    def _plain(self, name: str, action: str) -> LoRAAdapter:
        """The current version of a LoRA adapter (FailedPrecondition for a router: the name is
        well formed and served, just not a LoRA adapter, as for inputs adapting other projections)."""
        adapter = self.get(name)
        if isinstance(adapter, Router):
            done = {"merge": "merged", "compress": "compressed"}[action]
            raise FailedPrecondition(f"cannot {action} {excerpt(name)}: it is a router, and only LoRA adapters can be {done}")
        return adapter

    def unload(self, name: str, abandoned: threading.Event | None = None) -> None:
        """Forget an adapter and refuse it until an admin loads it again (its files stay on
        disk); requests already using it finish with the version they hold. One on disk that
        this server has not read yet is refused from now on too (a replica that had not
        served it answered NOT_FOUND, then served it at its first request). abandoned: as for
        load; an unload timed out on a slow disk, ending after the admin's next load of the
        name, made it NOT_FOUND."""
        with self._lock:
            if name in self._unloaded:
                raise NotFound(f"adapter {excerpt(name)} is not loaded")
        if name not in self._known:
            try:
                resolve_adapter_dir(self.adapters_dir, name, "")  # NotFound unless on disk
            except InvalidRequest:  # no adapter can have that name: none is loaded under it
                raise NotFound(f"adapter {excerpt(name)} is not loaded") from None
        with self._lock:
            self._check_not_abandoned(name, "unload", abandoned)
            self._known.pop(name, None)
            self._cache.pop(name, None)
            self._routers.pop(name, None)
            self._stamps.pop(name, None)
            self._unloaded.add(name)
            self._admin_changes[name] = self._admin_changes.get(name, 0) + 1

    def _commit_name(self, name: str, revive: bool, seen: int, abandoned: threading.Event | None = None) -> bool:
        """Under the lock, before a read's result is cached: whether to cache it. An unload
        while it was under way wins, unless the read is an admin's load (which makes the name
        servable again only now, once it succeeded: a failed load leaves an unloaded name
        unloaded). A request's read that an admin's load or unload overtook (seen: the count
        of those when it began) serves its request and is not cached: it may hold the older
        version, and cached it replaced a LoadAdapter's newer path until the next load. A load
        whose caller has gone is refused (_check_not_abandoned)."""
        self._check_not_abandoned(name, "load", abandoned)
        if revive:
            self._unloaded.discard(name)
            self._admin_changes[name] = self._admin_changes.get(name, 0) + 1
            return True
        self._check_not_unloaded(name)
        return self._admin_changes.get(name, 0) == seen

    def _check_not_abandoned(self, name: str, action: str, abandoned: threading.Event | None) -> None:
        """Under the lock, right before an admin's load or unload takes effect: refused once its
        caller has gone (abandoned set), so that it cannot land after a later load or unload of
        the name."""
        if abandoned is not None and abandoned.is_set():
            raise FailedPrecondition(f"the call that would {action} adapter {name!r} was cancelled: nothing was {action}ed")

    def _check_not_unloaded(self, name: str) -> None:
        if name in self._unloaded:
            raise NotFound(f"adapter {excerpt(name)} was unloaded: an admin must load it (LoadAdapter) before it is served again")

    def pin(self, adapter: LoRAAdapter | Router | Mixture) -> None:
        """Count a request using the adapter (a router: and each of its experts; a mixture:
        each of its adapters), so that
        its host copy is not evicted while the request runs."""
        with self._lock:
            for name in _names(adapter):
                self._in_use[name] = self._in_use.get(name, 0) + 1

    def unpin(self, adapter: LoRAAdapter | Router | Mixture) -> None:
        with self._lock:
            for name in _names(adapter):
                self._in_use[name] -= 1
                if not self._in_use[name]:
                    del self._in_use[name]
            self._evict_over_budget()

    def list(self) -> list[AdapterInfo]:
        """Every adapter read so far, with its tier and in-use count as they are now."""
        with self._lock:
            return [self._live(info) for _, info in sorted(self._known.items())]

    def servable_names(self) -> set[str]:
        """Every name a request may use now: those read so far and every adapter or router
        folder on disk (read at first use), less those an admin unloaded and the server's own
        hidden folders (interrupted writes)."""
        on_disk = set()
        if self.adapters_dir is not None and self.adapters_dir.is_dir():
            on_disk = {p.name for p in self.adapters_dir.iterdir() if self._holds_adapter(p)}
        with self._lock:
            return ({name for name in on_disk if not name.startswith(".")} | set(self._known)) - self._unloaded

    def _holds_adapter(self, folder: Path) -> bool:
        """Whether folder holds an adapter or a router; False for one the server may not enter
        (a shared volume's root-owned lost+found: its PermissionError failed every listing,
        /v1/models included), said once in the log."""
        try:
            return (folder / CONFIG_FILE).is_file() or is_router(folder)
        except OSError as exc:
            if folder.name not in self._unlistable:
                self._unlistable.add(folder.name)
                log.warning("%s is left out of the adapters offered: %s", folder, exc)
            return False

    def slot_stats(self) -> SlotStats:
        s = self.pool.stats()
        return SlotStats(
            s.num_slots, s.slots_in_use, s.loads, s.evictions, s.load_seconds_total, self.host_evictions, s.prefetches
        )

    def _read_and_cache(
        self, name: str, directory: Path, asked: str, revive: bool = False, abandoned: threading.Event | None = None
    ) -> LoRAAdapter:
        """asked, revive and abandoned: as _read_router's. A failed read leaves the version
        already cached (if any) in place."""
        with self._lock:
            seen = self._admin_changes.get(name, 0)
        stamp, (compressed, adapter) = self._read_whole(name, directory, lambda: self._read_files(name, directory))
        if self.pool.device.type == "cuda":
            adapter = adapter.pin_memory()  # a no-op for tensors read into page-locked memory (_memory's)
        with self._lock:
            if not self._commit_name(name, revive, seen, abandoned):
                return adapter
            cached = self._cache.get(name)
            if cached is not None and (cached.content_hash, cached.path) == (adapter.content_hash, adapter.path):
                # The same version read again (its stamp was not trusted yet, or a LoadAdapter
                # of unchanged files): requests go on sharing one object, and its memory.
                adapter = cached
            self._routers.pop(name, None)  # as in _read_router: the name is a LoRA adapter now
            self._unreadable.pop(name, None)
            self._cache[name] = adapter
            self._cache.move_to_end(name)
            self._stamps[name] = (stamp, time.monotonic())
            self._known[name] = AdapterInfo(
                name=name, rank=adapter.rank, target_modules=adapter.targets,
                # Relative to the adapters directory, as the proto says: never the server's layout.
                content_hash=adapter.content_hash, path=asked,
                format="compeft" if compressed else "peft",
                compression_ratio=adapter.float32_bytes / adapter.nbytes,
            )
            self._evict_over_budget()
        return adapter

    def _read_whole(self, name: str, directory: Path, read: Callable[[], _Read]) -> tuple[FileStamp | None, _Read]:
        """(stamp, read()) of one version of name's files, an adapter's or a router's; the
        stamp None (unknown) while the files are too recent to trust it (trusted_stamp). The
        config and the weights (or gates) are two files: a publish that replaces the folder
        between their reads (a compress of a PEFT adapter under its own name, a router
        republished) made a read fail saying the weights file was missing, or pair one
        version's config with the other's weights. Read again while the files changed during
        the read; a failure of files that stayed put is the files'. Files that changed during
        every attempt are refused (Unavailable): the last attempt went unchecked, and could
        serve one version's config with another's weights."""
        for attempt in range(_READ_ATTEMPTS):
            looked_at = time.time_ns()
            stamp = file_stamp(directory)
            try:
                result = read()
            except (TandemError, OSError):
                if attempt < _READ_ATTEMPTS - 1 and file_stamp(directory) != stamp:
                    continue
                raise
            if file_stamp(directory) == stamp:
                return trusted_stamp(stamp, looked_at), result
        raise Unavailable(
            f"adapter {excerpt(name)} changed on disk during each of {_READ_ATTEMPTS} reads of its files: "
            "retry once it is no longer being written"
        )

    def _read_files(self, name: str, directory: Path) -> tuple[bool, LoRAAdapter]:
        if is_compressed(directory):  # packed bits, a small copy of the file: no slab block outlives the read
            return True, read_compressed(name, directory, self.model, self.max_rank, self.pool.dtype)
        return False, read_adapter(name, directory, self.model, self.max_rank, self.pool.dtype, lambda n: self._memory(name, n))

    def _memory(self, name: str, size: int) -> "memoryview | bytearray":
        """Memory to read `size` bytes of name's weights into: a slab block, evicting least
        recently used adapters not in use (but not name's cached version, kept if the read
        fails) until one fits, or until unmapping the slab's unused chunks makes room for one
        of its size; new memory when none does (the cache then runs over budget while the
        adapters in use need it, as it always has). On CUDA that memory is page-locked from
        torch's caching host allocator, as the slab is: the file's bytes stay one buffer,
        which a slot load copies to the device in one transfer, where pinning the adapter
        after the read made a copy per tensor. Memory the host refuses is ResourceExhausted:
        a MemoryError was INTERNAL, and a cached version's refresh failed its request."""
        try:
            with self._lock:
                while (block := self.slab.block(size)) is None and self.slab.could_hold(size) and not self.slab.can_remap(size):
                    victim = next((n for n in self._cache if n != name and not self._in_use.get(n)), None)
                    if victim is None:
                        break
                    self._cache.pop(victim)
                    self._stamps.pop(victim, None)
                    self.host_evictions += 1
            # Outside the lock (a chunk's mapping faults its pages): other requests go on meanwhile.
            block = block if block is not None else self.slab.remap_block(size)
            if block is not None:
                return block
            if self.slab.pin:
                return memoryview(torch.empty(size, dtype=torch.uint8, pin_memory=True).numpy())
            return bytearray(size)
        except (MemoryError, RuntimeError, OSError) as exc:
            if not out_of_memory(exc):
                raise
            raise ResourceExhausted(
                f"not enough host memory to read adapter {excerpt(name)} ({size:,} bytes): retry, or lower "
                "--adapter-cache-bytes (or raise the server's memory limit) so that the cache and the adapters in use fit"
            ) from exc

    def _evict_over_budget(self) -> None:
        """Drop least recently used adapters not in use; the newest stays even over budget,
        since the request that read it has not pinned it yet."""
        total = sum(a.nbytes for a in self._cache.values())
        for name in list(self._cache)[:-1]:
            if total <= self.host_bytes:
                return
            if self._in_use.get(name):
                continue
            total -= self._cache.pop(name).nbytes
            self._stamps.pop(name, None)
            self.host_evictions += 1

    def _live(self, info: AdapterInfo) -> AdapterInfo:
        if info.experts:  # a router: on the device when every expert's cached version is
            cached = [self._cache.get(e) for e in info.experts]
            on_device = all(a is not None and self.pool.resident(a.content_hash) for a in cached)
            tier = AdapterTier.DEVICE if on_device else AdapterTier.HOST
        elif self.pool.resident(info.content_hash):
            tier = AdapterTier.DEVICE
        elif info.name in self._cache and self._cache[info.name].content_hash == info.content_hash:
            tier = AdapterTier.HOST
        else:
            tier = AdapterTier.DISK
        return replace(info, tier=tier, in_use=self._in_use.get(info.name, 0))


def _names(adapter: LoRAAdapter | Router | Mixture) -> list[str]:
    """The names a request on this adapter pins: a router's and its experts', a mixture's adapters'."""
    if isinstance(adapter, Mixture):
        return [a.name for a in adapter.adapters]
    return [adapter.name, *(a.name for a in adapter.adapters)] if isinstance(adapter, Router) else [adapter.name]


def _union(target_lists) -> list[str]:
    merged = {t for targets in target_lists for t in targets}
    return [t for t in TARGETS if t in merged]
