"""All-or-nothing writes: a crash or a kill at any moment leaves either the old content or
the new, never a half-written file or directory.

Files: write a temp file beside the target, fsync it, rename it over the target, fsync the
directory. Directories: build the whole new directory beside the target, fsync it, then
swap it into place in one step (Linux's renameat2 RENAME_EXCHANGE, so readers never see
the name missing), then remove the old one. Where the file system cannot swap (NFS, CIFS,
many FUSE mounts: Kubernetes' ReadWriteMany volumes), the old version is renamed aside
whole (ASIDE_PREFIX), the new one renamed in, and the old removed: the name is missing for
a moment, never half there. Leftover temp entries (from a kill mid-write) start with
TEMP_PREFIX; `remove_leftovers` clears them at start-up, and puts back an old version set
aside whose name a kill left missing.
"""

import ctypes
import errno
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

TEMP_PREFIX = ".tandem-tmp-"
# An old version set aside whole while its new one is renamed in (no atomic swap there).
ASIDE_PREFIX = TEMP_PREFIX + "old-"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _temp_beside(path: Path, prefix: str = TEMP_PREFIX) -> Path:
    """Where a write of path goes first: a hidden, unique name beside it."""
    return path.parent / f"{prefix}{uuid.uuid4().hex}-{path.name}"


# What the longer temp name adds to a name: a name within NAME_MAX less this is one a write can take.
TEMP_NAME_BYTES = len(_temp_beside(Path("x"), ASIDE_PREFIX).name) - 1


def write_file(path: Path, data: bytes) -> None:
    """Replace path's content with data atomically and durably."""
    temp = _temp_beside(path)
    try:
        _write_synced(temp, data)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_directory(path: Path, files: Mapping[str, bytes], before_swap: Callable[[], None] | None = None) -> None:
    """Make path a directory holding exactly these files, atomically and durably.
    before_swap: called once the new version is whole, just before it takes the name; what
    it raises leaves the name as it was (a publish whose caller has gone writes nothing)."""
    temp = _temp_beside(path)
    temp.mkdir(parents=True)
    try:
        for name, data in files.items():
            _write_synced(temp / name, data)
        fsync_dir(temp)
        if before_swap is not None:
            before_swap()
        _put_in_place(temp, path)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    fsync_dir(path.parent)


def _put_in_place(new: Path, path: Path) -> None:
    """Give directory `new` the name path, replacing the version there if any."""
    if not (path.exists() or path.is_symlink()):
        try:
            os.rename(new, path)
            return
        except OSError as exc:
            # Another writer made path since it was looked at (two first publishes of one
            # name at once, here or on another replica): the rename onto its folder failed
            # with ENOTEMPTY (INTERNAL, or a fine-tuning job failed after its whole run).
            # Its version is replaced like any other.
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    if _exchange(new, path):
        _remove(new)  # new now holds the old version
    else:
        _swap_aside(new, path)


def _swap_aside(new: Path, path: Path) -> None:
    """Put directory `new` at path where no atomic swap is possible: the old version renamed
    aside whole, the new renamed in, the old removed. Removing the old first (file by file)
    left a killed write's adapter half deleted; now a kill leaves it whole, aside, and
    remove_leftovers puts it back."""
    aside = _temp_beside(path, ASIDE_PREFIX)
    os.rename(path, aside)
    os.utime(aside, follow_symlinks=False)  # fresh: another replica's start spares it (min_age_seconds)
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(aside, path)
        raise
    fsync_dir(path.parent)
    _remove(aside)


def check_writable(directory: Path) -> None:
    """Raises OSError when directory cannot take what write_directory writes there (a temp
    folder made and removed), so that a server finds out at start, not at its first write."""
    probe = _temp_beside(directory / "write-check")
    os.mkdir(probe)
    os.rmdir(probe)


def _remove(path: Path) -> None:
    """Remove a replaced version: a directory, or a symlink to one (an admin's prod -> prod-v1
    layout), whose target stays."""
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path)


def make_directories(path: Path) -> None:
    """mkdir -p that lasts: each directory it creates is fsynced into its parent, so files
    written into it durably are not lost with it after a power failure."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)
        fsync_dir(directory.parent)


def remove_leftovers(directory: Path, min_age_seconds: float = 0.0) -> list[Path]:
    """Delete what interrupted writes left in directory; returns what was removed. An old
    version set aside (ASIDE_PREFIX) whose name a kill left missing goes back instead. In a
    directory other processes may write too, min_age_seconds spares their writes in flight."""
    removed = []
    now = time.time()
    for entry in sorted(directory.glob(f"{TEMP_PREFIX}*"), key=lambda e: not e.name.startswith(ASIDE_PREFIX)):
        if now - entry.lstat().st_mtime < min_age_seconds:
            continue
        if entry.name.startswith(ASIDE_PREFIX):
            target = directory / entry.name[len(ASIDE_PREFIX) + 33 :]  # past "<32 hex>-"
            if not (target.exists() or target.is_symlink()):
                os.rename(entry, target)
                continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry)
    return removed


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step; False where the system cannot (then the caller
    falls back to remove-then-rename, which leaves the name missing for a moment)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0
