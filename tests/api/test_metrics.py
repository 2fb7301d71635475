"""The Prometheus exposition as vLLM's dashboards read it: every series labelled model_name,
vLLM's finished_reason values (stop, length, abort; a cancelled stream is an abort), the
request histograms, iteration tokens and cache_config_info; and the Grafana dashboard in
deploy/grafana queries only series the server exposes."""

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tandem.client import TandemClient, TandemRpcError
from tandem.server.metrics import CallSummary
from tests.api.conftest import loopback, wait_until
from tests.api.harness import ServerThread

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "tandem.json"
PROMPT = [101, 2020, 345, 7777, 12]


@pytest.fixture(scope="module")
def metrics_server(tiny_engine) -> Iterator[ServerThread]:
    """A server of its own: its request metrics count only this module's calls."""
    thread = ServerThread(loopback(), tiny_engine)
    yield thread
    thread.stop()


def scrape(server: ServerThread) -> dict[str, list]:
    """Sample name -> [(labels, value)] from the server's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10).read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples: dict[str, list], name: str, **labels: str) -> float:
    matching = [v for got, v in samples.get(name, []) if all(got.get(k) == want for k, want in labels.items())]
    assert len(matching) == 1, (name, labels, samples.get(name))
    return matching[0]


@pytest.fixture(scope="module")
def after_known_requests(metrics_server) -> dict[str, list]:
    """length (4 tokens), stop (2 tokens, a stop token id), a stream cancelled after its
    first message, and a Tokenize call; then one scrape."""
    with TandemClient(metrics_server.target, timeout=60, max_retries=0) as client:
        first = client.generate(prompt_token_ids=PROMPT, max_new_tokens=4, ignore_eos=True)
        assert (first.finish_reason, first.generated_tokens) == ("length", 4)
        stopped = client.generate(prompt_token_ids=PROMPT, max_new_tokens=8, ignore_eos=True, stop_token_ids=[first.token_ids[1]])
        assert (stopped.finish_reason, stopped.generated_tokens) == ("stop", 2)
        stream = client.stream(prompt_token_ids=PROMPT, max_new_tokens=400, ignore_eos=True)
        next(stream)
        stream.close()
        client.tokenize("hello")
    model = metrics_server.engine.info.name
    assert wait_until(lambda: ("abort", model) in {(l["finished_reason"], l["model_name"]) for l, _ in scrape(metrics_server).get("tandem:request_success_total", [])})
    return scrape(metrics_server)


def test_every_series_carries_model_name(after_known_requests, metrics_server):
    model = metrics_server.engine.info.name
    unlabelled = {name for name, rows in after_known_requests.items() for labels, _ in rows if labels.get("model_name") != model}
    assert unlabelled == set()


def test_a_scrape_asking_for_openmetrics_gets_the_same_names(after_known_requests, metrics_server):
    """Prometheus 2 asks for OpenMetrics first; in it prometheus_client wrote every sample as
    tandem_* under a TYPE line of tandem:*, so no tandem:* series was stored."""
    accept = "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
    request = urllib.request.Request(f"http://127.0.0.1:{metrics_server.server.metrics_port}/metrics", headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=10) as reply:
        text = reply.read().decode()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert "tandem:num_requests_waiting" in names and not any(n.startswith("tandem_") for n in names)


def test_finished_reasons_and_calls(after_known_requests):
    s = after_known_requests
    assert {labels["finished_reason"]: v for labels, v in s["tandem:request_success_total"]} == {"length": 1, "stop": 1, "abort": 1}
    assert value(s, "tandem:requests_total", method="Generate", status="OK", finished_reason="length") == 1
    assert value(s, "tandem:requests_total", method="Generate", status="OK", finished_reason="stop") == 1
    assert value(s, "tandem:requests_total", method="GenerateStream", status="CANCELLED", finished_reason="abort") == 1
    assert value(s, "tandem:requests_total", method="Tokenize", status="OK", finished_reason="") == 1


def test_request_histograms(after_known_requests):
    s = after_known_requests
    assert value(s, "tandem:request_prompt_tokens_count") == 3
    assert value(s, "tandem:request_prompt_tokens_sum") == 3 * len(PROMPT)
    assert value(s, "tandem:request_prompt_tokens_bucket", le="5.0") == 3
    assert value(s, "tandem:request_generation_tokens_count") == 3
    assert value(s, "tandem:request_generation_tokens_sum") >= 4 + 2 + 1  # the cancelled stream got at least one
    assert value(s, "tandem:request_generation_tokens_bucket", le="2.0") >= 1  # the stopped one
    for phase in ("queue", "prefill", "decode", "inference"):
        assert value(s, f"tandem:request_{phase}_time_seconds_count") == 3, phase
        assert value(s, f"tandem:request_{phase}_time_seconds_sum") >= 0, phase
    e2e = value(s, "tandem:e2e_request_latency_seconds_sum")
    phases = sum(value(s, f"tandem:request_{p}_time_seconds_sum") for p in ("queue", "prefill", "decode"))
    assert phases <= e2e  # queue, prefill and decode are successive parts of each request
    assert value(s, "tandem:prompt_tokens_total") == 3 * len(PROMPT)


def test_iteration_tokens_and_cache_config(after_known_requests, tiny_engine):
    s = after_known_requests
    assert value(s, "tandem:iteration_tokens_total_count") >= 1
    # Every prompt was prefilled and every generated token but the last decoded by some iteration.
    assert value(s, "tandem:iteration_tokens_total_sum") >= 3 * len(PROMPT) + 4 + 2 - 2
    assert value(s, "tandem:iteration_tokens_total_bucket", le="+Inf") == value(s, "tandem:iteration_tokens_total_count")
    assert {labels["kind"] for labels, _ in s["tandem:iteration_tokens_by_kind_total"]} >= {"decode", "prefill"}
    stats = tiny_engine.stats()
    (labels, one), = s["tandem:cache_config_info"]
    assert one == 1
    assert (labels["block_size"], labels["num_gpu_blocks"], labels["cache_dtype"]) == ("16", str(stats.num_total_blocks), "float32")


def test_eos_is_counted_as_stop():
    """vLLM's dashboards know stop, length and abort; the engine's eos is a stop."""
    call = CallSummary("Generate", "OK", "eos", True, 3, 2, arrived=0.0, ended=1.0)
    assert call.finished_reason == "stop"
    assert CallSummary("GenerateStream", "DEADLINE_EXCEEDED", "", True, 3, 0, arrived=0.0, ended=1.0).finished_reason == "abort"
    assert CallSummary("Generate", "INVALID_ARGUMENT", "", True, 0, 0, arrived=0.0, ended=1.0).finished_reason == ""


def test_the_grafana_dashboard_queries_only_exposed_series(after_known_requests):
    exprs = [target["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"] for target in panel["targets"]]
    queried = {name for expr in exprs for name in re.findall(r"tandem:[a-z0-9_:]+", expr)}
    assert len(queried) >= 15
    assert sorted(queried - set(after_known_requests)) == []


def test_a_generation_cancelled_before_the_engine_reported_it_observes_no_prompt_length():
    """It observed a prompt of 0 tokens: the histogram's lowest bucket filled exactly when
    the server was overloaded and requests timed out in the queue."""
    from tandem.server.metrics import Metrics

    metrics = Metrics("m")
    metrics.observe_call(CallSummary("GenerateStream", "CANCELLED", "", True, 0, 0, arrived=0.0, ended=1.0))
    metrics.observe_call(CallSummary("Generate", "OK", "length", True, 7, 2, arrived=0.0, ended=1.0))
    assert metrics.request_prompt_tokens._sum.get() == 7 and metrics.request_success.labels("abort")._value.get() == 1
    samples = {s.labels["le"]: s.value for s in metrics.request_prompt_tokens.collect()[0].samples if s.name.endswith("_bucket")}
    assert samples["+Inf"] == 1 and samples["1.0"] == 0


def test_every_generation_that_ran_is_counted_whatever_status_ended_it():
    """A stream stopped for a reader too far behind (RESOURCE_EXHAUSTED), or a completion its
    caller left after its last token (CANCELLED, length), was in no request count and its
    tokens in no token counter; one refused before it ran still counts in neither."""
    from tandem.server.metrics import Metrics

    metrics = Metrics("m")
    for call in (
        CallSummary("GenerateStream", "RESOURCE_EXHAUSTED", "", True, 3, 256, arrived=0.0, ended=1.0, scheduled=0.1),
        CallSummary("GenerateStream", "CANCELLED", "length", True, 3, 8, arrived=0.0, ended=1.0, scheduled=0.1),
        CallSummary("Generate", "RESOURCE_EXHAUSTED", "", True, 0, 0, arrived=0.0, ended=0.1),  # the queue was full
    ):
        metrics.observe_call(call)
    assert metrics.request_success.labels("abort")._value.get() == 1 and metrics.request_success.labels("length")._value.get() == 1
    assert metrics.generation_tokens._value.get() == 264 and metrics.prompt_tokens._value.get() == 6
    assert metrics.e2e_request_latency._sum.get() == 2.0


def test_the_dashboards_heatmaps_read_prometheus_buckets_as_buckets():
    """Without format heatmap Grafana took the cumulative buckets as they are: each row
    counted every smaller request, +Inf the hottest, rows in the text order of le."""
    heatmaps = [panel for panel in json.loads(DASHBOARD.read_text())["panels"] if panel["type"] == "heatmap"]
    assert len(heatmaps) >= 2
    for panel in heatmaps:
        assert panel["options"]["calculate"] is False, panel["title"]
        assert all(t["format"] == "heatmap" and "_bucket" in t["expr"] for t in panel["targets"]), panel["title"]


def test_inter_token_latency_follows_each_completion_of_n(monkeypatch):
    """n completions' outputs interleave: each output after the first in a step read as a
    ~0 s gap, and the other completions' first tokens counted as intervals."""
    from tandem.server.api import call_record
    from tandem.server.engine.outputs import RequestOutput
    from tandem.server.metrics import Metrics

    now = [0.0]
    monkeypatch.setattr(call_record, "time", SimpleNamespace(monotonic=lambda: now[0]))
    metrics = Metrics("m")
    record = call_record.CallRecord("r", "Generate", metrics)
    for step in range(3):  # every step, 50 ms apart, one token for each of 4 completions
        now[0] += 0.05
        for index in range(4):
            record.on_output(RequestOutput("r", "x", [7], False, None, 3, step + 1, index=index))
    samples = {s.name: s.value for s in metrics.inter_token_latency.collect()[0].samples if not s.labels.get("le")}
    assert samples["tandem:inter_token_latency_seconds_count"] == 8  # 4 completions x 2 intervals
    assert samples["tandem:inter_token_latency_seconds_sum"] == pytest.approx(8 * 0.05)


