"""Building the CPU kernels written in C (LoRA's sgmv_cpu.c, decode_attention_cpu.c) into
shared libraries, once per machine.

Built with the machine's C compiler (`cc -O3 -march=native -fopenmp`: the kernels run in
torch's OpenMP team) into a cache folder ($TANDEM_CACHE_DIR, else $XDG_CACHE_HOME/tandem,
else ~/.cache/tandem), under a name keyed by the source and the headers beside it, the
compiler and the CPU's flags, written to a temporary file, fsynced and renamed: a build
killed halfway leaves nothing another process could load. Built without OpenMP only where the
compiler says it has none. Without a compiler, or where the build fails, there is no library
and the caller's torch path serves; a failure that may pass (out of memory, a compiler killed,
a timeout) caches nothing, so the next start tries again.
"""

import ctypes
import hashlib
import logging
import os
import platform
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

_FLAGS = ("-O3", "-march=native", "-fPIC", "-shared")
_HEADERS = sorted(Path(__file__).parent.rglob("*.h"))
# A compiler without OpenMP: GCC without libgomp ("cannot read spec file 'libgomp.spec'",
# "cannot find -lgomp"), clang without libomp ("-lomp", "'omp.h' file not found"), Apple's
# clang ("unsupported option '-fopenmp'").
_NO_OPENMP = re.compile(r"openmp|gomp|-lomp|omp\.h", re.IGNORECASE)


def cache_dir() -> Path:
    if os.environ.get("TANDEM_CACHE_DIR"):
        return Path(os.environ["TANDEM_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "tandem"
    try:
        return Path.home() / ".cache" / "tandem"
    except RuntimeError:  # no HOME and a UID with no passwd entry (a container's arbitrary user)
        return Path(tempfile.gettempdir()) / f"tandem-cache-{os.getuid()}"


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")


def _compile(compiler: list[str], source: Path, out: Path, defines: tuple[str, ...]) -> bool:
    """Build the library at out (OpenMP unless the compiler says it has none); False when it
    cannot. Any other failure of the OpenMP build (fork out of memory, a compiler the OOM
    killer ended, a timeout) is not retried without OpenMP: that build would be cached under
    this name for good, single-threaded. Nothing is cached; the next start tries again."""
    for extra in (("-fopenmp",), ()):
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=out.stem, suffix=".tmp", delete=False) as tmp:
            tmp_path = Path(tmp.name)
        try:
            done = subprocess.run(
                [*compiler, *_FLAGS, *(f"-D{d}" for d in defines), *extra, "-o", str(tmp_path), str(source)], capture_output=True, text=True, timeout=120
            )
            if done.returncode == 0:
                with open(tmp_path, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp_path, out)
                return True
            log.info("building %s with %s failed: %s", source.name, " ".join(extra) or "no OpenMP", done.stderr[-500:])
            # Without OpenMP only where the compiler exited saying so (a negative code: a
            # signal ended it, whatever it had printed).
            if not (extra and done.returncode > 0 and _NO_OPENMP.search(done.stderr)):
                return False
        except (OSError, subprocess.SubprocessError) as exc:
            log.info("building %s failed: %s", source.name, exc)
            return False
        finally:
            tmp_path.unlink(missing_ok=True)
    return False


def build(source: Path, switch: str, defines: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """source's library, built if this machine has none yet; None where the environment
    variable `switch` is "0", there is no compiler, or the build fails. defines: macros
    (NAME=VALUE) for a variant of the source, e.g. a benchmark's."""
    if os.environ.get(switch, "1") == "0":
        return None
    try:
        # CC may carry arguments ("ccache gcc", "gcc -m64"), as make takes it: run as one program
        # name it failed, and every native kernel was off with an info line to say so.
        compiler = shlex.split(os.environ.get("CC", "")) or [c for c in (shutil.which("cc") or shutil.which("gcc"),) if c]
        if not compiler:
            log.info("no C compiler: %s is not built, the torch path serves", source.name)
            return None
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        # The whole command, not only its --version: "gcc -m32" says what gcc says.
        texts = [source.read_text(), *(h.read_text() for h in _HEADERS), version, shlex.join(compiler), " ".join(_FLAGS + defines), _cpu_flags()]
        key = hashlib.sha256("\0".join(texts).encode()).hexdigest()[:16]
        path = cache_dir() / "kernels" / f"{source.stem}-{key}.so"
        if path.exists():
            try:
                return ctypes.CDLL(str(path))
            except OSError as exc:  # a library this process cannot load: built again, once
                log.info("%s's cached build does not load (%s): building it again", source.name, exc)
                path.unlink(missing_ok=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not _compile(compiler, source, path, defines):
            return None
        return ctypes.CDLL(str(path))
    except (OSError, ValueError, subprocess.SubprocessError) as exc:  # ValueError: a CC shlex cannot split
        log.info("%s is unavailable: %s", source.name, exc)
        return None
