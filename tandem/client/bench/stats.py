"""Summaries of a run: throughput, latency percentiles, goodput under SLOs, errors by status,
and the same per adapter.

Percentiles interpolate linearly between samples (numpy's default, as vLLM's benchmark does).
"""

import math
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from tandem.client.bench.measurement import RequestRecord

PERCENTILES = (50, 90, 99)
SLO_METRICS = ("ttft", "tpot", "e2e")
BASE_MODEL = "(base)"


def summarize(values: Iterable[float]) -> dict[str, float | int | None]:
    """count, mean, median, p90 and p99 of the samples (None when there are none)."""
    samples = np.asarray(list(values), dtype=float)
    if not samples.size:
        return {"count": 0, "mean": None, "median": None, "p90": None, "p99": None}
    p50, p90, p99 = np.percentile(samples, PERCENTILES)
    return {"count": int(samples.size), "mean": float(samples.mean()), "median": float(p50), "p90": float(p90), "p99": float(p99)}


def parse_slo(text: str) -> dict[str, float]:
    """"ttft=0.5,tpot=0.05" -> {"ttft": 0.5, "tpot": 0.05}; seconds, keys among ttft, tpot, e2e.
    A NaN bound compares false with every latency, so every request would meet it: refused,
    as is a negative one."""
    slo = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in SLO_METRICS:
            raise ValueError(f"bad SLO {item!r}: expected METRIC=SECONDS with METRIC one of {', '.join(SLO_METRICS)}")
        bound = float(value)
        if math.isnan(bound) or bound < 0:
            raise ValueError(f"bad SLO {item!r}: the bound must be seconds >= 0")
        slo[key.strip()] = bound
    return slo


def meets_slo(record: RequestRecord, slo: dict[str, float]) -> bool:
    """A successful request whose every named latency is within its bound (no TPOT with one token passes)."""
    if not record.ok:
        return False
    values = {"ttft": record.ttft, "tpot": record.tpot, "e2e": record.e2e}
    for key, bound in slo.items():
        value = values[key]
        if value is None and key == "tpot":
            continue
        if value is None or value > bound:
            return False
    return True


def latency_summaries(records: Sequence[RequestRecord]) -> dict[str, dict]:
    ok = [r for r in records if r.ok]
    return {
        "ttft": summarize(r.ttft for r in ok if r.ttft is not None),
        "tpot": summarize(r.tpot for r in ok if r.tpot is not None),
        "itl": summarize(gap for r in ok for gap in r.itls),
        "e2e": summarize(r.e2e for r in ok if r.e2e is not None),
    }


def run_duration(records: Sequence[RequestRecord]) -> float:
    """From the first send to the last send or the last successful end, whichever is later.
    vLLM's benchmark ends at the last end of any request, but one request failing at its
    deadline (--timeout 300) then stretches the run by minutes that served nothing, and
    divides every throughput by them."""
    if not records:
        return 0.0
    end = max([r.sent_at for r in records] + [r.finished_at for r in records if r.ok])
    return end - min(r.sent_at for r in records)


def send_rate(records: Sequence[RequestRecord]) -> float | None:
    """Requests/s actually sent: the gaps between the first and last send over their span
    (None with fewer than two sends, or all at the same instant)."""
    sends = [r.sent_at for r in records]
    span = max(sends, default=0.0) - min(sends, default=0.0)
    return (len(sends) - 1) / span if span > 0 else None


def send_lag(records: Sequence[RequestRecord]) -> dict[str, float] | None:
    """p99 and max of how late requests started after their scheduled send (open loop only:
    None when no request had a schedule)."""
    lags = [r.send_lag for r in records if r.send_lag is not None]
    if not lags:
        return None
    return {"p99": float(np.percentile(lags, 99)), "max": max(lags)}


def summarize_run(records: Sequence[RequestRecord], slo: dict[str, float]) -> dict:
    """Everything the report shows for one load point."""
    ok = [r for r in records if r.ok]
    duration = run_duration(records)
    per_second = (lambda n: n / duration) if duration > 0 else (lambda n: 0.0)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    summary = {
        "duration_s": duration,
        "send_rate": send_rate(records),
        "send_lag": send_lag(records),
        "requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": dict(Counter(r.status for r in records if not r.ok)),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "request_throughput": per_second(len(ok)),
        "output_throughput": per_second(output_tokens),
        "total_token_throughput": per_second(prompt_tokens + output_tokens),
        "latency": latency_summaries(records),
    }
    if slo:
        good = sum(meets_slo(r, slo) for r in records)
        summary["goodput"] = {"slo": slo, "good_requests": good, "requests_per_second": per_second(good)}
    summary["per_adapter"] = per_adapter(records)
    return summary


def per_adapter(records: Sequence[RequestRecord]) -> dict[str, dict]:
    """Counts, tokens and latencies for each adapter, most requested first."""
    groups: dict[str, list[RequestRecord]] = {}
    for record in records:
        groups.setdefault(record.adapter or BASE_MODEL, []).append(record)
    result = {}
    for name, group in sorted(groups.items(), key=lambda item: (-len(item[1]), item[0])):
        ok = [r for r in group if r.ok]
        result[name] = {
            "requests": len(group),
            "completed": len(ok),
            "errors": dict(Counter(r.status for r in group if not r.ok)),
            "output_tokens": sum(r.output_tokens for r in ok),
            "latency": latency_summaries(group),
        }
    return result