class _Source:
    """A MetricsSource with adapters in flight and a set of loaded ones, no engine."""

    def __init__(self, running: list[str], waiting: list[str], loaded: set[str]):
        from tandem.server.adapters.registry import SlotStats
        from tandem.server.metrics import LoraActivity

        self._activity = LoraActivity(running, waiting)
        self._loaded = loaded
        self._slots = SlotStats(max_loras=4, slots_in_use=0, loads=0, evictions=0, load_seconds_total=0.0, host_evictions=0, prefetches=0)

    def engine_stats(self):
        return None

    def slot_stats(self):
        return self._slots

    def lora_activity(self):
        return self._activity

    def adapter_names(self) -> set[str]:
        return self._loaded

    def finetune_stats(self):
        return None


def _lora_info(source: _Source) -> dict[str, str]:
    from prometheus_client import generate_latest

    from tandem.server.metrics import Metrics

    metrics = Metrics("m")
    metrics.bind(source)
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())}
    (sample,) = families["tandem:lora_requests_info"].samples
    return sample.labels


def test_lora_requests_info_names_only_loaded_adapters():
    """A call's adapter names are the caller's until the engine has checked them: calls
    waiting on made-up names (thousands of them, or mixtures of thousands) put every name
    in the label values, a new series each scrape; and "x,sql-expert" read, to the Gateway
    API Inference Extension, as this replica serving sql-expert."""
    labels = _lora_info(_Source(
        running=["sql", "ghost-1", "x,sql-expert"], waiting=["json", "ghost-2", *(f"made-up-{i}" for i in range(1000))],
        loaded={"sql", "json", "unused"},
    ))
    assert (labels["running_lora_adapters"], labels["waiting_lora_adapters"]) == ("sql", "json")
    assert _lora_info(_Source(running=[], waiting=["made-up"], loaded=set()))["waiting_lora_adapters"] == ""


