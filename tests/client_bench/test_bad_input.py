"""Bad flags and odd values in the client and `tandem bench`: refused up front (exit 2) or
handled, never a run that sends forever, a hang, a traceback or an invalid JSON file."""

import asyncio
import http.server
import json
import math
import socket
import threading
import time
from argparse import Namespace

import grpc
import pytest

from tandem.client.bench import command, server_metrics
from tandem.client.bench.arrivals import LoadPoint
from tandem.client.bench.command import metrics_url
from tandem.client.bench.popularity import build_popularity
from tandem.client.bench.report import write_json
from tandem.client.bench.runner import LoadPlan, _closed_loop
from tandem.client.connection import ConnectionSettings, Deadline
from tandem.client.errors import TandemRpcError
from tandem.server.cli import build_parser, main

NOWHERE = "127.0.0.1:1"  # nothing listens: a flag error must come before any connection


def exit_code(capsys, *argv: str) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as stop:  # argparse's own refusals
        code = stop.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--burstiness", "inf"], "--burstiness: expected a number > 0, got 'inf'"),
        (["--burstiness", "0"], "--burstiness: expected a number > 0, got '0'"),
        (["--num-requests", "0"], "--num-requests: expected an integer >= 1, got '0'"),
        (["--request-rate", "0"], "a request rate must be > 0, got 0.0"),
        (["--concurrency", "x"], "invalid literal for int()"),
        (["--slo", "ttft"], "ttft"),
        (["--timeout", "0"], "--timeout: expected a number > 0 (inf: no limit), got '0'"),
        (["--timeout", "nan"], "--timeout: expected a number > 0 (inf: no limit), got 'nan'"),
        (["--connect-timeout", "-1"], "--connect-timeout: expected a number > 0 (inf: no limit), got '-1'"),
        (["--duration", "nan"], "--duration: expected a number > 0 (inf: no limit), got 'nan'"),
        (["--num-adapters", "-1"], "--num-adapters: expected an integer >= 1, got '-1'"),
        (["--zipf-alpha", "nan"], "--zipf-alpha: expected a number >= 0, got 'nan'"),
        (["--random-range-ratio", "2"], "--random-range-ratio: expected a number >= 0 and < 1, got '2'"),
        (["--popularity", "bogus"], "unknown --popularity 'bogus'"),
        (["--popularity", "weights"], "--popularity weights needs --adapter-weights FILE"),
        (["--dataset", "sharegpt"], "--dataset sharegpt needs --dataset-path FILE"),
        # A NaN bound made every request good; a rate point with --duration inf never ended.
        (["--slo", "ttft=nan"], "bad SLO 'ttft=nan': the bound must be seconds >= 0"),
        (["--slo", "e2e=-1"], "bad SLO 'e2e=-1': the bound must be seconds >= 0"),
        (["--request-rate", "4", "--duration", "inf"], "--duration inf never ends a point: bound it with --num-requests"),
        (["--concurrency", "2", "--duration", "inf"], "--duration inf never ends a point: bound it with --num-requests"),
        # Adapter flags the chosen popularity does not read: every request went to the base model.
        (["--adapters", "a,b,c"], "--adapters has no effect under --popularity none (every request goes to the base model): "
                                  "add --popularity uniform or zipf"),
        (["--num-adapters", "2"], "--num-adapters has no effect under --popularity none"),
        (["--popularity", "uniform", "--zipf-alpha", "1.5"],
         "--zipf-alpha has no effect under --popularity uniform: add --popularity zipf"),
        (["--zipf-alpha", "1.5"], "--zipf-alpha has no effect under --popularity none"),
        (["--popularity", "zipf", "--adapter-weights", "w.json"],
         "--adapter-weights has no effect under --popularity zipf: add --popularity weights"),
        (["--popularity", "weights", "--adapter-weights", "w.json", "--adapters", "a"],
         "--adapters has no effect under --popularity weights: the adapters are the names in --adapter-weights"),
        # Protobuf's own refusal named no flag, after the warm-up had begun.
        (["--top-k", "-1"], "--top-k: expected an integer >= 0 and < 4.29497e+09, got '-1'"),
        (["--sampling-seed", "-1"], "--sampling-seed: expected an integer >= 0 and < 1.84467e+19, got '-1'"),
    ],
)
def test_a_bad_bench_flag_exits_2_before_connecting(capsys, argv, message):
    started = time.monotonic()
    code, err = exit_code(capsys, "bench", "--target", NOWHERE, "--no-progress", *argv)
    assert code == 2 and message in err
    assert time.monotonic() - started < 5  # no connection attempt, no warm-up


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--popularity", "uniform", "--adapters", "a,b,c", "--num-adapters", "2"],
        ["--popularity", "zipf", "--zipf-alpha", "1.5", "--num-adapters", "2"],
        ["--popularity", "weights", "--adapter-weights", "w.json"],
        ["--request-rate", "4", "--duration", "inf", "--num-requests", "10", "--slo", "ttft=0,e2e=inf"],
    ],
)
def test_the_flags_a_popularity_reads_pass_the_checks(argv):
    args = build_parser("bench").parse_args(["bench", "--target", NOWHERE, *argv])
    command.load_plan(args)
    command._check_workload(args)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["generate", "hi", "--max-new-tokens", "-1"], "--max-new-tokens"),
        (["generate", "hi", "--top-k", "-2"], "--top-k"),
        (["generate", "hi", "--seed", "-3"], "--seed"),
        (["adapters", "merge", "m", "a", "b", "--method", "linear", "--rank", "-1"], "--rank"),
        (["adapters", "merge", "m", "a", "b", "--method", "dare_ties", "--seed", "-1"], "--seed"),
    ],
    ids=["max-new-tokens", "top-k", "seed", "merge-rank", "merge-seed"],
)
def test_a_negative_unsigned_field_exits_2_naming_its_flag(capsys, argv, flag):
    """Protobuf refused them after connecting, exit 1, naming no flag ("Value out of range: -1")."""
    code, err = exit_code(capsys, *argv, "--target", NOWHERE)
    assert code == 2 and f"{flag}: expected an integer >= 0" in err


