"""The locustfile runs headless against a live server and records successes per adapter."""

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.client_bench.conftest import ADAPTERS

# Never imported here: importing locust monkey-patches this whole process for gevent.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="locust is not installed (the locust extra)")

LOCUSTFILE = Path(__file__).parents[2] / "tandem" / "client" / "locust" / "locustfile.py"


def test_locustfile_records_ttft_and_e2e_per_adapter(server, tmp_path):
    prefix = tmp_path / "run"
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", "2", "-r", "2", "-t", "4s",
        "--host", server.target, "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING",
        "--popularity", "uniform", "--adapters", ",".join(ADAPTERS), "--max-new-tokens", "4",
    ]
    subprocess.run(command, check=True, timeout=60, capture_output=True, cwd=tmp_path)
    rows = list(csv.DictReader((prefix.parent / "run_stats.csv").open()))
    by_kind: dict[str, list[dict]] = {}
    for row in rows:
        if row["Name"] != "Aggregated":
            by_kind.setdefault(row["Type"], []).append(row)
    assert set(by_kind) == {"TTFT", "E2E"}
    assert {row["Name"] for row in by_kind["E2E"]} <= set(ADAPTERS)
    assert sum(int(row["Request Count"]) for row in by_kind["E2E"]) > 0
    assert all(int(row["Failure Count"]) == 0 for rows_ in by_kind.values() for row in rows_)
