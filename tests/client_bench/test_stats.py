"""Percentiles, goodput and the server-metrics arithmetic on known numbers."""

import pytest

from tandem.client.bench.measurement import RequestRecord
from tandem.client.bench.server_metrics import (
    bucket_quantile, client_vs_server, completed_total, counter_by_label, counter_total, histogram_summary, parse, server_view,
)
from tandem.client.bench.stats import meets_slo, parse_slo, summarize, summarize_run


def record(adapter="", sent_at=0.0, ttft=0.1, e2e=1.0, tokens=10, status="OK", itls=()) -> RequestRecord:
    return RequestRecord(adapter, sent_at, status=status, ttft=ttft, e2e=e2e, itls=list(itls), prompt_tokens=5,
                         output_tokens=tokens)


def test_percentiles_of_known_samples():
    s = summarize(range(1, 101))
    assert (s["count"], s["mean"], s["median"]) == (100, 50.5, 50.5)
    assert s["p90"] == pytest.approx(90.1) and s["p99"] == pytest.approx(99.01)
    assert summarize([3.0]) == {"count": 1, "mean": 3.0, "median": 3.0, "p90": 3.0, "p99": 3.0}
    assert summarize([])["median"] is None


def test_tpot_excludes_the_first_token():
    assert record(ttft=0.2, e2e=1.1, tokens=10).tpot == pytest.approx(0.1)
    assert record(tokens=1).tpot is None


def test_run_summary_counts_throughput_goodput_errors_and_adapters():
    records = [
        record("a", 0.0, ttft=0.1, e2e=1.0, tokens=10, itls=[0.1] * 9),
        record("a", 0.5, ttft=0.9, e2e=2.0, tokens=12),  # misses the TTFT SLO
        record("b", 1.0, ttft=0.2, e2e=3.0, tokens=20),  # TPOT 2.8/19 > 0.1
        record("", 1.5, ttft=None, e2e=0.5, tokens=0, status="NOT_FOUND"),
    ]
    summary = summarize_run(records, parse_slo("ttft=0.5,tpot=0.1"))
    assert summary["duration_s"] == pytest.approx(4.0)  # first send 0.0 to last end 1.0 + 3.0
    assert (summary["completed"], summary["failed"], summary["errors"]) == (3, 1, {"NOT_FOUND": 1})
    assert summary["output_tokens"] == 42 and summary["prompt_tokens"] == 15
    assert summary["request_throughput"] == pytest.approx(0.75) and summary["output_throughput"] == pytest.approx(10.5)
    assert summary["goodput"]["good_requests"] == 1
    assert summary["latency"]["itl"]["count"] == 9
    # The failed request (NOT_FOUND after 0.5 s, no first token) is in no latency: its 0.5 s
    # would lower the E2E mean to 1.625 and count 4.
    assert (summary["latency"]["e2e"]["count"], summary["latency"]["e2e"]["mean"]) == (3, pytest.approx(2.0))
    assert (summary["latency"]["ttft"]["count"], summary["latency"]["ttft"]["mean"]) == (3, pytest.approx(0.4))
    assert summary["latency"]["tpot"]["count"] == 3
    assert summary["per_adapter"]["(base)"]["latency"]["e2e"]["count"] == 0
    assert list(summary["per_adapter"]) == ["a", "(base)", "b"]  # most requested first, then by name
    assert summary["per_adapter"]["(base)"]["errors"] == {"NOT_FOUND": 1}


def test_a_request_failing_at_its_deadline_does_not_stretch_the_run():
    """99 requests served at 4/s and one that failed at its 305 s deadline: the run lasted
    25.5 s, not 305, so 3.88 requests/s, not 0.324."""
    records = [record("a", 0.25 * i, e2e=0.75) for i in range(1, 100)]
    records.append(record("a", 0.0, ttft=None, e2e=305.0, tokens=0, status="DEADLINE_EXCEEDED"))
    summary = summarize_run(records, parse_slo("e2e=1"))
    assert summary["duration_s"] == pytest.approx(24.75 + 0.75)
    assert summary["request_throughput"] == pytest.approx(99 / 25.5)
    assert summary["goodput"]["requests_per_second"] == pytest.approx(99 / 25.5)
    assert summary["send_rate"] == pytest.approx(4.0)  # 99 gaps over 24.75 s: the achieved rate beside the offered one
    # Nothing served: the run is its sends, however long the failures took.
    failed = [record("a", t, ttft=None, e2e=300.0, status="UNAVAILABLE") for t in (0.0, 2.0)]
    assert summarize_run(failed, {})["duration_s"] == pytest.approx(2.0)
    # One send, or all at one instant: no rate to measure.
    assert summarize_run([record()], {})["send_rate"] is None


