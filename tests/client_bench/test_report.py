"""The JSON document says what its numbers are in, and saved requests' send times are
relative to their point's first send."""

import json

import pytest

from tandem.client.bench.arrivals import LoadPoint
from tandem.client.bench.measurement import RequestRecord
from tandem.client.bench.report import build_result, render, write_json
from tandem.client.bench.runner import PointResult
from tandem.client.bench.stats import summarize_run


def point(records: list[RequestRecord]) -> PointResult:
    summary = summarize_run(records, {})
    summary["load"] = {"label": "rate 2/s", "rate": 2.0, "concurrency": None, "burstiness": 1.0}
    return PointResult(LoadPoint(rate=2.0), records, summary)


# perf_counter readings, as timed_stream takes them: listed in the order the requests ended.
RECORDS = [
    RequestRecord("a", 81234.75, ttft=0.05, e2e=0.25, itls=[0.1, 0.1], output_tokens=3),
    RequestRecord("a", 81234.5, ttft=0.1, e2e=1.0, itls=[0.45, 0.45], output_tokens=3),
    RequestRecord("b", 81235.5, status="UNAVAILABLE", e2e=0.01),
]


def test_the_json_says_its_latencies_are_seconds(tmp_path):
    result = build_result({"seed": 0}, {"name": "m"}, [point(RECORDS)])
    units = result["units"]
    assert units["latency"].startswith("s ") and units["duration_s"] == "s"
    assert units["request_throughput"] == "requests/s" and units["output_throughput"] == "output tokens/s"
    assert {"per_adapter.latency", "client_vs_server", "server.histograms", "request_records"} <= set(units)
    # Latencies stay in seconds under their old keys; the printed table shows ms.
    assert result["points"][0]["latency"]["e2e"]["median"] == pytest.approx(0.625)
    assert "latencies in ms" in render(result)
    write_json(result, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["units"] == units


def test_saved_requests_are_sent_at_seconds_from_the_points_first_send():
    """sent_at was a raw perf_counter reading (81234.5 s since some boot), meaningless in a file."""
    result = build_result({}, {}, [point(RECORDS)], save_requests=True)
    saved = result["points"][0]["request_records"]
    assert [r["sent_at"] for r in saved] == pytest.approx([0.25, 0.0, 1.0])
    assert [r["e2e"] for r in saved] == [0.25, 1.0, 0.01] and saved[2]["status"] == "UNAVAILABLE"
    assert RECORDS[1].sent_at == 81234.5  # the records themselves are left as they were
    assert "request_records" not in build_result({}, {}, [point(RECORDS)])["points"][0]
    assert build_result({}, {}, [point([])], save_requests=True)["points"][0]["request_records"] == []


def test_the_table_shows_the_rate_achieved_and_how_late_requests_started():
    """The offered rate alone hid a client that could not keep up; TTFT counts from a late
    start, so the lateness is shown beside it."""
    records = [RequestRecord("a", 0.5 * i, ttft=0.1, e2e=0.2, output_tokens=2, send_lag=0.01 * i) for i in range(5)]
    result = build_result({}, {}, [point(records)])
    assert result["points"][0]["send_rate"] == pytest.approx(2.0)
    assert result["points"][0]["send_lag"] == {"p99": pytest.approx(0.0396), "max": pytest.approx(0.04)}
    header, _, row = render(result).splitlines()[2:5]
    assert header.split()[:2] == ["load", "sent/s"] and header.split()[-3:] == ["lag", "p99", "max"]
    assert row.split()[:3] == ["rate", "2/s", "2.00"]  # offered, then sent
    assert row.split()[-2:] == ["39.6", "40.0"]  # lag p99 and max, ms
