"""Summaries of a run: throughput, latency percentiles, goodput under SLOs, errors by status,
and the same per adapter.

Percentiles interpolate linearly between samples (numpy's default, as vLLM's benchmark does).
"""

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
    """"ttft=0.5,tpot=0.05" -> {"ttft": 0.5, "tpot": 0.05}; seconds, keys among ttft, tpot, e2e."""
    slo = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in SLO_METRICS:
            raise ValueError(f"bad SLO {item!r}: expected METRIC=SECONDS with METRIC one of {', '.join(SLO_METRICS)}")
        slo[key.strip()] = float(value)
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
    """From the first send to the last end, as vLLM's benchmark measures it."""
    if not records:
        return 0.0
    return max(r.finished_at for r in records) - min(r.sent_at for r in records)


def summarize_run(records: Sequence[RequestRecord], slo: dict[str, float]) -> dict:
    """Everything the report shows for one load point."""
    ok = [r for r in records if r.ok]
    duration = run_duration(records)
    per_second = (lambda n: n / duration) if duration > 0 else (lambda n: 0.0)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    summary = {
        "duration_s": duration,
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
