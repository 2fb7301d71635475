"""What `pip install tandem` gives a user: the client without torch (the server is the
`server` extra), one top-level package, type information, and a `tandem` command whose
client commands never import torch. The clean virtualenv is built once (about 15 s: a wheel
from this checkout, then its three requirements) and runs in the default suite."""

import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(*args: str | Path, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel of this checkout, built from a copy so the shared tree gets no build files."""
    root = tmp_path_factory.mktemp("packaging")
    source = root / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "tandem", source / "tandem", ignore=shutil.ignore_patterns("__pycache__"))
    built = run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", root / "dist", source)
    assert built.returncode == 0, built.stderr
    (path,) = (root / "dist").glob("tandem-*.whl")
    return path


@pytest.fixture(scope="module")
def client_venv(wheel, tmp_path_factory) -> Iterator[Path]:
    """A clean virtualenv with `pip install tandem` (the wheel) and nothing else."""
    venv = tmp_path_factory.mktemp("client-venv") / "venv"
    assert run(sys.executable, "-m", "venv", venv).returncode == 0
    installed = run(venv / "bin" / "python", "-m", "pip", "install", "-q", "-c", REPO / "deploy" / "constraints.txt", wheel, timeout=300)
    assert installed.returncode == 0, installed.stderr
    yield venv


def test_the_wheel_installs_one_top_level_package_with_type_information(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if not name.startswith("tandem-")} == {"tandem"}
    assert "tandem/py.typed" in names


def test_the_wheel_carries_every_c_kernel_source_and_header(wheel):
    """The CPU kernels are built from their sources on the serving machine: an install that
    lacked one (or the header they share) would serve through torch without a word."""
    names = set(zipfile.ZipFile(wheel).namelist())
    kernels = REPO / "tandem" / "kernels"
    needed = {f"tandem/{p.relative_to(REPO / 'tandem').as_posix()}" for p in [*kernels.rglob("*.c"), *kernels.rglob("*.h")]}
    assert needed and needed <= names, sorted(needed - names)


def test_the_base_install_is_the_client_without_torch(client_venv):
    python = client_venv / "bin" / "python"
    assert run(python, "-c", "import torch").returncode != 0
    listed = run(python, "-m", "pip", "list", "--format=freeze").stdout.lower()
    assert "torch" not in listed and "transformers" not in listed


def test_the_client_only_install_talks_to_a_server(client_venv, server):
    tandem = client_venv / "bin" / "tandem"
    health = run(tandem, "health", "--service", "tandem.v1.GenerationService", "--target", server.target)
    assert (health.returncode, health.stdout) == (0, "SERVING\n"), health.stderr
    generated = run(tandem, "generate", "Hello", "--max-new-tokens", "3", "--json", "--target", server.target)
    assert generated.returncode == 0 and '"generated_tokens": 3' in generated.stdout, generated.stderr


def test_serve_without_the_server_extra_says_what_to_install(client_venv):
    served = run(client_venv / "bin" / "tandem", "serve")
    assert served.returncode == 1
    assert "pip install 'tandem[server]'" in served.stderr


def test_a_project_with_its_own_clients_and_server_folders_imports_tandems_client(client_venv, tmp_path):
    for folder in ("clients", "server", "kernels"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text(f"OWNER = 'the project: {folder}'\n")
    code = "import clients, server; from tandem.client import TandemClient; print(clients.OWNER, server.OWNER, TandemClient.__module__)"
    imported = run(client_venv / "bin" / "python", "-c", code, cwd=tmp_path)
    assert imported.stdout.split() == ["the", "project:", "clients", "the", "project:", "server", "tandem.client.sync_client"], imported.stderr


def test_client_commands_do_not_import_torch(server):
    """Through the installed `tandem` entry point: a health probe must not pay for torch."""
    code = (
        "import sys; from importlib.metadata import entry_points; "
        "main = entry_points(group='console_scripts')['tandem'].load(); "
        f"code = main(['health', '--target', '{server.target}']); "
        "print(code, sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    probed = run(sys.executable, "-c", code)
    assert probed.stdout.split("\n")[-2] == "0 []", probed.stdout + probed.stderr
