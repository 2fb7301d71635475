"""Where the native kernels are built and with what: a machine that cannot say where home
is, and a CC that carries arguments, still get them (the torch path serves only where no
compiler works)."""

import shutil
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
