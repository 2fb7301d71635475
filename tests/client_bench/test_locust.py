"""The locustfile runs headless against a live server and records successes per adapter."""

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.api.conftest import certs, loopback  # noqa: F401 (certs: a fixture)
from tests.api.harness import ServerThread
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


def test_locustfile_reaches_a_server_over_mutual_tls(engine, certs, tmp_path):
    """It had only --token: against a TLS server every request failed with UNAVAILABLE."""
    config = loopback(tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key"), tls_client_ca=str(certs / "ca.pem"))
    thread = ServerThread(config, engine)
    try:
        prefix = tmp_path / "run"
        command = [
            sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", "1", "-r", "1", "-t", "3s",
            "--host", thread.target, "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING", "--max-new-tokens", "2",
            "--ca-cert", str(certs / "ca.pem"), "--client-cert", str(certs / "client.pem"), "--client-key", str(certs / "client.key"),
        ]
        subprocess.run(command, check=True, timeout=60, capture_output=True, cwd=tmp_path)
    finally:
        thread.stop()
    (total,) = [row for row in csv.DictReader((prefix.parent / "run_stats.csv").open()) if row["Name"] == "Aggregated"]
    assert int(total["Request Count"]) > 0 and int(total["Failure Count"]) == 0
