"""Runs a sweep: checks the server answers, warms up, then for each load point sends the
requests, waits for them, and summarizes them beside the server's metrics.

Every loop is bounded: a point sends at most `num_requests` requests or for at most
`duration` seconds (an infinite duration only beside a count), and each request ends by its
own deadline (measurement.timed_stream).
"""

import asyncio
import itertools
import math
import struct
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TextIO

import grpc
import numpy as np

from tandem.client.async_client import AsyncTandemClient
from tandem.client.bench import server_metrics
from tandem.client.bench.arrivals import LoadPoint, inter_arrival_gaps
from tandem.client.bench.measurement import RequestRecord, timed_stream
from tandem.client.bench.progress import Progress
from tandem.client.bench.stats import summarize_run
from tandem.client.bench.workload import BenchRequest, cycle
from tandem.client.errors import TandemRpcError
from tandem.client.types import FinetuneJob, Hyperparameters

# Mixed into the seed of every point's arrivals: a stream apart from the request content's
# (command._requests draws prompts, adapters and lengths from default_rng(seed)).
ARRIVALS_STREAM = 0x4152524956  # "ARRIV"
# After a point, the server may still be closing its last calls when the client has read them.
SETTLE_SCRAPES = 30
SETTLE_PAUSE_S = 0.1


class BenchError(Exception):
    """The run cannot go on (e.g. every warm-up request failed); carries the gRPC code if any."""

    def __init__(self, message: str, code=None):
        super().__init__(message)
        self.code = code


@dataclass
class LoadPlan:
    """How load is applied at each point. At least one of num_requests and duration bounds it."""

    points: list[LoadPoint]
    num_requests: int | None = None
    duration: float | None = None
    burstiness: float = 1.0
    warmup_requests: int = 1
    request_timeout: float = 300.0
    slo: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("give at least one --request-rate or --concurrency")
        if self.num_requests is None and self.duration is None:
            raise ValueError("bound each point with --num-requests or --duration")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError("--num-requests must be >= 1")
        if self.duration is not None and not self.duration > 0:
            raise ValueError("--duration must be > 0")
        if self.num_requests is None and self.duration is not None and math.isinf(self.duration):
            raise ValueError("--duration inf never ends a point: bound it with --num-requests")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise ValueError(f"--burstiness must be a finite number > 0, got {self.burstiness}")
        if self.num_requests is None and any(p.rate is not None and math.isinf(p.rate) for p in self.points):
            raise ValueError("rate inf sends every request at once: bound it with --num-requests")


@dataclass
class FinetuneLoad:
    """A fine-tuning job started after the warm-up and cancelled after the sweep if still running."""

    adapter: str
    training_data: str
    hyperparameters: Hyperparameters = field(default_factory=dict)  # type: ignore[assignment]


@dataclass
class PointResult:
    point: LoadPoint
    records: list[RequestRecord]
    summary: dict


class _Tracker:
    """Collects the records of a point as requests end, and counts them for the progress line."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.records: list[RequestRecord] = []
        self.running = self.failed = 0

    async def run(self, request: Awaitable[RequestRecord], scheduled: float | None = None) -> None:
        """Awaits one request; `scheduled` (the loop's clock) is when the open loop meant it to
        start, and the record keeps how late it did (send_lag)."""
        self.running += 1
        self._show()
        lag = None if scheduled is None else max(0.0, asyncio.get_running_loop().time() - scheduled)
        try:
            record = await request
        finally:
            self.running -= 1
        record.send_lag = lag
        self.records.append(record)
        self.failed += not record.ok
        self._show()

    def _show(self) -> None:
        self.progress.update(len(self.records), self.running, self.failed)


def arrival_rng(seed: int, point: LoadPoint) -> np.random.Generator:
    """The generator of one point's arrival gaps, seeded from (seed, the point's rate): the
    rate-2 point of `--request-rate 1,2` sends on the same schedule as `--request-rate 2`
    alone, whatever points came before it, and no draw is shared with the request content's
    generator. A concurrency point draws nothing; it is keyed by its concurrency."""
    if point.rate is not None:
        key = int.from_bytes(struct.pack(">d", point.rate), "big")  # the rate's exact bits
    else:
        key = int(point.concurrency)
    return np.random.default_rng(np.random.SeedSequence([seed, ARRIVALS_STREAM, int(point.rate is None), key]))


def _limits_reached(plan: LoadPlan, sent: int, elapsed: float) -> bool:
    return (plan.num_requests is not None and sent >= plan.num_requests) or (plan.duration is not None and elapsed >= plan.duration)


async def _open_loop(send: Callable[[float], Awaitable[None]], plan: LoadPlan, rate: float,
                     rng: np.random.Generator) -> list[asyncio.Task]:
    """Sends at Poisson / gamma times regardless of how many are in flight; each send is
    given its scheduled time on the loop's clock."""
    loop = asyncio.get_running_loop()
    start, offset, tasks = loop.time(), 0.0, []
    while not _limits_reached(plan, len(tasks), offset):
        await asyncio.sleep(max(0.0, start + offset - loop.time()))
        tasks.append(asyncio.create_task(send(start + offset)))
        offset += float(inter_arrival_gaps(rate, 1, rng, plan.burstiness)[0])
    return tasks