def test_a_call_refused_while_the_model_loads_counts_under_the_models_name(tiny_engine, tiny_model_dir):
    """model_name was set only when the engine attached: refusals while loading were counted
    under model_name="", then moved, counts and all, to the model's name, and rate() never
    showed them."""
    from tandem.server.model.loader import served_name

    name = served_name(str(tiny_model_dir))
    assert name == tiny_engine.info.name  # the loader's own name for it
    thread = ServerThread(loopback(), None, model_name=name)
    try:
        with TandemClient(thread.target, timeout=30, max_retries=0) as client:
            with pytest.raises(TandemRpcError) as refused:
                client.generate(prompt_token_ids=PROMPT, max_new_tokens=1)
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE and "still loading" in refused.value.message
        refusals = lambda: [v for l, v in scrape(thread).get("tandem:requests_total", []) if l["status"] == "UNAVAILABLE"]
        assert wait_until(refusals)  # the call is counted as it closes, which can be after its status reached us
        loading = scrape(thread)
        assert value(loading, "tandem:requests_total", method="Generate", status="UNAVAILABLE", model_name=name) == 1
        assert {labels["model_name"] for rows in loading.values() for labels, _ in rows} == {name}
        thread.attach(tiny_engine)
        loaded = scrape(thread)
        assert value(loaded, "tandem:requests_total", method="Generate", status="UNAVAILABLE", model_name=name) == 1
        assert {labels["model_name"] for rows in loaded.values() for labels, _ in rows} == {name}
    finally:
        thread.stop()


