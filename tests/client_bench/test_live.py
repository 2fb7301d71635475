"""`tandem bench` against a live server on the tiny model: its counts equal the server's
metrics, it writes JSON and plots, it stops by itself, and an unreachable server is a clear
error within the timeout."""

import json
import socket
import subprocess
import sys
import time

import pytest

from tandem.client.bench.command import CONNECT_POLL_SECONDS
from tandem.server.cli import main
from tests.api.harness import ServerThread
from tests.client_bench.conftest import ADAPTERS


def bench(server: ServerThread, *flags: str) -> int:
    metrics = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    return main(["bench", "--target", server.target, "--metrics-url", metrics, "--no-progress", "--timeout", "60", *flags])


def test_counts_equal_the_servers_and_files_are_written(server, tmp_path, capsys):
    out = tmp_path / "sweep.json"
    status = bench(server, "--request-rate", "50,inf", "--num-requests", "6", "--output-len", "5", "--popularity", "zipf",
                   "--adapters", ",".join(ADAPTERS), "--slo", "ttft=30,tpot=30", "--json", str(out))
    assert status == 0
    result = json.loads(out.read_text())
    assert [p["load"]["rate"] for p in result["points"]] == [50.0, "inf"]
    for point in result["points"]:
        assert (point["requests"], point["completed"], point["failed"]) == (6, 6, 0)
        assert point["output_tokens"] == 6 * 5  # --output-len with ignore_eos: every request runs to its length
        for figure in ("completed", "output_tokens", "prompt_tokens"):
            match = point["client_vs_server"][figure]
            assert match["client"] == match["server"], figure
        assert point["server"]["histograms"]["time_to_first_token_seconds"]["count"] == 6
        aborted = point["client_vs_server"]["aborted"]  # request_success's abort series, apart from completed
        assert (aborted["client"], aborted["server"]) == (0, 0.0)
        assert set(point["per_adapter"]) <= set(ADAPTERS) and sum(a["requests"] for a in point["per_adapter"].values()) == 6
        assert point["goodput"]["good_requests"] == 6
        assert point["latency"]["itl"]["count"] == 6 * 4 and point["latency"]["ttft"]["p99"] > 0
    assert (tmp_path / "sweep_sweep.png").stat().st_size > 0 and (tmp_path / "sweep_cdf.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "goodput" in printed and "client vs server" in printed and "per adapter" in printed


def test_closed_loop_bounded_by_duration_stops_by_itself(server, tmp_path):
    out = tmp_path / "closed.json"
    started = time.monotonic()
    assert bench(server, "--concurrency", "2", "--duration", "1.5", "--output-len", "4", "--warmup-requests", "0",
                 "--json", str(out), "--no-plots") == 0
    assert time.monotonic() - started < 30
    point = json.loads(out.read_text())["points"][0]
    assert point["load"]["concurrency"] == 2 and point["completed"] >= 2 and point["failed"] == 0
    assert point["client_vs_server"]["completed"]["server"] == point["completed"]


def test_sharegpt_prompts_are_measured_by_the_servers_chat_template(server, tmp_path):
    """The length filter tokenizes each prompt as the request sends it (chat messages): every
    prompt it keeps is served."""
    data = [{"conversations": [{"from": "human", "value": f"question {i} " * (1 + i)}, {"from": "gpt", "value": "an answer " * 4}]}
            for i in range(8)]
    (tmp_path / "sharegpt.json").write_text(json.dumps(data))
    out = tmp_path / "sharegpt_run.json"
    assert bench(server, "--dataset", "sharegpt", "--dataset-path", str(tmp_path / "sharegpt.json"), "--output-len", "3",
                 "--num-requests", "4", "--warmup-requests", "0", "--json", str(out), "--no-plots") == 0
    point = json.loads(out.read_text())["points"][0]
    assert (point["completed"], point["failed"]) == (4, 0)


def test_unknown_adapter_in_every_warmup_request_is_an_error(server, capsys):
    assert bench(server, "--popularity", "uniform", "--adapters", "no-such-adapter", "--num-requests", "2") == 10 + 5
    assert "every warm-up request failed, e.g. NOT_FOUND" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("target", [f"127.0.0.1:{free_port()}", "no-such-host.invalid:50051"])
def test_unreachable_server_is_a_clear_error_after_the_timeout(target, capsys):
    """It is asked again until then: a server just started is not listening yet, then loads its model."""
    started = time.monotonic()
    status = main(["bench", "--target", target, "--connect-timeout", "2", "--no-progress", "--metrics-url", "none"])
    assert 2 - CONNECT_POLL_SECONDS <= time.monotonic() - started < 30  # a 2 s timeout, with room for a slow host
    assert status == 10 + 14  # UNAVAILABLE
    assert f"cannot reach the server at {target}" in capsys.readouterr().err


def test_the_bench_command_does_not_import_torch():
    code = "import sys; from tandem.server.cli import build_parser; build_parser('bench'); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
