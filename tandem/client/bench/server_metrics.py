"""The server's view of a run: its Prometheus metrics scraped before and after, as deltas.

Names are matched loosely so that relabelling on the server does not break the report:
every series of a family is summed over its labels (a `model_name` label, or any other,
changes nothing), and a family is found by its short name, with the `tandem:`-style prefix
and a counter's `_total` suffix taken off.
"""

import http.client
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from tandem.client.bench.stats import PERCENTILES

Labels = tuple[tuple[str, str], ...]


class ScrapeError(Exception):
    """The metrics endpoint could not be read or parsed."""


@dataclass(frozen=True)
class Family:
    """One metric family: type and samples {(sample name, labels): value}."""

    name: str
    kind: str
    samples: dict[tuple[str, Labels], float]


def short_name(name: str) -> str:
    """"tandem:generation_tokens_total" -> "generation_tokens"."""
    name = name.rsplit(":", 1)[-1]
    return name.removesuffix("_total")


def parse(text: str) -> dict[str, Family]:
    """Families by short name, never a `_created` timestamp. Series without a TYPE line are
    merged into their family (counters when named `_total`)."""
    families: dict[str, Family] = {}
    for family in text_string_to_metric_families(text):
        if family.name.endswith("_created"):
            continue
        name = short_name(family.name)
        kind = "counter" if family.type == "unknown" and family.name.endswith("_total") else family.type
        known = families.get(name)
        merged = Family(family.name, known.kind if known and kind == "unknown" else kind, dict(known.samples) if known else {})
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                merged.samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
        families[name] = merged
    return families


def scrape(url: str, timeout: float = 5.0) -> dict[str, Family]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode("utf-8")
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as error:
        # ValueError: a malformed URL, or a body that is not UTF-8 (UnicodeDecodeError); an
        # HTTPException: not an HTTP server (the gRPC port given by mistake).
        raise ScrapeError(f"cannot read the server's metrics at {url}: {error!r}") from None
    try:
        return parse(text)
    except ValueError as error:
        raise ScrapeError(f"{url} did not answer Prometheus text: {error}") from None


def _delta(before: dict[str, Family], after: dict[str, Family], name: str) -> dict[tuple[str, Labels], float]:
    """Each series' increase between the scrapes. A counter never goes down: one that did means
    the server restarted in between and counted again from zero, so its increase is its new
    value, as Prometheus' increase() takes it (50,000 -> 1,200 is 1,200, not -48,800). Done for
    the whole family at once, so that a histogram's buckets, count and sum stay one consistent
    set (a bucket that grew past its old value after the restart is not a reset on its own)."""
    old = before.get(name)
    new = after.get(name)
    if new is None:
        return {}
    previous = old.samples if old is not None else {}
    if any(value < previous.get(key, 0.0) for key, value in new.samples.items()):
        return dict(new.samples)
    return {key: value - previous.get(key, 0.0) for key, value in new.samples.items()}


def counter_total(before: dict[str, Family], after: dict[str, Family], name: str) -> float | None:
    """A counter's increase summed over all its series; None when the server has no such family."""
    if name not in after:
        return None
    return sum(_delta(before, after, name).values())


SUCCESS = "request_success"
ABORT = "abort"


def _success_by_abort(before: dict[str, Family], after: dict[str, Family]) -> tuple[float, float | None] | None:
    """request_success's increase as (generations not aborted, aborted ones); aborted is None
    when the family has no finished_reason label to tell them apart; None without the family."""
    if SUCCESS not in after:
        return None
    kept = aborted = 0.0
    labelled = False
    for (_, labels), value in _delta(before, after, SUCCESS).items():
        reason = dict(labels).get("finished_reason")
        labelled = labelled or reason is not None
        if reason == ABORT:
            aborted += value
        else:
            kept += value
    return kept, (aborted if labelled else None)


def completed_total(before: dict[str, Family], after: dict[str, Family]) -> float | None:
    """The server's count of what the client calls completed: request_success less its
    finished_reason="abort" series. Tandem's server counts an aborted generation there too
    (a draining server's, or one the caller cancelled or let pass its deadline), while the
    client counts an aborted stream as an ABORTED error, not a completed request."""
    split = _success_by_abort(before, after)
    return None if split is None else split[0]


