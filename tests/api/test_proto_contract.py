"""The tandem.v1 API keeps buf's STANDARD lint and never breaks the settled API on the wire
or in generated code: proto/tandem_v1.binpb is the API as released, `buf breaking` (FILE
rules) compares proto/ against it."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tandem.v1 import generation_pb2

REPO = Path(__file__).resolve().parents[2]
BASELINE = REPO / "proto" / "tandem_v1.binpb"


@pytest.fixture(scope="module")
def buf() -> str:
    """buf from the virtualenv (buf-bin, a test dependency), else from PATH."""
    path = Path(sys.executable).parent / "buf"
    found = str(path) if path.exists() else shutil.which("buf")
    assert found, "buf is missing: run `bash scripts/setup.sh` (it installs buf-bin from the test extra)"
    return found


def run_buf(buf: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([buf, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_buf_lint_standard(buf):
    result = run_buf(buf, "lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_breaking_change_against_the_settled_api(buf):
    result = run_buf(buf, "breaking", "--against", str(BASELINE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_breaking_check_catches_a_renamed_field(buf, tmp_path):
    """The check above can fail: the same module with one field renamed is a FILE break."""
    shutil.copytree(REPO / "proto", tmp_path / "proto", ignore=shutil.ignore_patterns("*.py", "*.binpb"))
    shutil.copy(REPO / "buf.yaml", tmp_path / "buf.yaml")
    proto = tmp_path / "proto" / "tandem" / "v1" / "generation.proto"
    proto.write_text(proto.read_text().replace("uint32 max_new_tokens = 4;", "uint32 max_tokens = 4;"))
    result = run_buf(buf, "breaking", "--against", str(BASELINE), cwd=tmp_path)
    assert result.returncode != 0
    assert "max_new_tokens" in result.stdout + result.stderr


def test_stream_request_has_the_fields_of_generate_request():
    """One request body (grpcurl's JSON, a client's bytes) serves Generate and GenerateStream:
    a field added to one must be added to the other with the same number and type."""

    def shape(message) -> list[tuple]:
        return sorted((f.number, f.name, f.type, f.is_repeated, f.has_presence, f.message_type and f.message_type.full_name) for f in message.DESCRIPTOR.fields)

    assert shape(generation_pb2.GenerateStreamRequest) == shape(generation_pb2.GenerateRequest)