def test_a_model_is_served_under_its_files_stem_or_its_directorys_name(tmp_path):
    """What the metrics carry before the model loads and the loader names it after."""
    from tandem.server.model.loader import default_model_path, served_name

    (tmp_path / "Llama-3-8B.Q4_K_M.gguf").write_bytes(b"GGUF")
    (tmp_path / "qwen2-0.5b").mkdir()
    assert served_name(str(tmp_path / "Llama-3-8B.Q4_K_M.gguf")) == "Llama-3-8B.Q4_K_M"
    assert served_name(str(tmp_path / "qwen2-0.5b")) == "qwen2-0.5b"
    assert served_name(str(tmp_path / "qwen2-0.5b") + "/") == "qwen2-0.5b"
    assert served_name(None) == default_model_path().stem


def test_token_counters_move_as_outputs_come_and_end_at_the_same_totals():
    """tandem:prompt_tokens and generation_tokens were added when the call ended: a stream
    of minutes added nothing, then all of it at once, and rate() over them showed a spike.
    vLLM counts them per iteration. A completion that never sent a token still adds its
    prompt when the call ends, as before."""
    from tandem.server.api.call_record import CallRecord
    from tandem.server.engine.outputs import FinishReason, RequestOutput
    from tandem.server.metrics import Metrics

    metrics = Metrics("m")
    counted = lambda: (metrics.prompt_tokens._value.get(), metrics.generation_tokens._value.get())
    record = CallRecord("r", "GenerateStream", metrics)
    record.add_engine_request("e", 0, 2)
    output = lambda tokens, generated, reason=None: RequestOutput(
        "e", "x", tokens, reason is not None, reason, len(PROMPT), generated, first_scheduled_at=0.0, index=0
    )
    record.on_output(output([7], 1))
    assert counted() == (len(PROMPT), 1)
    for generated in range(2, 10):
        record.on_output(output([7], generated))
    assert counted() == (len(PROMPT), 9)
    record.on_output(output([7, 8], 11, FinishReason.LENGTH))
    assert counted() == (len(PROMPT), 11)
    record.close("CANCELLED")  # completion 1 was still queued: aborted, its prompt counted now
    assert counted() == (2 * len(PROMPT), 11)
    assert (metrics.request_prompt_tokens._sum.get(), metrics.request_generation_tokens._sum.get()) == (2 * len(PROMPT), 11)