def test_health_wait_nan_and_merge_weights_mismatch_exit_2(capsys):
    """A NaN --wait polled forever; a weight count that does not match exited 1."""
    code, err = exit_code(capsys, "health", "--target", NOWHERE, "--wait", "nan")
    assert code == 2 and "--wait: expected a number >= 0 (inf: no limit), got 'nan'" in err
    code, err = exit_code(capsys, "adapters", "merge", "m", "a", "b", "--method", "linear", "--weights", "1", "--target", NOWHERE)
    assert code == 2 and "--weights gives 1 weights for 2 adapters" in err


def test_a_timeout_of_inf_or_past_grpcs_range_is_no_deadline():
    """gRPC failed such calls at once as DEADLINE_EXCEEDED."""
    for timeout in (None, math.inf, 1e10):
        assert Deadline(timeout).remaining() is None
    assert 59 < Deadline(60.0).remaining() <= 60 and Deadline(0).remaining() == 0
    for bad in (-1.0, math.nan):
        with pytest.raises(ValueError, match="a timeout is seconds >= 0"):
            Deadline(bad)
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="timeout is seconds > 0"):
            ConnectionSettings(timeout=bad)


def test_the_cli_with_timeout_inf_reaches_a_live_server(capsys, server):
    code, err = exit_code(capsys, "model", "--json", "--target", server.target, "--timeout", "inf")
    assert code == 0, err


def test_load_plans_and_popularity_refuse_values_that_cannot_be_drawn():
    for burstiness in (math.inf, math.nan, 0.0):
        with pytest.raises(ValueError, match="--burstiness must be a finite number > 0"):
            LoadPlan([LoadPoint(rate=1.0)], duration=1.0, burstiness=burstiness)
    for n in (0, -1):  # 0 was read as "all", -1 dropped the last name
        with pytest.raises(ValueError, match="--num-adapters must be >= 1"):
            build_popularity("uniform", ["a", "b", "c"], num_adapters=n)
    with pytest.raises(ValueError, match="finite number >= 0"):
        build_popularity("zipf", ["a", "b"], zipf_alpha=math.nan)


def test_a_closed_loop_starts_no_more_workers_than_requests():
    """--concurrency 1000000 with 1 request took 18 s and 1 GiB to send one request."""
    sent = []

    async def send() -> None:
        sent.append(1)

    async def run() -> int:
        tasks = await _closed_loop(send, LoadPlan([LoadPoint(concurrency=1_000_000)], num_requests=3), 1_000_000)
        await asyncio.gather(*tasks)
        return len(tasks)

    assert asyncio.run(run()) == 3 and len(sent) == 3


def _serve_once(reply: bytes) -> str:
    """A TCP server that answers one connection with `reply` (raw bytes) and closes."""
    listener = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        connection, _ = listener.accept()
        connection.recv(4096)
        connection.sendall(reply)
        connection.close()
        listener.close()

    threading.Thread(target=answer, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}/metrics"


@pytest.mark.parametrize(
    "reply",
    [b"\x00\x00\x06\x04\x00\x00\x00\x00\x00garbage", b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n\xff\xfe"],
    ids=["not-http", "not-utf8"],
)
def test_a_metrics_endpoint_that_is_not_prometheus_text_is_a_scrape_error(reply):
    with pytest.raises(server_metrics.ScrapeError, match="cannot read the server's metrics"):
        server_metrics.scrape(_serve_once(reply))


def test_a_malformed_metrics_url_is_a_scrape_error():
    with pytest.raises(server_metrics.ScrapeError):
        server_metrics.scrape("http://[::1/metrics")


def test_the_default_metrics_url_follows_the_target():
    url = lambda target: metrics_url(Namespace(metrics_url=None, target=target))  # noqa: E731
    assert url("server:50051") == "http://server:9090/metrics"
    assert url("dns:///server:50051") == "http://server:9090/metrics"
    assert url("ipv4:10.0.0.2:50051") == "http://10.0.0.2:9090/metrics"
    assert url("[::1]:50051") == "http://[::1]:9090/metrics"
    assert url("unix:///run/tandem.sock") == "http://localhost:9090/metrics"


def test_the_json_report_is_strict_json(tmp_path):
    path = tmp_path / "out.json"
    write_json({"settings": {"duration": math.inf, "slo": {"e2e": math.inf}}, "points": [{"x": math.nan, "y": [-math.inf]}]}, path)

    def refuse(name: str):
        raise ValueError(f"not JSON: {name}")

    document = json.loads(path.read_text(), parse_constant=refuse)
    assert document == {"settings": {"duration": "inf", "slo": {"e2e": "inf"}}, "points": [{"x": None, "y": ["-inf"]}]}


def test_a_connect_timeout_of_inf_asks_again_until_the_server_answers(monkeypatch):
    """inf is no limit: the poll compared the deadline's None with a float, a TypeError."""
    monkeypatch.setattr(command, "CONNECT_POLL_SECONDS", 0.01)

    class Loading:
        calls = 0

        async def model_info(self, timeout):
            self.calls += 1
            if self.calls < 3:
                raise TandemRpcError(grpc.StatusCode.UNAVAILABLE, "loading its model")
            return "info"

    client = Loading()
    assert asyncio.run(command._connect(client, Namespace(connect_timeout=math.inf, target=NOWHERE))) == "info"
    assert client.calls == 3
