"""Where the native kernels are built and with what: a machine that cannot say where home
is, and a CC that carries arguments, still get them (the torch path serves only where no
compiler works)."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tandem.kernels import native_build


def test_no_home_directory_builds_in_the_temp_directory(monkeypatch):
    """Path.home() raises when HOME is unset and the UID has no passwd entry (a container's
    arbitrary user): that error left every native kernel's first use, and the server's start."""
    for name in ("TANDEM_CACHE_DIR", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.delenv(name, raising=False)

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    assert native_build.cache_dir().parent == Path(tempfile.gettempdir())


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_a_cc_with_arguments_builds(tmp_path, monkeypatch):
    """CC="ccache gcc" was run as one program name: not found, and every kernel off."""
    source = tmp_path / "answer.c"
    source.write_text("int tandem_answer(void) { return 42; }\n")
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", f"env {shutil.which('cc')}")
    library = native_build.build(source, "TANDEM_NATIVE_TEST")
    assert library is not None and library.tandem_answer() == 42


def test_a_cc_shlex_cannot_split_leaves_the_torch_path(tmp_path, monkeypatch):
    """CC='gcc "' raised ValueError out of the first kernel's use, and the server's start."""
    source = tmp_path / "answer.c"
    source.write_text("int tandem_answer(void) { return 42; }\n")
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", 'gcc "')
    assert native_build.build(source, "TANDEM_NATIVE_TEST") is None


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_a_cached_library_that_does_not_load_is_built_again(tmp_path, monkeypatch):
    """A cached file CDLL refuses (cut short by a full disk, another CC's) made every start
    serve the torch path for good."""
    source = tmp_path / "answer.c"
    source.write_text("int tandem_answer(void) { return 42; }\n")
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))
    # Built in another process: this one must not have the library loaded already.
    subprocess.run(
        [sys.executable, "-c", f"from tandem.kernels import native_build; native_build.build(__import__('pathlib').Path({str(source)!r}), 'X')"],
        check=True, env={**os.environ, "TANDEM_CACHE_DIR": str(tmp_path / "cache")},
    )
    (cached,) = (tmp_path / "cache" / "kernels").iterdir()
    cached.write_bytes(b"not a shared library")
    library = native_build.build(source, "TANDEM_NATIVE_TEST")
    assert library is not None and library.tandem_answer() == 42


def test_a_build_that_times_out_caches_no_single_threaded_library(tmp_path, monkeypatch):
    """On a loaded host the OpenMP build ran past its timeout, and the build without OpenMP
    that followed was cached under the same name: single-threaded kernels for good."""
    source = tmp_path / "answer.c"
    source.write_text("int tandem_answer(void) { return 42; }\n")
    out = tmp_path / "answer.so"
    commands = []

    def slow(command, **kwargs):
        commands.append(command)
        raise native_build.subprocess.TimeoutExpired(command, 120)

    monkeypatch.setattr(native_build.subprocess, "run", slow)
    assert not native_build._compile(["cc"], source, out, ())
    assert len(commands) == 1 and "-fopenmp" in commands[0] and not out.exists()


def _fake_compiler(monkeypatch, returncode: int, stderr: str = "", error: OSError | None = None) -> list[list[str]]:
    """subprocess.run as a compiler whose OpenMP build ends so (and whose plain build works);
    the commands it was given."""
    commands = []

    def run(command, **kwargs):
        commands.append(command)
        if "-fopenmp" not in command:
            return subprocess.CompletedProcess(command, 0, "", "")
        if error is not None:
            raise error
        return subprocess.CompletedProcess(command, returncode, "", stderr)

    monkeypatch.setattr(native_build.subprocess, "run", run)
    return commands


@pytest.mark.parametrize(
    "returncode, stderr, error",
    [
        (4, "gcc: fatal error: Killed signal terminated program cc1\ncompilation terminated.", None),
        (-9, "", None),
        (1, "sgmv_cpu.c:3:1: error: expected ';' before '}' token", None),
        (0, "", OSError(12, "Cannot allocate memory")),
    ],
    ids=["cc1-killed", "driver-killed", "compile-error", "fork-enomem"],
)
def test_an_openmp_build_that_fails_otherwise_caches_no_single_threaded_library(tmp_path, monkeypatch, returncode, stderr, error):
    """Any failure of the OpenMP build (the OOM killer, fork out of memory) was followed by a
    build without OpenMP, cached under the same name: single-threaded kernels for good."""
    source = tmp_path / "answer.c"
    source.write_text("int tandem_answer(void) { return 42; }\n")
    out = tmp_path / "answer.so"
    commands = _fake_compiler(monkeypatch, returncode, stderr, error)
    assert not native_build._compile(["cc"], source, out, ())
    assert len(commands) == 1 and "-fopenmp" in commands[0] and not out.exists()


@pytest.mark.parametrize(
    "stderr",
    [
        "gcc: fatal error: cannot read spec file 'libgomp.spec': No such file or directory",
        "/usr/bin/ld: cannot find -lgomp: No such file or directory",
        "clang: error: unsupported option '-fopenmp'",
        "sgmv_cpu.c:25:10: fatal error: 'omp.h' file not found",
        "ld: library not found for -lomp",
    ],
)
def test_a_compiler_without_openmp_builds_without_it(tmp_path, monkeypatch, stderr):
    source = tmp_path / "answer.c"
    source.write_text("int tandem_answer(void) { return 42; }\n")
    out = tmp_path / "answer.so"
    commands = _fake_compiler(monkeypatch, 1, stderr)
    assert native_build._compile(["cc"], source, out, ())
    assert len(commands) == 2 and "-fopenmp" not in commands[1] and out.exists()
