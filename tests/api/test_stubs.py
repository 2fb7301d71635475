"""The committed stubs in tandem/v1 are exactly what proto/gen_stubs.py makes from proto/."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def sources(root: Path, stubs: Path) -> dict[Path, str]:
    """The stubs' .py and .pyi files (not the __pycache__ any import leaves beside them)."""
    return {p.relative_to(root): p.read_text() for p in stubs.iterdir() if p.suffix in (".py", ".pyi")}


def test_committed_stubs_match_the_protos(tmp_path):
    subprocess.run([sys.executable, str(REPO / "proto" / "gen_stubs.py"), "--out", str(tmp_path)], check=True, capture_output=True)
    fresh = sources(tmp_path, tmp_path / "tandem" / "v1")
    committed = sources(REPO, REPO / "tandem" / "v1")
    assert sorted(fresh) == sorted(committed), "stub files differ: run `python proto/gen_stubs.py`"
    stale = [str(path) for path, text in fresh.items() if committed[path] != text]
    assert not stale, f"stale stubs {stale}: run `python proto/gen_stubs.py`"
