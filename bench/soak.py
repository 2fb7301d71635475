"""Soak: minutes of mixed load against a real Tandem server, then a check that nothing leaked.

Worker threads send, at random: unary and streamed generations on the base model and on
adapters, streams cancelled part-way, calls whose deadline is too short to finish, slow
readers that stop reading for seconds (then read on, or leave), requests the server must
refuse (bad fields, unknown adapters, bytes that are not protobuf), tokenization and
listings. One more thread loads, reloads and unloads adapters; another, optionally, trains
small fine-tuning jobs one after another, each published as a new version of an adapter the
workers then use. Every answer must be a status its call may end with (never INTERNAL or
UNKNOWN). Afterwards the server must be idle again: no sequence running or waiting, every KV
block free, no adapter slot pinned, no adapter in use, no job running; its RSS within 5% of
what it was after the warm-up; and the base model and a reference adapter (which the churn
never touches) must give the greedy tokens they gave before any load.

The server runs in this process (tests/api/harness.py), so the RSS is the server's and the
load generator's together, and the engine's own counters can be read directly.

    .venv/bin/python bench/soak.py [--minutes 5] [--workers 6] [--no-finetune] [--model PATH]

Prints a table and writes bench/results/soak_cpu.json (soak_cpu_<dtype>.json with --dtype).
tests/hardening/test_soak.py runs the same soak for 90 seconds on the tiny test model.
"""

import argparse
import ctypes
import gc
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import machine_info, write_result  # noqa: E402
from tandem.server.adapters.peft_format import peft_config, write_adapter  # noqa: E402
from tandem.server.config import EngineConfig, ServerConfig  # noqa: E402
from tandem.server.engine.async_engine import AsyncEngine  # noqa: E402
from tandem.server.model.lora_targets import TARGET_SLICES, group_linears, module_path  # noqa: E402
from tandem.v1 import (  # noqa: E402
    adapters_pb2, adapters_pb2_grpc, finetuning_pb2, finetuning_pb2_grpc, generation_pb2, generation_pb2_grpc,
)
from tests.api.harness import ServerThread  # noqa: E402

Code = grpc.StatusCode
REFERENCE = "ref"  # the adapter whose output must not change; the churn never touches it
RSS_TOLERANCE = 0.05
ENDED = (finetuning_pb2.JOB_STATUS_SUCCEEDED, finetuning_pb2.JOB_STATUS_FAILED, finetuning_pb2.JOB_STATUS_CANCELLED)
CALL_TIMEOUT = 300.0  # a call that takes longer has hung
RSS_SAMPLE_SECONDS = 5.0
IDLE_TIMEOUT = 30.0  # how long the server gets to become idle once the load stops
FINETUNE_PAUSE_SECONDS = 20.0  # between one job's end and the next one's start
PROMPTS = [
    "Hi",
    "The capital of France is",
    "Write a short story about a robot who learns to paint, in three sentences.",
    "List the planets of the solar system in order from the sun, with one fact about each of them. " * 3,
]
DATASET = "\n".join(json.dumps({"prompt": f"Record {i}:", "completion": f" id={i}, value={i * 7 % 11}"}) for i in range(16))
# A GenerateRequest whose prompt (field 1) is not UTF-8: the request does not parse.
NOT_PROTOBUF = b"\x0a\x02\xff\xfe"
# What each kind of call may end with.
ALLOWED = {
    "generate": {"OK", "NOT_FOUND"},  # NOT_FOUND: the churn unloaded its adapter
    "stream": {"OK", "NOT_FOUND"},
    "cancel": {"OK", "NOT_FOUND", "CANCELLED"},
    "deadline": {"OK", "NOT_FOUND", "DEADLINE_EXCEEDED"},
    "slow_reader": {"OK", "NOT_FOUND", "CANCELLED", "RESOURCE_EXHAUSTED"},
    "bad_input": {"INVALID_ARGUMENT", "NOT_FOUND"},
    "tokenize": {"OK"},
    "list": {"OK"},
    "load": {"OK"},
    "unload": {"OK", "NOT_FOUND"},
    "finetune": {"SUCCEEDED", "CANCELLED"},  # CANCELLED: the job still running when the soak ends
}


