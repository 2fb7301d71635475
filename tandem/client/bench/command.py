"""A `tandem bench` run, from parsed flags to the printed tables, the JSON and the plots."""

import argparse
import asyncio
import sys
from dataclasses import asdict
from pathlib import Path

import grpc
import numpy as np

from tandem.client.async_client import AsyncTandemClient
from tandem.client.bench.arrivals import LoadPoint, parse_concurrencies, parse_rates
from tandem.client.bench.cli import DEFAULT_METRICS_PORT, DEFAULT_NUM_REQUESTS, DEFAULT_ZIPF_ALPHA
from tandem.client.bench.popularity import POPULARITIES, build_popularity, check_popularity_flags
from tandem.client.bench.prompts import Prompt, random_prompts, sharegpt_prompts, synthetic_prompts
from tandem.client.bench.report import build_result, render, write_json
from tandem.client.bench.runner import BenchError, FinetuneLoad, LoadPlan, PointResult, run_sweep
from tandem.client.bench.stats import parse_slo
from tandem.client.bench.workload import BenchRequest, build_requests
from tandem.client.cli_connection import EXIT_RPC_BASE, connection_settings, rpc_failure
from tandem.client.connection import Deadline
from tandem.client.errors import TandemRpcError
from tandem.client.types import ModelInfo, SamplingOptions

# A point bounded only by time cycles through this many prepared requests.
DURATION_POOL = 1000
# Settings left out of the JSON: secrets, and argparse's own entries.
NOT_RECORDED = ("token", "token_file", "run", "command")
# How often a server not answering yet is asked again.
CONNECT_POLL_SECONDS = 0.25


