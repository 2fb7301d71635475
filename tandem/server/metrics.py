"""Prometheus metrics with vLLM's names and labels under the `tandem:` prefix.

Latencies and token counts are pushed by the API layer (the token counters as each output
comes, the histograms as requests end); engine and adapter gauges are pulled from a
MetricsSource at scrape time, so they are never stale.
Every series carries vLLM's `model_name` label, added at scrape time; the server knows the
name from its configuration before the model loads (model/loader.py's served_name), so what
is counted while it loads is under the name it keeps. Each Metrics owns its registries (no process-global state), so
tests can run many servers.
"""

import ipaddress
import socket
import threading
import time
from dataclasses import dataclass
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Iterator, Protocol
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from tandem.server.adapters.registry import SlotStats
    from tandem.server.engine.outputs import EngineStats
    from tandem.server.finetune.jobs import FinetuneStats

# Bucket edges follow vLLM's so dashboards written for it read ours unchanged.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# vLLM's 1-2-5 series up to its max_model_len; ours stops at the largest context we expect.
REQUEST_TOKEN_BUCKETS = tuple(m * 10**e for e in range(6) for m in (1, 2, 5)) + (1_000_000,)
# The engine's finish reasons as vLLM's finished_reason label says them.
VLLM_FINISHED_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "abort": "abort"}
# A generation the caller cancelled, or whose deadline passed, ended as an abort.
ABORT_STATUSES = frozenset({"CANCELLED", "DEADLINE_EXCEEDED"})


@dataclass
class CallSummary:
    """One RPC as the request metrics see it when it ends. Times are time.monotonic()
    seconds; None where the call never got there. generation: it reached the engine.
    prompt_tokens_counted, generated_tokens_counted: those of its tokens already in the
    token counters, added as its outputs came (vLLM counts them per engine iteration)."""

    method: str
    status: str
    finish_reason: str
    generation: bool
    prompt_tokens: int
    generated_tokens: int
    arrived: float
    ended: float
    scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    prompt_tokens_counted: int = 0
    generated_tokens_counted: int = 0

    @property
    def finished_reason(self) -> str:
        """vLLM's finished_reason: stop, length or abort; "" for a call that never ran (refused).
        A generation the engine scheduled that ended on an error (a stream's reader too far
        behind, a failed iteration) is an abort, as the caller's cancel is: it was counted
        nowhere, its tokens neither."""
        if self.finish_reason:
            return VLLM_FINISHED_REASONS.get(self.finish_reason, self.finish_reason)
        ran = self.status in ABORT_STATUSES or self.scheduled is not None
        return "abort" if self.generation and ran else ""


@dataclass
class LoraActivity:
    """Adapters of the requests in flight: waiting = no token generated yet."""

    running: list[str]
    waiting: list[str]


class MetricsSource(Protocol):
    def engine_stats(self) -> "EngineStats | None": ...

    def slot_stats(self) -> "SlotStats": ...

    def lora_activity(self) -> LoraActivity: ...

    def adapter_names(self) -> set[str]: ...

    def finetune_stats(self) -> "FinetuneStats | None": ...


