"""The container image without Docker: the Dockerfile passes a linter, its Python install
step is deploy/install.sh, and that script, run the same way in a dry run against the test
environment, finds every pinned version already there (what CI tests is what ships)."""

import importlib.util
import os
import re
import shlex
import socket
import subprocess
import sys
import sysconfig
from dataclasses import replace
from importlib import metadata
from pathlib import Path

import pytest

from tests.api.conftest import loopback
from tests.api.harness import ServerThread
from tests.conftest import ipv6_loopback
from tests.deploy.conftest import REPO

DOCKERFILE = REPO / "deploy" / "Dockerfile"
# A script beside the Dockerfile, not a package of ours.
_spec = importlib.util.spec_from_file_location("freeze_constraints", REPO / "deploy" / "freeze_constraints.py")
freeze_constraints = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(freeze_constraints)


def _tool(name: str) -> str:
    path = Path(sysconfig.get_path("scripts")) / name
    if not path.exists():
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    return str(path)


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per line of the Dockerfile, continuations joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_the_dockerfile_passes_hadolint():
    run = subprocess.run([_tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_both_images_install_through_the_script_ci_runs_and_run_as_a_numeric_user():
    stages, runs = {}, []
    for instruction, args in _instructions():
        if instruction == "FROM":
            stage = args.split(" AS ")[-1].strip() if " AS " in args else args
            stages[stage] = []
        elif instruction == "RUN":
            stages[stage].append(args)
        elif instruction == "USER":
            assert re.fullmatch(r"\d+(:\d+)?", args), f"USER {args}: the kubelet checks runAsNonRoot on numeric ids only"
    for build in ("build-cpu", "build-cuda"):
        runs = stages[build]
        assert len(runs) == 1 and runs[0].startswith("deploy/install.sh /opt/tandem/bin/python "), runs
    assert {"cpu", "cuda"} <= set(stages)
    assert _instructions()[-1] == ("COPY", "--from=build-cpu /opt/tandem /opt/tandem"), "cpu must stay the default (last) target"


def test_the_build_context_holds_what_the_dockerfile_copies_and_nothing_more():
    allowed = {line[1:] for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    lines = (REPO / ".dockerignore").read_text().splitlines()
    assert "*" in lines, "everything else (.venv, bench results) must stay out of the context"
    copied = {src for instruction, args in _instructions() if instruction == "COPY" and not args.startswith("--from")
              for src in args.split()[:-1]}
    assert copied == allowed


def test_the_constraints_pin_exactly_the_runtime_environment_under_test():
    expected = freeze_constraints.render()
    assert freeze_constraints.CONSTRAINTS.read_text() == expected, (
        "deploy/constraints.txt differs from this environment's runtime packages: "
        "run `.venv/bin/python deploy/freeze_constraints.py` (after `bash scripts/setup.sh`) and commit it"
    )


def test_the_image_install_script_resolves_to_what_is_installed():
    # The image's commands and constraints, with no index and no build isolation: every
    # pinned package must already be here, so only the project itself would be installed.
    env = {**os.environ, "PIP_DRY_RUN": "1", "PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0", "PIP_NO_COLOR": "1"}
    run = subprocess.run(
        ["sh", "deploy/install.sh", sys.executable, "https://download.pytorch.org/whl/cpu"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    would = [line for line in run.stdout.splitlines() if line.startswith("Would install")]
    assert would and all(line.split()[2:] == [f"tandem-{metadata.version('tandem')}"] for line in would), would


def _image_env() -> dict[str, str]:
    """The runtime image's ENV variables."""
    env = {}
    for instruction, args in _instructions():
        if instruction == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(args))
    return env


@pytest.mark.skipif(not (ipv6_loopback() and socket.has_dualstack_ipv6()), reason="no dual-stack IPv6 loopback here")
def test_the_images_host_serves_ipv4_and_ipv6_on_every_port():
    """On an IPv6-only cluster the Gateway, the endpoint picker and Prometheus reach the pod
    over IPv6: with 0.0.0.0 its HTTP and metrics ports never answered them."""
    thread = ServerThread(replace(loopback(), host=_image_env()["TANDEM_HOST"]), None)
    try:
        for address in ("127.0.0.1", "::1"):
            for port in (thread.server.port, thread.server.http_port, thread.server.metrics_port):
                socket.create_connection((address, port), timeout=10).close()
    finally:
        thread.stop()
