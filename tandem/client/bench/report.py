"""What a sweep reports: the result document (JSON), and the tables printed at the end."""

import json
import math
import platform
import time
from dataclasses import asdict
from pathlib import Path

from tandem.client.bench.runner import PointResult
from tandem.client.bench.stats import BASE_MODEL

PER_ADAPTER_ROWS = 8

# What the JSON's numbers are in (the printed tables show latencies in ms; the JSON keeps
# seconds, and its keys, which plots and scripts read, carry no unit).
UNITS = {
    "latency": "s (ttft, tpot, itl, e2e: mean, median, p90, p99; count is a number of samples)",
    "per_adapter.latency": "s, as latency",
    "duration_s": "s",
    "send_rate": "requests/s actually sent (the offered rate is load.rate): (requests - 1) / (last send - first send)",
    "send_lag": "s: p99 and max of how late open-loop requests started after their scheduled send; null in the closed loop",
    "request_throughput": "requests/s",
    "output_throughput": "output tokens/s",
    "total_token_throughput": "prompt + output tokens/s",
    "goodput.requests_per_second": "requests/s",
    "goodput.slo": "s",
    "client_vs_server": "counts as counted; *_mean rows in s",
    "server.histograms": "the metric's own unit: s for *_seconds, tokens for *_tokens",
    "request_records": "s: sent_at from the point's first send; ttft, e2e and each of itls from the request's send or last token; "
                       "send_lag as send_lag",
    "settings": "as given on the command line (--timeout, --duration: s; --request-rate: requests/s)",
}


def build_result(settings: dict, model: dict, results: list[PointResult], save_requests: bool = False) -> dict:
    """The JSON document: how the run was set up, what it measured, and the server's view;
    "units" says what its numbers are in."""
    points = []
    for result in results:
        point = dict(result.summary)
        if save_requests:
            point["request_records"] = request_records(result)
        points.append(point)
    return {
        "tool": "tandem bench",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "client_host": platform.node(),
        "units": UNITS,
        "model": model,
        "settings": settings,
        "points": points,
    }


def request_records(result: PointResult) -> list[dict]:
    """Each request of a point, in the order they ended; sent_at in seconds from the point's
    first send (a raw perf_counter reading means nothing outside the process that took it)."""
    first = min((r.sent_at for r in result.records), default=0.0)
    return [asdict(r) | {"sent_at": r.sent_at - first} for r in result.records]


def _strict(value):
    """JSON has no infinity or NaN (json.dumps writes them anyway, and strict readers refuse
    the file): inf is written "inf" (a setting such as --duration inf), NaN null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(item) for item in value]
    return value


def write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_strict(result), indent=2, allow_nan=False) + "\n")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _rows(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return [line(header), line(["-" * w for w in widths]), *map(line, rows)]


def sweep_table(result: dict) -> list[str]:
    """One row per load point: the rate achieved, throughput, latency percentiles (ms), goodput,
    and how late the open loop started its requests (ms)."""
    header = ["load", "sent/s", "ok", "failed", "req/s", "out tok/s", "TTFT mean", "p50", "p99", "TPOT mean", "p99",
              "ITL p50", "p99", "E2E p50", "p99", "goodput/s", "lag p99", "max"]
    rows = []
    for p in result["points"]:
        lat = p["latency"]
        goodput = p.get("goodput", {}).get("requests_per_second")
        sent, lag = p["send_rate"], p["send_lag"] or {}
        rows.append([
            p["load"]["label"], "-" if sent is None else f"{sent:.2f}", str(p["completed"]), str(p["failed"]),
            f"{p['request_throughput']:.2f}",
            f"{p['output_throughput']:.1f}", _ms(lat["ttft"]["mean"]), _ms(lat["ttft"]["median"]), _ms(lat["ttft"]["p99"]),
            _ms(lat["tpot"]["mean"]), _ms(lat["tpot"]["p99"]), _ms(lat["itl"]["median"]), _ms(lat["itl"]["p99"]),
            _ms(lat["e2e"]["median"]), _ms(lat["e2e"]["p99"]), "-" if goodput is None else f"{goodput:.2f}",
            _ms(lag.get("p99")), _ms(lag.get("max")),
        ])
    return _rows(header, rows)


def server_table(result: dict) -> list[str]:
    """Client and server figures side by side (counts; mean latencies in ms)."""
    rows = []
    for p in result["points"]:
        for figure, match in p.get("client_vs_server", {}).items():
            show = _ms if figure.endswith("_mean") else _count
            rows.append([p["load"]["label"], figure, show(match["client"]), show(match["server"]), match["server_metric"]])
    return _rows(["load", "figure", "client", "server", "server metric"], rows) if rows else []


def adapter_table(point: dict) -> list[str]:
    rows = []
    for name, a in list(point["per_adapter"].items())[:PER_ADAPTER_ROWS]:
        lat = a["latency"]
        rows.append([name, str(a["requests"]), str(sum(a["errors"].values())), str(a["output_tokens"]),
                     _ms(lat["ttft"]["median"]), _ms(lat["ttft"]["p99"]), _ms(lat["tpot"]["median"]), _ms(lat["e2e"]["p99"])])
    return _rows(["adapter", "requests", "failed", "out tokens", "TTFT p50", "p99", "TPOT p50", "E2E p99"], rows)


def render(result: dict) -> str:
    """The text printed at the end of a run."""
    lines = ["", "latencies in ms; goodput = requests/s within every SLO; lag = how late the open loop started requests"]
    lines += sweep_table(result)
    errors = [(p["load"]["label"], code, n) for p in result["points"] for code, n in p["errors"].items()]
    if errors:
        lines += ["", "errors by status: " + ", ".join(f"{label} {code} x{n}" for label, code, n in errors)]
    server = server_table(result)
    if server:
        lines += ["", "client vs server (the server's Prometheus counters and histograms over the same run)", *server]
    last = result["points"][-1] if result["points"] else None
    if last and (len(last["per_adapter"]) > 1 or BASE_MODEL not in last["per_adapter"]):
        shown = min(PER_ADAPTER_ROWS, len(last["per_adapter"]))
        lines += ["", f"per adapter at {last['load']['label']} ({shown} most requested of {len(last['per_adapter'])})"]
        lines += adapter_table(last)
    return "\n".join(lines)