async def _closed_loop(send: Callable[[], Awaitable[None]], plan: LoadPlan, concurrency: int) -> list[asyncio.Task]:
    """`concurrency` workers, each sending its next request when the last one ends."""
    loop = asyncio.get_running_loop()
    start, sent = loop.time(), itertools.count()

    async def worker() -> None:
        while not _limits_reached(plan, next(sent), loop.time() - start):
            await send()

    workers = concurrency if plan.num_requests is None else min(concurrency, plan.num_requests)
    return [asyncio.create_task(worker()) for _ in range(workers)]


async def run_point(client: AsyncTandemClient, requests: Iterator[BenchRequest], point: LoadPoint, plan: LoadPlan,
                    rng: np.random.Generator, progress: Progress) -> list[RequestRecord]:
    """Every request of one point, in the order they ended. Each ends by its own deadline."""
    tracker = _Tracker(progress)

    def send(scheduled: float | None = None) -> Awaitable[None]:
        return tracker.run(timed_stream(client, next(requests), plan.request_timeout), scheduled)

    if point.concurrency is not None:
        tasks = await _closed_loop(send, plan, point.concurrency)
    else:
        tasks = await _open_loop(send, plan, point.rate, rng)
    await asyncio.gather(*tasks)
    progress.close()
    return tracker.records


async def _warm_up(client: AsyncTandemClient, requests: Iterator[BenchRequest], plan: LoadPlan) -> None:
    """Requests that are not measured; if all fail, the sweep would only measure errors: stop."""
    if plan.warmup_requests < 1:
        return
    records = await asyncio.gather(*(timed_stream(client, next(requests), plan.request_timeout) for _ in range(plan.warmup_requests)))
    failed = [r for r in records if not r.ok]
    if len(failed) == len(records):
        first = failed[0]
        raise BenchError(f"every warm-up request failed, e.g. {first.status}: {first.error}", grpc.StatusCode[first.status])


class ServerScraper:
    """Scrapes the metrics endpoint around each point; a failure is reported, never fatal."""

    def __init__(self, url: str | None, log: TextIO):
        self.url, self.log, self._warned = url, log, False

    async def scrape(self) -> dict | None:
        if self.url is None:
            return None
        try:
            return await asyncio.to_thread(server_metrics.scrape, self.url)
        except server_metrics.ScrapeError as error:
            if not self._warned:
                print(f"tandem bench: warning: {error}; the report has no server view", file=self.log)
                self._warned = True
            return None

    async def settled(self, before: dict, completed: int) -> dict | None:
        """The scrape after a point, once the server has counted every completed request."""
        after = None
        for _ in range(SETTLE_SCRAPES):
            after = await self.scrape()
            counted = None if after is None else server_metrics.completed_total(before, after)
            if counted is None or counted >= completed:
                return after
            await asyncio.sleep(SETTLE_PAUSE_S)
        return after


def _job_state(job: FinetuneJob) -> dict:
    return {"id": job.id, "adapter": job.adapter, "status": job.status, "step": job.step, "total_steps": job.total_steps,
            "trained_tokens": job.trained_tokens, "tokens_per_second": job.tokens_per_second, "mode": job.mode}


async def run_sweep(client: AsyncTandemClient, requests: list[BenchRequest], plan: LoadPlan, seed: int,
                    metrics_url: str | None, finetune: FinetuneLoad | None = None, progress: bool = True,
                    log: TextIO = sys.stderr) -> list[PointResult]:
    """Runs every point of the plan in order, each over the same requests in the same order,
    each on arrivals of its own (arrival_rng)."""
    scraper = ServerScraper(metrics_url, log)
    await _warm_up(client, cycle(requests), plan)
    job = None
    if finetune is not None:
        job = await client.create_finetune_job(finetune.adapter, training_data=finetune.training_data,
                                               hyperparameters=finetune.hyperparameters)
    results = []
    try:
        for point in plan.points:
            before = await scraper.scrape()
            bar = Progress(point.label, plan.num_requests, plan.duration, stream=log, enabled=progress)
            records = await run_point(client, cycle(requests), point, plan, arrival_rng(seed, point), bar)
            summary = summarize_run(records, plan.slo)
            summary["load"] = {"label": point.label, "rate": _json_rate(point.rate), "concurrency": point.concurrency,
                               "burstiness": plan.burstiness if point.rate is not None else None}
            if before is not None:
                after = await scraper.settled(before, summary["completed"])
                if after is not None:
                    summary["server"] = server_metrics.server_view(before, after)
                    summary["client_vs_server"] = server_metrics.client_vs_server(summary, before, after)
            if job is not None:
                summary["finetune_job"] = _job_state(await client.get_finetune_job(job.id))
            results.append(PointResult(point, records, summary))
    finally:
        if job is not None:
            await _stop_job(client, job.id, log)
    return results


async def _stop_job(client: AsyncTandemClient, job_id: str, log: TextIO) -> None:
    try:
        if not (await client.get_finetune_job(job_id)).ended:
            await client.cancel_finetune_job(job_id)
    except TandemRpcError as error:
        print(f"tandem bench: warning: could not cancel fine-tuning job {job_id}: {error}", file=log)


def _json_rate(rate: float | None) -> float | str | None:
    """JSON has no infinity: an all-at-once rate is written "inf"."""
    return "inf" if rate is not None and math.isinf(rate) else rate