def test_the_open_loops_send_lag_is_summarized():
    records = [record(sent_at=0.1 * i) for i in range(100)]
    for i, r in enumerate(records):
        r.send_lag = 0.001 * i
    lag = summarize_run(records, {})["send_lag"]
    assert lag["max"] == pytest.approx(0.099) and lag["p99"] == pytest.approx(0.09801)
    assert summarize_run([record(), record(sent_at=1.0)], {})["send_lag"] is None  # closed loop: no schedule


@pytest.mark.parametrize("text", ["ttft=nan", "tpot=-0.1", "e2e=-inf", "ttft=0.5,e2e=NaN"])
def test_an_slo_bound_of_nan_or_below_zero_is_refused(text):
    """A NaN bound compares false with every latency: every request met it."""
    with pytest.raises(ValueError, match="the bound must be seconds >= 0"):
        parse_slo(text)


def test_slo_parsing_and_one_token_answers():
    assert parse_slo("ttft=0.5, tpot=0.05") == {"ttft": 0.5, "tpot": 0.05}
    with pytest.raises(ValueError, match="METRIC=SECONDS"):
        parse_slo("latency=1")
    assert meets_slo(record(tokens=1), {"tpot": 0.01})  # no TPOT to miss
    assert not meets_slo(record(status="UNAVAILABLE"), {})


BEFORE = """# TYPE tandem:generation_tokens_total counter
tandem:generation_tokens_total{model_name="m"} 100.0
# TYPE tandem:generation_tokens_created gauge
tandem:generation_tokens_created{model_name="m"} 1.7e9
# TYPE tandem:requests_total counter
tandem:requests_total{method="GenerateStream",status="OK",model_name="m"} 4.0
# TYPE tandem:time_to_first_token_seconds histogram
tandem:time_to_first_token_seconds_bucket{le="0.1",model_name="m"} 2.0
tandem:time_to_first_token_seconds_bucket{le="1.0",model_name="m"} 4.0
tandem:time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 4.0
tandem:time_to_first_token_seconds_count{model_name="m"} 4.0
tandem:time_to_first_token_seconds_sum{model_name="m"} 1.0
"""
# After: a second label value appears (another model / adapter), which is summed in, and
# the requests counter comes without a TYPE line.
AFTER = """# TYPE tandem:generation_tokens_total counter
tandem:generation_tokens_total{model_name="m"} 130.0
tandem:generation_tokens_total{model_name="n"} 12.0
# TYPE tandem:generation_tokens_created gauge
tandem:generation_tokens_created{model_name="m"} 1.8e9
tandem:generation_tokens_created{model_name="n"} 1.8e9
tandem:requests_total{method="GenerateStream",status="OK",model_name="m"} 9.0
tandem:requests_total{method="GenerateStream",status="NOT_FOUND",model_name="m"} 2.0
# TYPE tandem:time_to_first_token_seconds histogram
tandem:time_to_first_token_seconds_bucket{le="0.1",model_name="m"} 6.0
tandem:time_to_first_token_seconds_bucket{le="1.0",model_name="m"} 12.0
tandem:time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 14.0
tandem:time_to_first_token_seconds_count{model_name="m"} 14.0
tandem:time_to_first_token_seconds_sum{model_name="m"} 6.0
"""


def test_server_deltas_sum_over_labels_and_skip_created():
    before, after = parse(BEFORE), parse(AFTER)
    assert counter_total(before, after, "generation_tokens") == 42.0
    assert counter_total(before, after, "no_such_metric") is None
    assert counter_by_label(before, after, "requests")["status"] == {"OK": 5.0, "NOT_FOUND": 2.0}
    ttft = histogram_summary(before, after, "time_to_first_token_seconds")
    # 10 new observations: 4 <= 0.1, 4 in (0.1, 1], 2 above 1 s
    assert ttft["count"] == 10 and ttft["mean"] == pytest.approx(0.5)
    assert ttft["median"] == pytest.approx(0.1 + 0.9 * (5 - 4) / 4)
    assert ttft["p99"] == 1.0  # in the +Inf bucket: its lower edge, as PromQL does


def test_bucket_quantile_interpolates_within_a_bucket():
    assert bucket_quantile(0.5, [(1.0, 0.0), (2.0, 10.0), (float("inf"), 10.0)]) == pytest.approx(1.5)
    assert bucket_quantile(0.5, [(1.0, 0.0), (float("inf"), 0.0)]) is None