@dataclass(frozen=True)
class SoakSettings:
    seconds: float
    warmup_seconds: float = 60.0
    workers: int = 6
    adapters: int = 4  # served besides the base model and the reference adapter
    rank: int = 8
    max_new_tokens: int = 32  # of ordinary requests; slow readers and deadlines ask for 4x
    finetune: bool = True
    seed: int = 0


@dataclass
class SoakReport:
    """What the soak saw. requests: kind of call -> final status -> count (client side);
    server_statuses: status -> count from the server's own request metric."""

    settings: SoakSettings
    dtype: str  # the one the engine serves in
    seconds: float
    requests: dict[str, dict[str, int]]
    server_statuses: dict[str, int]
    generated_tokens: int
    unexpected: list[str]
    rss_after_warmup_mb: float
    rss_after_mb: float
    rss_samples_mb: list[tuple[float, float]]  # during the soak: (seconds, MB)
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    slot_pins: int
    adapters_in_use: int
    jobs_running: int
    loop_errors: list[str]
    greedy_unchanged: bool

    @property
    def total_requests(self) -> int:
        return sum(sum(by_status.values()) for by_status in self.requests.values())

    @property
    def rss_growth(self) -> float:
        return self.rss_after_mb / self.rss_after_warmup_mb - 1

    def failures(self) -> list[str]:
        """Every check the soak failed, in words; empty when it passed."""
        checks = [
            (not self.unexpected, f"{len(self.unexpected)} calls ended with a status they may not: {self.unexpected[:5]}"),
            (not {"INTERNAL", "UNKNOWN"} & set(self.server_statuses), f"the server counted {self.server_statuses}"),
            (self.num_running == 0 and self.num_waiting == 0, f"{self.num_running} running, {self.num_waiting} waiting"),
            (self.kv_blocks_used == 0, f"{self.kv_blocks_used} KV blocks still in use"),
            (self.slot_pins == 0 and self.adapters_in_use == 0, f"{self.slot_pins} slot pins, {self.adapters_in_use} adapters in use"),
            (self.jobs_running == 0, f"{self.jobs_running} fine-tuning jobs still running"),
            (not self.loop_errors, f"the server's event loop reported {self.loop_errors[:5]}"),
            (abs(self.rss_growth) <= RSS_TOLERANCE, f"RSS {self.rss_after_warmup_mb:.0f} -> {self.rss_after_mb:.0f} MB ({self.rss_growth:+.1%})"),
            (self.greedy_unchanged, "the reference greedy output changed"),
        ]
        return [problem for ok, problem in checks if not ok]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def make_adapters(engine: AsyncEngine, root: Path, names: list[str], rank: int, seed: int) -> None:
    """PEFT adapters for the served model, random A and B (B small), rank `rank`, each on a
    different subset of the projections."""
    model = engine.engine.runner.model
    linears = group_linears(model)
    g = torch.Generator().manual_seed(seed)
    targets = list(TARGET_SLICES)
    for i, name in enumerate(names):
        chosen = targets[i % 3 :: 2] if i else targets  # the first adapts all seven
        tensors = {}
        for (layer, group), linear in linears.items():
            for target in chosen:
                target_group, index = TARGET_SLICES[target]
                if target_group != group:
                    continue
                key = f"base_model.model.{module_path(layer, target)}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank, linear.in_features, generator=g) / linear.in_features**0.5
                tensors[f"{key}.lora_B.weight"] = torch.randn(linear.out_slices[index], rank, generator=g) * 0.05
        write_adapter(root / name, peft_config(rank, 2.0 * rank, chosen, False, 0.0, engine.info.name), tensors)


