"""The locustfile runs headless against a live server and records successes per adapter."""

import csv
import json
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
    assert {row["Name"] for row in by_kind["TTFT"]} <= set(ADAPTERS)
    requests = sum(int(row["Request Count"]) for row in by_kind["E2E"])
    assert requests > 0
    assert all(int(row["Failure Count"]) == 0 for rows_ in by_kind.values() for row in rows_)
    # Every request once in the totals: its TTFT has a row of its own but is no second request
    # (fired as one, the Aggregated row, RPS and CSV totals counted each request twice).
    (total,) = [row for row in rows if row["Name"] == "Aggregated"]
    assert int(total["Request Count"]) == requests
    assert sum(int(row["Request Count"]) for row in by_kind["TTFT"]) == requests


def test_locustfile_reaches_a_server_over_mutual_tls(engine, certs, tmp_path):
    """It had only --token: against a TLS server every request failed with UNAVAILABLE."""
    config = loopback(
        tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key"), tls_client_ca=str(certs / "ca.pem"), http_port=None
    )
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


USER_SCRIPT = r"""
import json, sys
from types import SimpleNamespace
import grpc
import numpy as np
from locust.env import Environment
sys.path.insert(0, sys.argv[2])
import importlib.util
spec = importlib.util.spec_from_file_location("tandem_locustfile", sys.argv[1])
locustfile = importlib.util.module_from_spec(spec)
spec.loader.exec_module(locustfile)
from tandem.client import TandemRpcError
from tandem.client.bench.popularity import build_popularity
from tandem.client.bench.prompts import synthetic_prompts


class FakeClient:
    def __init__(self, script):
        self.script = script

    def stream(self, **kwargs):
        for item in self.script.pop(0):
            if isinstance(item, Exception):
                raise item
            yield SimpleNamespace(token_ids=[1] * item[0], generated_tokens=item[1], finish_reason=item[2])


environment = Environment(user_classes=[locustfile.TandemUser])
environment.create_local_runner()
user = locustfile.TandemUser(environment)
user.popularity, user.prompts, user.rng = build_popularity("none", []), synthetic_prompts(), np.random.default_rng(0)
user.max_new_tokens = 2
user.client = FakeClient(SCRIPT)
for _ in range(len(user.client.script)):
    user.stream()
stats = environment.stats
entry = lambda kind: stats.get("(base)", kind)
print(json.dumps({
    "total": [stats.total.num_requests, stats.total.num_failures],
    "E2E": [entry("E2E").num_requests, entry("E2E").num_failures],
    "TTFT": [entry("TTFT").num_requests, entry("TTFT").num_failures],
    "errors": sorted(e.method for e in stats.errors.values()),
}))
"""


def user_counts(tmp_path, script: str) -> dict:
    """Locust's counts after one user streamed once per item of `script` (the fake server's
    replies: (tokens in the message, generated so far, finish reason) tuples or errors). Run
    apart: importing locust monkey-patches the process for gevent."""
    path = tmp_path / "user.py"
    path.write_text(USER_SCRIPT.replace("FakeClient(SCRIPT)", f"FakeClient({script})"))
    done = subprocess.run([sys.executable, str(path), str(LOCUSTFILE), str(Path(__file__).parents[2])],
                          check=True, timeout=60, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_each_request_counts_once_in_locusts_totals_and_its_ttft_apart(tmp_path):
    """Fired as a second request event, TTFT doubled every request in the Aggregated row,
    RPS and CSV totals and mixed its times into their percentiles."""
    counts = user_counts(tmp_path, """[
        [(1, 1, None), (1, 2, "length")],                                        # served
        [TandemRpcError(grpc.StatusCode.UNAVAILABLE, "down")],                   # failed before its first token
        [(1, 1, None), TandemRpcError(grpc.StatusCode.UNAVAILABLE, "down")],     # failed after it
        [(1, 1, None), (0, 1, "abort")],                                         # aborted by a draining server
    ]""")
    assert counts["total"] == [4, 3]  # 4 requests, 3 failed: the E2E events alone
    assert counts["E2E"] == [4, 3]
    # A TTFT for the request served, and a failed one for the request that never had a first
    # token (not a request missing from its row); none for those that failed or were aborted
    # after it, as before.
    assert counts["TTFT"] == [2, 1]
    assert counts["errors"] == ["E2E", "E2E"]  # locust's failures table: the requests' own


def test_a_stream_with_no_first_token_is_a_failed_ttft_however_it_ended(tmp_path):
    """An aborted stream with no token fired no TTFT at all, and a stream that ended OK with
    no token logged its E2E as a successful TTFT (the bench leaves its TTFT empty)."""
    counts = user_counts(tmp_path, """[
        [(0, 0, "abort")],      # aborted before its first token
        [(0, 0, "length")],     # ended OK without a token
    ]""")
    assert counts["E2E"] == [2, 1]  # the aborted one failed; the empty one was served
    assert counts["TTFT"] == [2, 2]


@pytest.mark.parametrize("alpha", ["nan", "-1"])
def test_a_zipf_alpha_that_cannot_be_drawn_is_refused_at_start(tmp_path, alpha):
    """A plain float: NaN or a negative exponent killed every user in on_start."""
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", "1", "-t", "1s",
               "--host", "127.0.0.1:1", "--popularity", "zipf", "--adapters", "a,b", "--zipf-alpha", alpha]
    done = subprocess.run(command, timeout=60, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and f"--zipf-alpha: expected a number >= 0, got '{alpha}'" in done.stderr


@pytest.mark.parametrize("flags, message", [
    (["--adapters", "a,b"], "--adapters has no effect under --popularity none"),
    (["--popularity", "uniform", "--zipf-alpha", "2"], "--zipf-alpha has no effect under --popularity uniform"),
    (["--popularity", "zipf"], "--popularity zipf needs adapter names"),
    (["--popularity", "weights"], "--popularity weights needs --adapter-weights FILE"),
])
def test_adapter_flags_the_popularity_does_not_read_are_refused_at_start(tmp_path, flags, message):
    """`--adapters a,b` under the default popularity `none` sent every request to the base
    model while the run looked as asked; a missing flag failed in every user's on_start."""
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", "1", "-t", "1s",
               "--host", "127.0.0.1:1", *flags]
    done = subprocess.run(command, timeout=60, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and f"locust: error: {message}" in done.stderr, done.stderr