def test_client_vs_server_pairs_counts_and_means():
    before, after = parse(BEFORE), parse(AFTER)
    summary = {"completed": 5, "output_tokens": 42, "prompt_tokens": 7, "latency": {"ttft": {"mean": 0.45}}}
    rows = client_vs_server(summary, before, after)
    assert rows["output_tokens"] == {"client": 42, "server": 42.0, "server_metric": "generation_tokens"}
    assert rows["completed"]["server"] is None  # the server has no request_success here
    assert rows["ttft_mean"]["server"] == pytest.approx(0.5)


RESTART_BEFORE = """# TYPE tandem:generation_tokens_total counter
tandem:generation_tokens_total{model_name="m"} 50000.0
# TYPE tandem:e2e_request_latency_seconds histogram
tandem:e2e_request_latency_seconds_bucket{le="1.0"} 3.0
tandem:e2e_request_latency_seconds_bucket{le="+Inf"} 900.0
tandem:e2e_request_latency_seconds_count 900.0
tandem:e2e_request_latency_seconds_sum 4500.0
"""
# The server restarted between the scrapes and counted again from zero. The le="1.0" bucket
# grew past its old value after the restart: on its own it does not look like a reset.
RESTART_AFTER = """# TYPE tandem:generation_tokens_total counter
tandem:generation_tokens_total{model_name="m"} 1200.0
# TYPE tandem:e2e_request_latency_seconds histogram
tandem:e2e_request_latency_seconds_bucket{le="1.0"} 8.0
tandem:e2e_request_latency_seconds_bucket{le="+Inf"} 10.0
tandem:e2e_request_latency_seconds_count 10.0
tandem:e2e_request_latency_seconds_sum 7.0
"""


def test_a_counter_that_went_down_was_reset_and_its_increase_is_its_new_value():
    """As Prometheus' increase(): 50,000 -> 1,200 is a restart and 1,200 new tokens, not -48,800."""
    before, after = parse(RESTART_BEFORE), parse(RESTART_AFTER)
    assert counter_total(before, after, "generation_tokens") == 1200.0
    assert server_view(before, after)["counters"]["generation_tokens"]["total"] == 1200.0
    e2e = histogram_summary(before, after, "e2e_request_latency_seconds")
    # The whole histogram restarted: 10 observations, 8 of them <= 1 s (not 5 and -890).
    assert e2e["count"] == 10 and e2e["mean"] == pytest.approx(0.7)
    assert e2e["median"] == pytest.approx(5 / 8)
    # No reset: the plain difference.
    assert counter_total(after, parse(RESTART_AFTER.replace("1200.0", "1250.0")), "generation_tokens") == 50.0


SUCCESS_BEFORE = """# TYPE tandem:request_success_total counter
tandem:request_success_total{finished_reason="length"} 10.0
tandem:request_success_total{finished_reason="abort"} 1.0
"""
SUCCESS_AFTER = """# TYPE tandem:request_success_total counter
tandem:request_success_total{finished_reason="length"} 16.0
tandem:request_success_total{finished_reason="stop"} 2.0
tandem:request_success_total{finished_reason="abort"} 4.0
"""


def test_completed_requests_compare_like_with_like_aborts_apart():
    """The server counts aborted generations in request_success; the client's "completed"
    leaves its ABORTED streams out: the server's column is request_success less its abort
    series, and the aborts are a row of their own."""
    before, after = parse(SUCCESS_BEFORE), parse(SUCCESS_AFTER)
    assert counter_total(before, after, "request_success") == 11.0
    assert completed_total(before, after) == 8.0
    summary = {"completed": 8, "output_tokens": 0, "prompt_tokens": 0, "errors": {"ABORTED": 3}, "latency": {}}
    rows = client_vs_server(summary, before, after)
    assert (rows["completed"]["client"], rows["completed"]["server"]) == (8, 8.0)
    assert 'finished_reason!="abort"' in rows["completed"]["server_metric"]
    assert (rows["aborted"]["client"], rows["aborted"]["server"]) == (3, 3.0)
    # A server whose request_success has no finished_reason label: the whole counter, no abort row.
    plain = parse("# TYPE tandem:request_success_total counter\ntandem:request_success_total 5.0\n")
    assert completed_total({}, plain) == 5.0 and "aborted" not in client_vs_server(summary, {}, plain)
    assert completed_total(before, parse(BEFORE)) is None
