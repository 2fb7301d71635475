"""scripts/setup.sh, the README's first command, run against a stand-in .venv/bin/python that
records what it is asked to do (no network, no install): the decisions it makes about torch."""

import shutil
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).parents[2]

# Answers like a venv whose torch is not the pin, where PyTorch's CPU index cannot be reached
# and pip's own index has only the GPU build: GPU=1 once torch was installed from there.
FAKE_PYTHON = r"""#!/usr/bin/env bash
here=$(dirname "$0")
echo "$*" >> "$here/calls"
case "$*" in
    *"sys.version_info"*) exit 0 ;;
    *"version('torch')"*) echo 2.0.0 ;;
    *"torch.version.cuda"*) if [ -f "$here/gpu" ]; then echo True; else echo False; fi ;;
    *"download.pytorch.org"*) exit 1 ;;
    *"pip install"*"torch=="*) touch "$here/gpu" ;;
esac
exit 0
"""


def test_a_gpu_torch_from_the_fallback_index_is_refused_and_removed(tmp_path):
    """Where PyTorch's CPU index could not be reached, the fallback to pip's own index
    installed PyPI's multi-GB CUDA build without a word, and kept it on every later run."""
    for path in ("scripts/setup.sh", "pyproject.toml", "deploy/constraints.txt"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / path, tmp_path / path)
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(python.stat().st_mode | stat.S_IEXEC)

    done = subprocess.run(["bash", str(tmp_path / "scripts/setup.sh")], capture_output=True, text=True, timeout=60)
    calls = (python.parent / "calls").read_text().splitlines()
    assert done.returncode == 1
    assert "could not be reached" in done.stderr and "GPU build of torch==" in done.stderr
    assert any("pip uninstall" in call and "torch" in call for call in calls)
    assert not any("-e .[server" in call for call in calls), "the project was installed over a GPU torch"
    assert not (tmp_path / ".venv" / ".tandem-setup").exists()