def start_server(model: str | None, root: Path, settings: SoakSettings, dtype: str) -> tuple[AsyncEngine, ServerThread]:
    (root / "adapters").mkdir(parents=True, exist_ok=True)
    config = EngineConfig(
        model=model, dtype=dtype, kv_cache_bytes=256 << 20, adapters_dir=str(root / "adapters"),
        data_dir=str(root / "data") if settings.finetune else None, max_lora_rank=max(16, settings.rank), max_loras=4,
    )
    engine = AsyncEngine(config)
    engine.start()
    server = ServerThread(ServerConfig(host="127.0.0.1", port=0, metrics_port=0, http_port=0, log_format="text"), engine)
    return engine, server


class Load:
    """The mixed load on one server: worker threads, the adapter churn and the fine-tuning
    jobs, each thread counting its own calls (merged once all have stopped)."""

    def __init__(self, server: ServerThread, adapters: list[str], settings: SoakSettings):
        self.server = server
        self.channel = grpc.insecure_channel(server.target)
        self.generation = generation_pb2_grpc.GenerationServiceStub(self.channel)
        self.adapter_stub = adapters_pb2_grpc.AdaptersServiceStub(self.channel)
        self.finetuning = finetuning_pb2_grpc.FineTuningServiceStub(self.channel)
        self.settings = settings
        self.churned = list(adapters)  # the churn's: never the reference adapter
        self.served = ["", "", REFERENCE, *adapters]  # what requests name; "" (the base) twice as often
        self.vocab = self.generation.GetModelInfo(generation_pb2.GetModelInfoRequest()).vocab_size
        self.counts: Counter[tuple[str, str]] = Counter()
        self.tokens = 0
        self.unexpected: list[str] = []
        self.rss_samples: list[tuple[float, float]] = []  # (seconds into the run, MB)
        self._lock = threading.Lock()

    def run(self, seconds: float, seed: int) -> None:
        """Counts (and RSS samples) add to what earlier runs left; reset() clears them."""
        until = time.monotonic() + seconds
        jobs = [(self._worker, until, seed * 1000 + i) for i in range(self.settings.workers)]
        jobs += [(self._churn, until, seed * 1000 + 999), (self._sample_rss, until)]
        if self.settings.finetune:
            jobs.append((self._finetune, until))
        threads = [threading.Thread(target=self._guarded, args=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def reset(self) -> None:
        self.counts.clear()
        self.tokens = 0
        self.unexpected.clear()
        self.rss_samples.clear()

    def greedy(self) -> list[list[int]]:
        """Greedy tokens of the base model and of the reference adapter on every prompt."""
        return [
            list(self.generation.Generate(
                generation_pb2.GenerateRequest(prompt=p, adapter=a, max_new_tokens=16, ignore_eos=True), timeout=CALL_TIMEOUT
            ).token_ids)
            for a in ("", REFERENCE)
            for p in PROMPTS
        ]

    def _guarded(self, target, *args) -> None:
        """Runs a load thread; a thread that dies is a failure, not a quietly smaller load."""
        try:
            target(*args)
        except BaseException as exc:
            with self._lock:
                self.unexpected.append(f"{target.__name__} died: {type(exc).__name__}: {exc}")

    def _record(self, counts: Counter, kind: str, status: str, detail: str = "") -> None:
        counts[(kind, status)] += 1
        if status not in ALLOWED[kind]:
            with self._lock:
                self.unexpected.append(f"{kind}: {status} {detail[:200]}")

    def _merge(self, counts: Counter, tokens: int) -> None:
        with self._lock:
            self.counts.update(counts)
            self.tokens += tokens

    # The workers.

    def _worker(self, until: float, seed: int) -> None:
        rng = random.Random(seed)
        counts: Counter[tuple[str, str]] = Counter()
        tokens = 0
        kinds = ["generate", "stream", "cancel", "deadline", "slow_reader", "bad_input", "tokenize", "list"]
        weights = [6, 6, 3, 2, 1, 2, 1, 1]
        while time.monotonic() < until:
            kind = rng.choices(kinds, weights)[0]
            status, generated, detail = getattr(self, f"_{kind}")(rng)
            tokens += generated
            self._record(counts, kind, status, detail)
        self._merge(counts, tokens)

    def _request(self, rng: random.Random, max_new_tokens: int | None = None, **fields) -> generation_pb2.GenerateRequest:
        """A request a careful caller sends: a prompt of any of the three kinds, any served
        adapter, greedy or sampled."""
        request = generation_pb2.GenerateRequest(
            adapter=rng.choice(self.served),
            max_new_tokens=max_new_tokens or rng.randint(1, self.settings.max_new_tokens),
            temperature=rng.choice([0.0, 0.0, 0.7, 1.0]),
            **fields,
        )
        shape = rng.random()
        if shape < 0.6:
            request.prompt = rng.choice(PROMPTS)
        elif shape < 0.8:
            request.messages.append(generation_pb2.Message(role="user", content=rng.choice(PROMPTS)))
        else:
            request.prompt_token_ids.extend(rng.randrange(self.vocab) for _ in range(rng.randint(1, 64)))
        if rng.random() < 0.3:
            request.top_p, request.seed = 0.9, rng.randrange(2**32)
        return request

    def _generate(self, rng: random.Random) -> tuple[str, int, str]:
        try:
            response = self.generation.Generate(self._request(rng), timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            return exc.code().name, 0, exc.details() or ""
        return "OK", len(response.token_ids), ""

    def _stream(self, rng: random.Random) -> tuple[str, int, str]:
        generated = 0
        try:
            for chunk in self.generation.GenerateStream(self._request(rng), timeout=CALL_TIMEOUT):
                generated += len(chunk.token_ids)
        except grpc.RpcError as exc:
            return exc.code().name, generated, exc.details() or ""
        return "OK", generated, ""

    def _cancel(self, rng: random.Random) -> tuple[str, int, str]:
        """A stream the caller leaves after a few messages."""
        call = self.generation.GenerateStream(self._request(rng, 4 * self.settings.max_new_tokens, ignore_eos=True), timeout=CALL_TIMEOUT)
        generated, leave_after = 0, rng.randint(1, 5)
        try:
            for i, chunk in enumerate(call, start=1):
                generated += len(chunk.token_ids)
                if i == leave_after:
                    call.cancel()
        except grpc.RpcError as exc:
            return exc.code().name, generated, exc.details() or ""
        return "OK", generated, ""

    def _deadline(self, rng: random.Random) -> tuple[str, int, str]:
        """Unary or streamed, with a deadline far shorter than the generation needs."""
        request = self._request(rng, 4 * self.settings.max_new_tokens, ignore_eos=True)
        timeout = rng.uniform(0.02, 0.5)
        generated = 0
        try:
            if rng.random() < 0.5:
                generated = len(self.generation.Generate(request, timeout=timeout).token_ids)
            else:
                for chunk in self.generation.GenerateStream(request, timeout=timeout):
                    generated += len(chunk.token_ids)
        except grpc.RpcError as exc:
            return exc.code().name, generated, exc.details() or ""
        return "OK", generated, ""

    def _slow_reader(self, rng: random.Random) -> tuple[str, int, str]:
        """Reads one message, stops reading for seconds, then reads on or leaves."""
        call = self.generation.GenerateStream(self._request(rng, 4 * self.settings.max_new_tokens, ignore_eos=True), timeout=CALL_TIMEOUT)
        generated = 0
        try:
            generated += len(next(call, generation_pb2.GenerateStreamResponse()).token_ids)
            time.sleep(rng.uniform(0.5, 3.0))
            if rng.random() < 0.5:
                call.cancel()
            for chunk in call:
                generated += len(chunk.token_ids)
        except grpc.RpcError as exc:
            return exc.code().name, generated, exc.details() or ""
        return "OK", generated, ""

    def _bad_input(self, rng: random.Random) -> tuple[str, int, str]:
        bad = rng.choice([
            generation_pb2.GenerateRequest(),
            generation_pb2.GenerateRequest(prompt="x", messages=[generation_pb2.Message(role="user", content="x")]),
            generation_pb2.GenerateRequest(prompt="x", temperature=-1.0),
            generation_pb2.GenerateRequest(prompt="x", top_p=2.0),
            generation_pb2.GenerateRequest(prompt="x", stop=["s"] * 100),
            generation_pb2.GenerateRequest(prompt="x", stop_token_ids=[self.vocab]),
            generation_pb2.GenerateRequest(prompt_token_ids=[self.vocab + 1]),
            generation_pb2.GenerateRequest(prompt="x", max_new_tokens=2**31),
            generation_pb2.GenerateRequest(prompt="x", adapter="no-such-adapter"),
            generation_pb2.GenerateRequest(prompt="x", adapter="../etc"),
            generation_pb2.GenerateRequest(prompt="x" * 1_000_000),
            NOT_PROTOBUF,
        ])
        try:
            if isinstance(bad, bytes):
                self.channel.unary_unary("/tandem.v1.GenerationService/Generate")(bad, timeout=CALL_TIMEOUT)
            elif rng.random() < 0.5:
                self.generation.Generate(bad, timeout=CALL_TIMEOUT)
            else:
                list(self.generation.GenerateStream(bad, timeout=CALL_TIMEOUT))
        except grpc.RpcError as exc:
            return exc.code().name, 0, exc.details() or ""
        return "OK", 0, f"accepted {bad!r:.100}"

    def _tokenize(self, rng: random.Random) -> tuple[str, int, str]:
        try:
            self.generation.Tokenize(generation_pb2.TokenizeRequest(text=rng.choice(PROMPTS)), timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            return exc.code().name, 0, exc.details() or ""
        return "OK", 0, ""

    def _list(self, rng: random.Random) -> tuple[str, int, str]:
        try:
            self.adapter_stub.ListAdapters(adapters_pb2.ListAdaptersRequest(), timeout=CALL_TIMEOUT)
            self.generation.GetModelInfo(generation_pb2.GetModelInfoRequest(), timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            return exc.code().name, 0, exc.details() or ""
        return "OK", 0, ""

    # The adapter churn, the fine-tuning jobs, the RSS.

    def _churn(self, until: float, seed: int) -> None:
        """Loads (a reload re-reads the files), and unloads, adapters requests are using."""
        rng = random.Random(seed)
        counts: Counter[tuple[str, str]] = Counter()
        while time.monotonic() < until:
            name = rng.choice(self.churned)
            kind = "unload" if rng.random() < 0.4 else "load"
            try:
                if kind == "load":
                    self.adapter_stub.LoadAdapter(adapters_pb2.LoadAdapterRequest(name=name), timeout=CALL_TIMEOUT)
                else:
                    self.adapter_stub.UnloadAdapter(adapters_pb2.UnloadAdapterRequest(name=name), timeout=CALL_TIMEOUT)
                self._record(counts, kind, "OK")
            except grpc.RpcError as exc:
                self._record(counts, kind, exc.code().name, exc.details() or "")
            time.sleep(rng.uniform(0.1, 0.5))
        for name in self.churned:  # the next phase starts with every adapter loaded
            self.adapter_stub.LoadAdapter(adapters_pb2.LoadAdapterRequest(name=name), timeout=CALL_TIMEOUT)
        self._merge(counts, 0)

    def _finetune(self, until: float) -> None:
        """Small jobs, one every few seconds, each a new version of adapter "tuned", which
        requests use once it is published; the job still running at the end is cancelled."""
        counts: Counter[tuple[str, str]] = Counter()
        request = finetuning_pb2.CreateJobRequest(
            adapter="tuned", training_data=DATASET,
            lora=finetuning_pb2.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
            hyperparameters=finetuning_pb2.Hyperparameters(max_steps=4, tokens_per_step=128, learning_rate=1e-3),
        )
        while time.monotonic() < until:
            job = self.finetuning.CreateJob(request, timeout=CALL_TIMEOUT).job
            watch = self.finetuning.WatchJob(finetuning_pb2.WatchJobRequest(id=job.id), timeout=CALL_TIMEOUT * 10)
            timer = threading.Timer(max(0.0, until - time.monotonic()), self._cancel_job, args=(job.id,))
            timer.start()
            for event in watch:
                job = event.job
            timer.cancel()
            status = finetuning_pb2.JobStatus.Name(job.status).removeprefix("JOB_STATUS_")
            self._record(counts, "finetune", status, job.error.message)
            if status == "SUCCEEDED" and "tuned" not in self.served:
                self.served.append("tuned")
            time.sleep(max(0.0, min(FINETUNE_PAUSE_SECONDS, until - time.monotonic())))
        self._merge(counts, 0)

    def _sample_rss(self, until: float) -> None:
        started = time.monotonic()
        while time.monotonic() < until:
            self.rss_samples.append((round(time.monotonic() - started, 1), round(rss_mb(), 1)))
            time.sleep(RSS_SAMPLE_SECONDS)

    def _cancel_job(self, job_id: str) -> None:
        try:
            self.finetuning.CancelJob(finetuning_pb2.CancelJobRequest(id=job_id), timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            if exc.code() != Code.FAILED_PRECONDITION:  # it ended just before
                raise


def wait_idle(engine: AsyncEngine, timeout: float = IDLE_TIMEOUT) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        stats = engine.stats()
        if stats.num_running == stats.num_waiting == 0 and stats.num_free_blocks == stats.num_total_blocks:
            return
        time.sleep(0.05)


def memory_in_use_mb() -> float:
    """RSS once garbage is collected and the C allocator has handed its free pages back
    (malloc_trim): memory in use, not what the allocator keeps for later, which swings by
    more than 5% with whatever ran last (a training step, a burst)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_mb()


def settled_rss(engine: AsyncEngine) -> float:
    wait_idle(engine)
    return memory_in_use_mb()


def server_statuses(server: ServerThread) -> dict[str, int]:
    """The server's count of calls per final status (its tandem:requests metric)."""
    counts: Counter[str] = Counter()
    for metric in server.server.metrics.registry.collect():
        if metric.name == "tandem:requests":
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    counts[sample.labels["status"]] += int(sample.value)
    return dict(counts)


def run_soak(settings: SoakSettings, model: str | None, workdir: Path, dtype: str = "auto") -> SoakReport:
    """Starts a server on `model` (None: the embedded SmolLM2) with adapters and data under
    workdir, warms it up with the same load, soaks it, checks it and stops it."""
    engine, server = start_server(model, workdir, settings, dtype)
    loop_errors: list[str] = []
    server.loop.call_soon_threadsafe(server.loop.set_exception_handler, lambda loop, ctx: loop_errors.append(ctx["message"]))
    names = [f"soak-{i}" for i in range(settings.adapters)]
    make_adapters(engine, workdir / "adapters", [REFERENCE, *names], settings.rank, settings.seed)
    load = Load(server, names, settings)
    try:
        reference = load.greedy()
        load.run(settings.warmup_seconds, settings.seed)
        warm = settled_rss(engine)
        load.reset()
        started = time.monotonic()
        load.run(settings.seconds, settings.seed + 1)
        seconds = time.monotonic() - started
        after = settled_rss(engine)
        stats = engine.stats()
        requests: dict[str, dict[str, int]] = {}
        for (kind, status), count in sorted(load.counts.items()):
            requests.setdefault(kind, {})[status] = count
        listed = load.adapter_stub.ListAdapters(adapters_pb2.ListAdaptersRequest(), timeout=CALL_TIMEOUT).adapters
        jobs = load.finetuning.ListJobs(finetuning_pb2.ListJobsRequest(), timeout=CALL_TIMEOUT).jobs if settings.finetune else []
        return SoakReport(
            settings=settings,
            dtype=engine.info.dtype,
            seconds=seconds,
            requests=requests,
            server_statuses=server_statuses(server),
            generated_tokens=load.tokens,
            unexpected=load.unexpected,
            rss_after_warmup_mb=warm,
            rss_after_mb=after,
            rss_samples_mb=load.rss_samples,
            num_running=stats.num_running,
            num_waiting=stats.num_waiting,
            kv_blocks_used=stats.num_total_blocks - stats.num_free_blocks,
            # The slot pool keeps pins privately; a pin left behind would hold its slot forever.
            slot_pins=sum(engine.engine.registry.pool._pins),
            adapters_in_use=sum(a.in_use for a in listed),
            jobs_running=sum(j.status not in ENDED for j in jobs),
            loop_errors=loop_errors,
            greedy_unchanged=load.greedy() == reference,
        )
    finally:
        load.channel.close()
        server.stop()
        engine.shutdown()


def print_report(report: SoakReport) -> None:
    statuses = sorted({s for by_status in report.requests.values() for s in by_status})
    print(f"\n{'call':<12}" + "".join(f"{s:>20}" for s in statuses))
    for kind, by_status in report.requests.items():
        print(f"{kind:<12}" + "".join(f"{by_status.get(s, 0):>20}" for s in statuses))
    print(f"\n{report.dtype}: {report.total_requests} calls in {report.seconds:.0f} s ({report.total_requests / report.seconds:.1f}/s), "
          f"{report.generated_tokens} tokens generated ({report.generated_tokens / report.seconds:.1f}/s)")
    print(f"server-side statuses: {report.server_statuses}")
    print(f"RSS after warm-up {report.rss_after_warmup_mb:.0f} MB, after the soak {report.rss_after_mb:.0f} MB ({report.rss_growth:+.2%})")
    print(f"after: {report.num_running} running, {report.num_waiting} waiting, {report.kv_blocks_used} KV blocks used, "
          f"{report.slot_pins} slot pins, {report.adapters_in_use} adapters in use, {report.jobs_running} jobs running, "
          f"{len(report.loop_errors)} event-loop errors, greedy output {'unchanged' if report.greedy_unchanged else 'CHANGED'}")
    failures = report.failures()
    print("PASS" if not failures else "FAIL:\n  " + "\n  ".join(failures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--warmup-seconds", type=float, default=SoakSettings.warmup_seconds)
    parser.add_argument("--workers", type=int, default=SoakSettings.workers)
    parser.add_argument("--no-finetune", action="store_true")
    parser.add_argument("--model", help="a Hugging Face directory or .gguf file (default: the embedded SmolLM2)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    settings = SoakSettings(
        seconds=args.minutes * 60, warmup_seconds=args.warmup_seconds, workers=args.workers, finetune=not args.no_finetune, seed=args.seed,
    )
    with tempfile.TemporaryDirectory(prefix="tandem-soak-") as workdir:
        report = run_soak(settings, args.model, Path(workdir), args.dtype)
    print_report(report)
    result = {
        "machine": machine_info(),
        "model": args.model or "SmolLM2-135M-Instruct (embedded)",
        **asdict(report),
        "total_requests": report.total_requests,
        "requests_per_second": report.total_requests / report.seconds,
        "tokens_per_second": report.generated_tokens / report.seconds,
        "rss_growth": report.rss_growth,
        "failures": report.failures(),
    }
    write_result("soak_cpu" if args.dtype == "auto" else f"soak_cpu_{args.dtype}", result)
    sys.exit(1 if report.failures() else 0)


if __name__ == "__main__":
    main()
