"""`tandem bench`'s flags. The run itself (command.py) needs numpy and prometheus-client,
the `bench` extra, so it is imported only when `tandem bench` runs: the other client
commands keep working on the base install, and none of it imports torch."""

import argparse
import sys
from pathlib import Path

from tandem.client.cli_connection import AddFlag, add_connection_flags
from tandem.client.flag_types import count, positive_int, positive_seconds, ranged, uint32, uint64

DEFAULT_NUM_REQUESTS = 100
DEFAULT_METRICS_PORT = 9090
DEFAULT_ZIPF_ALPHA = 1.0

EPILOG = """examples:
  tandem bench --request-rate 1,2,4,inf --num-requests 100 --slo ttft=0.5,tpot=0.05 --json out/sweep.json
  tandem bench --concurrency 1,8,32 --duration 60 --popularity zipf --zipf-alpha 1.0 --adapters a,b,c,d
  tandem bench --dataset random --random-input-len 256 --random-output-len 128 --request-rate 4

exit status: 0 the run completed (failed requests are counted in the report, not fatal);
1 a local failure; 2 bad command line; 10+N the server could not be reached or every
warm-up request failed, with gRPC status code N (e.g. 24 UNAVAILABLE)."""


def add_command(commands: argparse._SubParsersAction, add_flag: AddFlag) -> None:
    parser = commands.add_parser(
        "bench", help="load-test a server: TTFT, ITL, TPOT, E2E, goodput, per adapter",
        description="Stream requests at a server under a chosen load and report latency, throughput and "
                    "goodput beside the server's own metrics.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_connection_flags(parser, add_flag, timeout_help="seconds each request may take (its gRPC deadline)")
    parser.add_argument("--connect-timeout", type=positive_seconds, default=10.0, help="seconds to wait for the server's first answer")
    load = parser.add_argument_group("load (each rate or concurrency is one point of the sweep)")
    arrival = load.add_mutually_exclusive_group()
    arrival.add_argument("--request-rate", default=None,
                         help="open loop: requests/s, comma-separated for a sweep; inf = all at once (default inf)")
    arrival.add_argument("--concurrency", default=None, help="closed loop: requests in flight, comma-separated for a sweep")
    load.add_argument("--burstiness", type=ranged(float, 0, strict=True), default=1.0, help="gamma shape of the arrival gaps: 1 = Poisson, < 1 burstier")
    load.add_argument("--num-requests", type=positive_int, help=f"requests per point (default {DEFAULT_NUM_REQUESTS} unless --duration)")
    load.add_argument("--duration", type=positive_seconds,
                      help="seconds of sending per point (with --num-requests: whichever ends first; inf only with --num-requests)")
    load.add_argument("--warmup-requests", type=count, default=2, help="unmeasured requests sent before the sweep")
    load.add_argument("--seed", type=int, default=0, help="seeds arrivals, prompt order and adapter choice")
    workload = parser.add_argument_group("workload")
    workload.add_argument("--dataset", choices=("synthetic", "sharegpt", "random"), default="synthetic",
                          help="synthetic: the chat prompts shipped with Tandem; sharegpt: --dataset-path; random: token ids")
    workload.add_argument("--dataset-path", help="a ShareGPT-format JSON file")
    workload.add_argument("--random-input-len", type=positive_int, default=128)
    workload.add_argument("--random-output-len", type=positive_int, default=64)
    workload.add_argument("--random-range-ratio", type=ranged(float, 0, high=1), default=0.0, help="lengths uniform in len * (1 +- ratio)")
    workload.add_argument("--output-len", type=positive_int, help="max_new_tokens of every request (default: the dataset's lengths)")
    workload.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=None,
                          help="generate the full length past end-of-sequence (default: on with --output-len or random prompts)")
    workload.add_argument("--popularity", default="none",
                          help="which adapter each request names: none (the base model), uniform, zipf or weights")
    workload.add_argument("--adapters", help="with --popularity uniform or zipf: adapter names in popularity order, "
                                             "comma-separated (default: the server's list)")
    workload.add_argument("--num-adapters", type=positive_int, help="with --popularity uniform or zipf: use the first N names")
    workload.add_argument("--zipf-alpha", type=ranged(float, 0),
                          help=f"with --popularity zipf: rank i has weight 1/i^alpha (default {DEFAULT_ZIPF_ALPHA:g})")
    workload.add_argument("--adapter-weights", help='JSON file {"adapter": weight, ...} for --popularity weights')
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--temperature", type=float, help="0 (server default) = greedy")
    sampling.add_argument("--top-p", type=float)
    sampling.add_argument("--top-k", type=uint32)
    sampling.add_argument("--sampling-seed", type=uint64, help="seed sent with every request")
    finetune = parser.add_argument_group("fine-tuning while serving")
    finetune.add_argument("--finetune-data", help="local JSONL file: start a fine-tuning job on it after the warm-up")
    finetune.add_argument("--finetune-adapter", default="bench-finetune", help="name the job publishes")
    finetune.add_argument("--finetune-max-steps", type=positive_int, help="the job's max_steps")
    report = parser.add_argument_group("report")
    report.add_argument("--slo", default="", help="goodput SLOs in seconds, e.g. ttft=0.5,tpot=0.05 (keys ttft, tpot, e2e)")
    report.add_argument("--metrics-url", help=f"server's Prometheus endpoint; none = skip (default http://HOST:{DEFAULT_METRICS_PORT}/metrics)")
    report.add_argument("--json", type=Path, help="write the result here, with <stem>_sweep.png and <stem>_cdf.png beside it")
    report.add_argument("--no-plots", action="store_true", help="with --json, skip the PNGs")
    report.add_argument("--save-requests", action="store_true", help="with --json, include every request's measurements")
    report.add_argument("--no-progress", action="store_true", help="no live progress line")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        from tandem.client.bench.command import run_bench
    except ImportError as error:
        print(f"tandem bench: needs the bench extra (pip install 'tandem[bench]'): {error}", file=sys.stderr)
        return 1
    return run_bench(args)