def run_bench(args: argparse.Namespace) -> int:
    """Runs the sweep; the exit status follows the epilog of `tandem bench --help`. A bad
    command line is refused (exit 2) before anything connects."""
    try:
        plan = load_plan(args)
        _check_workload(args)
    except ValueError as error:
        print(f"tandem bench: error: {error}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_bench(args, plan))
    except TandemRpcError as error:
        return rpc_failure(error, "tandem bench")
    except BenchError as error:
        print(f"tandem bench: {error}", file=sys.stderr)
        return EXIT_RPC_BASE + error.code.value[0] if error.code is not None else 1
    except (OSError, ValueError) as error:
        print(f"tandem bench: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def load_plan(args: argparse.Namespace) -> LoadPlan:
    if args.concurrency is not None:
        points = [LoadPoint(concurrency=c) for c in parse_concurrencies(args.concurrency)]
    else:
        points = [LoadPoint(rate=r) for r in parse_rates(args.request_rate or "inf")]
    num_requests = args.num_requests if args.num_requests is not None or args.duration is not None else DEFAULT_NUM_REQUESTS
    return LoadPlan(points, num_requests, args.duration, args.burstiness, args.warmup_requests, args.timeout, parse_slo(args.slo))


def _check_workload(args: argparse.Namespace) -> None:
    """What the workload flags need of each other (the adapters' names may come from the server)."""
    if args.popularity not in POPULARITIES:
        raise ValueError(f"unknown --popularity {args.popularity!r}: choose one of {', '.join(POPULARITIES)}")
    if args.popularity == "weights" and not args.adapter_weights:
        raise ValueError("--popularity weights needs --adapter-weights FILE")
    check_popularity_flags(
        args.popularity, {"--adapters": args.adapters, "--num-adapters": args.num_adapters}, args.zipf_alpha, args.adapter_weights
    )
    if args.dataset == "sharegpt" and not args.dataset_path:
        raise ValueError("--dataset sharegpt needs --dataset-path FILE")


def metrics_url(args: argparse.Namespace) -> str | None:
    """--metrics-url, else the target's host (localhost for a unix socket) at the default port."""
    if args.metrics_url is not None:
        return None if args.metrics_url == "none" else args.metrics_url
    target = args.target
    if target.startswith("unix:"):
        return f"http://localhost:{DEFAULT_METRICS_PORT}/metrics"
    for scheme in ("dns:///", "ipv4:", "ipv6:"):
        target = target.removeprefix(scheme)
    host = target.rsplit(":", 1)[0] if target.count(":") == 1 or target.startswith("[") else target
    return f"http://{host or 'localhost'}:{DEFAULT_METRICS_PORT}/metrics"


async def _connect(client: AsyncTandemClient, args: argparse.Namespace) -> ModelInfo:
    """The server's first answer, asked again while it is UNAVAILABLE (not listening yet, or
    loading its model) until --connect-timeout; else an error that says where and how long
    we tried. (The bench's client never retries: a measured request that fails counts.)"""
    deadline = Deadline(args.connect_timeout)
    while True:
        try:
            return await client.model_info(timeout=deadline.remaining())
        except TandemRpcError as error:
            left = deadline.remaining()  # None: --connect-timeout inf, no deadline
            if error.code != grpc.StatusCode.UNAVAILABLE or (left is not None and left <= CONNECT_POLL_SECONDS):
                message = f"cannot reach the server at {args.target} within {args.connect_timeout:g} s: {error.message}"
                raise TandemRpcError(error.code, message) from None
        await asyncio.sleep(CONNECT_POLL_SECONDS)


async def _prompts(args: argparse.Namespace, client: AsyncTandemClient, info: ModelInfo, count: int,
                   rng: np.random.Generator) -> list[Prompt]:
    if args.dataset == "random":
        return random_prompts(count, args.random_input_len, args.random_output_len, info.vocab_size, rng, args.random_range_ratio)
    if args.dataset == "sharegpt":
        return await sharegpt_prompts(args.dataset_path, count, rng, client.tokenize, info.max_model_len, args.output_len)
    return synthetic_prompts()


async def _requests(args: argparse.Namespace, client: AsyncTandemClient, info: ModelInfo, count: int) -> list[BenchRequest]:
    rng = np.random.default_rng(args.seed)
    prompts = await _prompts(args, client, info, count, rng)
    names = [n.strip() for n in args.adapters.split(",") if n.strip()] if args.adapters else []
    if not names and args.popularity in ("uniform", "zipf"):
        names = [a.name for a in await client.list_adapters()]
    alpha = DEFAULT_ZIPF_ALPHA if args.zipf_alpha is None else args.zipf_alpha
    popularity = build_popularity(args.popularity, names, args.num_adapters, alpha, args.adapter_weights)
    fixed_len = args.output_len if args.output_len is not None else None
    ignore_eos = args.ignore_eos if args.ignore_eos is not None else (fixed_len is not None or args.dataset == "random")
    sampling: SamplingOptions = {}
    for key, value in (("temperature", args.temperature), ("top_p", args.top_p), ("top_k", args.top_k), ("seed", args.sampling_seed)):
        if value is not None:
            sampling[key] = value  # type: ignore[literal-required]
    return build_requests(prompts, popularity, count, rng, fixed_len, ignore_eos, sampling)


def _finetune(args: argparse.Namespace) -> FinetuneLoad | None:
    if not args.finetune_data:
        return None
    steps = {"max_steps": args.finetune_max_steps} if args.finetune_max_steps else {}
    return FinetuneLoad(args.finetune_adapter, Path(args.finetune_data).read_text(encoding="utf-8"), steps)  # type: ignore[arg-type]


def _settings(args: argparse.Namespace) -> dict:
    return {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items() if key not in NOT_RECORDED}


async def _bench(args: argparse.Namespace, plan: LoadPlan) -> int:
    async with AsyncTandemClient(args.target, **connection_settings(args) | {"max_retries": 0}) as client:
        info = await _connect(client, args)
        requests = await _requests(args, client, info, plan.num_requests or DURATION_POOL)
        results = await run_sweep(client, requests, plan, args.seed, metrics_url(args), _finetune(args), not args.no_progress)
    result = build_result(_settings(args), asdict(info), results, args.save_requests)
    print(render(result))
    if args.json is not None:
        write_json(result, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
        if not args.no_plots:
            _plot(result, results, args.json)
    return 0


def _plot(result: dict, results: list[PointResult], json_path: Path) -> None:
    try:
        from tandem.client.bench.plots import write_plots
    except ImportError:
        print("tandem bench: plots need matplotlib (pip install 'tandem[bench]'); wrote the JSON only", file=sys.stderr)
        return
    for path in write_plots(result, results, json_path):
        print(f"wrote {path}", file=sys.stderr)