def counter_by_label(before: dict[str, Family], after: dict[str, Family], name: str) -> dict[str, dict[str, float]]:
    """label -> value -> increase, each label's breakdown summed over the other labels."""
    breakdown: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for (_, labels), value in _delta(before, after, name).items():
        for label, label_value in labels:
            breakdown[label][label_value] += value
    return {label: {k: v for k, v in values.items() if v} for label, values in breakdown.items()}


def histogram_summary(before: dict[str, Family], after: dict[str, Family], name: str) -> dict | None:
    """Observations between the scrapes: count, mean, and p50/p90/p99 estimated from the
    buckets (linear within a bucket, as PromQL's histogram_quantile does)."""
    family = after.get(name)
    if family is None or family.kind != "histogram":
        return None
    count = total = 0.0
    buckets: dict[float, float] = defaultdict(float)
    for (sample, labels), value in _delta(before, after, name).items():
        if sample.endswith("_count"):
            count += value
        elif sample.endswith("_sum"):
            total += value
        elif sample.endswith("_bucket"):
            buckets[float(dict(labels)["le"])] += value
    summary: dict = {"count": int(count), "mean": total / count if count else None}
    for p in PERCENTILES:
        summary["median" if p == 50 else f"p{p}"] = bucket_quantile(p / 100, sorted(buckets.items()))
    return summary


def bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """buckets: (upper bound, cumulative count) in increasing order, ending at +Inf."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, cumulative in buckets:
        if cumulative >= rank:
            if upper == float("inf"):
                return lower
            inside = cumulative - below
            return lower + (upper - lower) * ((rank - below) / inside if inside else 0.0)
        lower, below = upper, cumulative
    return lower


def server_view(before: dict[str, Family], after: dict[str, Family]) -> dict:
    """Every counter's increase (with per-label breakdowns) and every histogram's summary."""
    counters, histograms = {}, {}
    for name, family in sorted(after.items()):
        if family.kind == "counter":
            counters[name] = {"total": counter_total(before, after, name), "by_label": counter_by_label(before, after, name)}
        elif family.kind == "histogram":
            histograms[name] = histogram_summary(before, after, name)
    return {"counters": counters, "histograms": histograms}


# Client figure -> (server counter or histogram short name); the histogram's mean is compared.
# "completed" is request_success without its abort series (completed_total).
COUNT_MATCHES = {"completed": "request_success", "output_tokens": "generation_tokens", "prompt_tokens": "prompt_tokens"}
ABORTED_METRIC = 'request_success{finished_reason="abort"}'
ITL_NOTE = ("client: one gap per streamed message (vLLM's ITL); server: a message's gap split over its tokens, "
            "so the server's mean is lower when messages carry several tokens")
LATENCY_MATCHES = {
    "ttft": "time_to_first_token_seconds",
    "itl": "inter_token_latency_seconds",
    "tpot": "time_per_output_token_seconds",
    "e2e": "e2e_request_latency_seconds",
}


def client_vs_server(summary: dict, before: dict[str, Family], after: dict[str, Family]) -> dict:
    """The client's counts and mean latencies beside the server's for the same run. Completed
    requests are compared like with like: the server's request_success less its aborted
    generations, which come in a row of their own ("aborted": the client's ABORTED streams
    against the server's abort series, which also holds generations the client gave up on,
    e.g. past their deadline)."""
    rows = {}
    for figure, name in COUNT_MATCHES.items():
        server = completed_total(before, after) if figure == "completed" else counter_total(before, after, name)
        rows[figure] = {"client": summary[figure], "server": server, "server_metric": name}
    split = _success_by_abort(before, after)
    if split is not None and split[1] is not None:
        rows["completed"]["server_metric"] = f'{SUCCESS}{{finished_reason!="{ABORT}"}}'
        rows["aborted"] = {"client": summary.get("errors", {}).get("ABORTED", 0), "server": split[1], "server_metric": ABORTED_METRIC}
    for figure, name in LATENCY_MATCHES.items():
        server = histogram_summary(before, after, name)
        if server is not None:
            rows[f"{figure}_mean"] = {"client": summary["latency"][figure]["mean"], "server": server["mean"], "server_metric": name}
            if figure == "itl":
                rows["itl_mean"]["note"] = ITL_NOTE
    return rows