class _PulledMetrics(Collector):
    def __init__(self, source: MetricsSource):
        self._source = source

    def collect(self) -> Iterator[Metric]:
        # The adapters and routers loaded now: the only names a label may carry (see below).
        loaded = self._source.adapter_names()
        stats = self._source.engine_stats()
        if stats is not None:
            yield GaugeMetricFamily("tandem:num_requests_running", "Sequences in the running batch.", stats.num_running)
            yield GaugeMetricFamily(
                "tandem:num_requests_waiting",
                "Requests queued for admission (n completions count as one until their prompt is computed).",
                stats.num_waiting,
            )
            yield GaugeMetricFamily("tandem:kv_cache_usage_perc", "KV cache blocks in use (0 to 1).", stats.kv_usage)
            yield CounterMetricFamily("tandem:num_preemptions", "Sequences preempted to free KV blocks.", stats.num_preemptions)
            tokens = CounterMetricFamily(
                "tandem:iteration_tokens_by_kind",
                "Tokens run per kind of work: decode, prefill, train_forward, train_backward (token-layers / layers).",
                labels=["kind"],
            )
            for kind, count in stats.iteration_tokens.items():
                tokens.add_metric([kind], count)
            yield tokens
            if stats.iteration_token_histogram is not None:
                histogram = stats.iteration_token_histogram
                yield HistogramMetricFamily(
                    "tandem:iteration_tokens_total", "Inference tokens (decode + prefill) per engine iteration.",
                    buckets=histogram.cumulative(), sum_value=histogram.total,
                )
            cache = GaugeMetricFamily("tandem:cache_config_info", "KV cache settings (vLLM's labels).", labels=sorted(stats.cache_config))
            cache.add_metric([stats.cache_config[k] for k in sorted(stats.cache_config)], 1)
            yield cache
            yield GaugeMetricFamily(
                "tandem:finetune_share", "Share of the next iteration's token budget co-served fine-tuning may use.",
                stats.finetune_share,
            )
            yield GaugeMetricFamily(
                "tandem:finetune_activation_bytes",
                "Memory the running co-served training micro-batch keeps for its backward (capped by --finetune-activation-bytes).",
                stats.finetune_activation_bytes,
            )
            experts = CounterMetricFamily(
                "tandem:router_expert_tokens",
                "Tokens a router ran, by the expert its gates weighted most (summed over the gated linears).",
                labels=["router", "expert"],
            )
            # Only loaded routers': an unloaded one's series stayed in every scrape for good.
            for (router, expert), count in sorted(stats.router_expert_tokens.items()):
                if router in loaded:
                    experts.add_metric([router, expert], count)
            yield experts
        slots = self._source.slot_stats()
        yield GaugeMetricFamily("tandem:lora_slots_in_use", "Device adapter slots holding an adapter.", slots.slots_in_use)
        yield CounterMetricFamily("tandem:lora_adapter_evictions", "Adapters evicted from device slots.", slots.evictions)
        yield CounterMetricFamily("tandem:lora_slot_loads", "Adapters copied into a device slot.", slots.loads)
        yield CounterMetricFamily(
            "tandem:lora_slot_load_seconds", "Time spent copying adapters into device slots.", slots.load_seconds_total
        )
        yield CounterMetricFamily("tandem:lora_host_evictions", "Adapters dropped from the host-memory cache.", slots.host_evictions)
        yield CounterMetricFamily(
            "tandem:lora_slot_prefetches", "Adapters loaded into a slot ahead of the sequence that needs them.", slots.prefetches
        )
        activity = self._source.lora_activity()
        info = GaugeMetricFamily(
            "tandem:lora_requests_info",
            "Adapters in flight (vLLM shape, read by the Gateway API Inference Extension); value = scrape time.",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        # Only names of adapters the server has loaded: a call's names are the caller's, shown
        # while the engine still reads (or refuses) them, and calls naming made-up adapters
        # made the values as long, and the series as many, as callers chose. (A loaded name
        # holds no comma, the values' separator: check_adapter_name refuses one.)
        running = sorted(set(activity.running) & loaded)
        waiting = sorted(set(activity.waiting) & loaded)
        info.add_metric([str(slots.max_loras), ",".join(running), ",".join(waiting)], time.time())
        yield info
        yield from _finetune_metrics(self._source.finetune_stats())


def _finetune_metrics(stats: "FinetuneStats | None") -> Iterator[Metric]:
    if stats is None:
        return
    jobs = GaugeMetricFamily("tandem:finetune_jobs", "Fine-tuning jobs by state.", labels=["state"])
    for state, count in stats.jobs.items():
        jobs.add_metric([state], count)
    yield jobs
    yield CounterMetricFamily("tandem:finetune_tokens", "Tokens trained on (forward and backward).", stats.tokens_total)
    if stats.running_loss is not None:
        loss = GaugeMetricFamily("tandem:finetune_loss", "Train loss of the running job's last step.", labels=["adapter"])
        loss.add_metric([stats.running_adapter], stats.running_loss)
        yield loss


class _ModelNameLabel(Collector):
    """Every series of `inner` with model_name="..." first among its labels."""

    def __init__(self, inner: CollectorRegistry, metrics: "Metrics"):
        self._inner = inner
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        for metric in self._inner.collect():
            labelled = Metric(metric.name, metric.documentation, metric.type, metric.unit)
            label = {"model_name": self._metrics.model_name}
            labelled.samples = [s._replace(labels={**label, **s.labels}) for s in metric.samples]
            yield labelled


class Metrics:
    """All instruments of one server. model_name labels every series (vLLM's label); the
    server sets it when it is built (from its configuration), else when the model has loaded."""

    def __init__(self, model_name: str = "") -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        r = self._instruments = CollectorRegistry()
        self.registry.register(_ModelNameLabel(r, self))
        self.time_to_first_token = Histogram(
            "tandem:time_to_first_token_seconds", "Time from request arrival to its first token.", buckets=TTFT_BUCKETS, registry=r
        )
        self.inter_token_latency = Histogram(
            "tandem:inter_token_latency_seconds", "Time between consecutive generated tokens.", buckets=ITL_BUCKETS, registry=r
        )
        self.e2e_request_latency = Histogram(
            "tandem:e2e_request_latency_seconds", "Time from arrival to the last token.", buckets=E2E_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("tandem:prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("tandem:generation_tokens", "Tokens generated.", registry=r)
        self.request_success = Counter(
            "tandem:request_success", "Generations that completed, by finish reason.", ["finished_reason"], registry=r
        )
        self.requests = Counter(
            "tandem:requests", "RPCs by method, status code and finish reason.", ["method", "status", "finished_reason"], registry=r
        )
        self.calls_received = Counter(
            "tandem:calls_received",
            "tandem.v1 gRPC calls by method, counted as they arrive; less tandem:requests_total of the same method: "
            "the calls gRPC ended before their handler ran (cancelled or past their deadline before their request "
            "was read, or a request over --max-message-bytes).",
            ["method"], registry=r,
        )
        self.lora_adapter_loads = Counter("tandem:lora_adapter_loads", "Successful LoadAdapter calls.", registry=r)
        self.request_prompt_tokens = Histogram(
            "tandem:request_prompt_tokens", "Prompt tokens of each finished generation.", buckets=REQUEST_TOKEN_BUCKETS, registry=r
        )
        self.request_generation_tokens = Histogram(
            "tandem:request_generation_tokens", "Tokens generated by each finished generation.", buckets=REQUEST_TOKEN_BUCKETS, registry=r
        )
        self.request_queue_time = Histogram(
            "tandem:request_queue_time_seconds", "Time from arrival until the engine first scheduled the request.", buckets=E2E_BUCKETS, registry=r
        )
        self.request_prefill_time = Histogram(
            "tandem:request_prefill_time_seconds", "Time from first scheduled to the first token.", buckets=E2E_BUCKETS, registry=r
        )
        self.request_decode_time = Histogram(
            "tandem:request_decode_time_seconds", "Time from the first token to the last.", buckets=E2E_BUCKETS, registry=r
        )
        self.request_inference_time = Histogram(
            "tandem:request_inference_time_seconds", "Time from first scheduled to the last token.", buckets=E2E_BUCKETS, registry=r
        )
        self._http = None

    def bind(self, source: MetricsSource) -> None:
        """Adds the gauges read from the engine and the adapter pool at scrape time."""
        self._instruments.register(_PulledMetrics(source))

    def observe_call(self, call: CallSummary, requests: Sequence[CallSummary] | None = None) -> None:
        """Counts one ended RPC in tandem:requests; and each of its engine requests
        (`requests`, default the call as one) that finished or was aborted in vLLM's request
        metrics, as vLLM counts them: each prompt of a batch, and each of a prompt's n
        completions, is a request of its own (a 3-prompt completions call is 3 successes)."""
        self.requests.labels(call.method, call.status, call.finished_reason).inc()
        for request in (call,) if requests is None else requests:
            self._observe_request(request)

    def _observe_request(self, call: CallSummary) -> None:
        reason = call.finished_reason
        # Every generation that ended, whatever its status: one the caller left once its last
        # token was out (CANCELLED, finish reason length) was counted in TTFT and ITL only.
        if not call.generation or not reason:
            return
        self.request_success.labels(reason).inc()
        self.e2e_request_latency.observe(call.ended - call.arrived)
        # The rest of its tokens: a completion aborted before its first token adds its prompt here.
        self.prompt_tokens.inc(call.prompt_tokens - call.prompt_tokens_counted)
        self.generation_tokens.inc(call.generated_tokens - call.generated_tokens_counted)
        if call.prompt_tokens:  # 0: it ended (cancelled, past its deadline) before the engine reported its prompt's length
            self.request_prompt_tokens.observe(call.prompt_tokens)
        self.request_generation_tokens.observe(call.generated_tokens)
        if call.scheduled is None:
            return
        self.request_queue_time.observe(call.scheduled - call.arrived)
        if call.last_token is not None:
            self.request_inference_time.observe(call.last_token - call.scheduled)
        if call.first_token is not None and call.last_token is not None:
            self.request_prefill_time.observe(call.first_token - call.scheduled)
            self.request_decode_time.observe(call.last_token - call.first_token)

    def serve(self, host: str, port: int) -> int:
        """Starts the /metrics HTTP endpoint in a thread; returns the bound port. It always
        answers in Prometheus' text format: asked for OpenMetrics (Prometheus 2's first
        choice), prometheus_client escapes the ':' of every sample's name but not of its
        TYPE line, and every tandem:* series is stored as tandem_* (dashboards, the HPA's
        adapter and alerts then find nothing)."""
        app = make_wsgi_app(self.registry)

        def text_format(environ: dict, start_response: Callable) -> Iterable[bytes]:
            environ["HTTP_ACCEPT"] = "text/plain; version=0.0.4"
            return app(environ, start_response)

        address, dual_stack = listen_address(host)

        class Server(ThreadingWSGIServer):
            address_family = socket.AF_INET6 if ":" in address else socket.AF_INET

            def server_bind(self) -> None:
                if dual_stack:
                    self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                super().server_bind()

        self._http = make_server(address, port, text_format, Server, handler_class=_Quiet)
        threading.Thread(target=self._http.serve_forever, name="metrics-http", daemon=True).start()
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def listen_address(host: str) -> tuple[str, bool]:
    """The address a listener for host binds, and whether it takes IPv4 beside IPv6.

    The IPv6 wildcard (::) means every address, as gRPC reads it, so that one TANDEM_HOST
    serves IPv4, IPv6 and dual-stack clusters: both families where sockets can be dual-stack
    (said explicitly: socket.create_server makes an IPv6 socket IPv6-only, as do the BSDs and
    Linux with net.ipv6.bindv6only), IPv4's wildcard on a kernel without IPv6 (booted with
    ipv6.disable=1, as hardening guides advise), where binding :: fails.
    """
    try:
        wildcard = ipaddress.ip_address(host) == ipaddress.IPv6Address("::")
    except ValueError:
        wildcard = False
    if not wildcard:
        return host, False
    if socket.has_dualstack_ipv6():
        return host, True
    return (host, False) if _has_ipv6() else ("0.0.0.0", False)


def _has_ipv6() -> bool:
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True


class _Quiet(WSGIRequestHandler):
    """Scrapes every few seconds are no news: the access log stays off."""

    def log_message(self, format: str, *args: object) -> None:
        pass
