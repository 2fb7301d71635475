"""Where a served LoRA step's extra time goes, measured in the engine: the CPU LoRA kernel
against two builds of the same source (native_cpu.library(floor)) whose calls do nothing
(floor 1: what the engine spends around the calls: Python, the step's batch, scheduling) or
only read the weights each item would (floor 2: the adapter bytes, moved where and when the
kernel moves them, with no arithmetic). So the kernel's ratio to the base splits into three
parts, each measured, and floor 2 is the best a kernel that reads its weights once could do
in this engine on this host; bench/lora_serving.py's floor is a bound from the copy
bandwidth instead.

The workload is bench/lora_serving.py's (paired_run: the adapter run and a baseline without
adapters, one step of each in turn), the three builds alternated round by round in one
process, as separate processes on a shared host drifted apart by more than the differences.
CPU only.

    .venv/bin/python bench/lora_floor.py [--rounds 3] [--cases 8:uniform 2048:zipf]
"""

import argparse
import random
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import lora_serving  # noqa: E402
from bench.report import cpu_kind, machine_info, write_result  # noqa: E402
from tandem.kernels.lora import native_cpu  # noqa: E402

BUILDS = {"kernel": 0, "calls_do_nothing": 1, "calls_only_read": 2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cases", nargs="+", default=["8:uniform", "2048:zipf"], help="adapters:uniform|zipf")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()
    torch.set_num_threads(2)
    libs = {name: native_cpu.library(floor) for name, floor in BUILDS.items()}
    if any(lib is None for lib in libs.values()):
        raise SystemExit("the C LoRA kernel cannot be built here (no compiler, or TANDEM_NATIVE_LORA=0)")
    if not (native_cpu.serves_bf16() if args.dtype == "bfloat16" else native_cpu.serves_float32()):
        # Every call would take the torch path: the three builds would run the same code.
        raise SystemExit(f"the C LoRA kernel serves no {args.dtype} call on this CPU: try --dtype float32 (AVX2) or an AVX-512 host")
    dtype = getattr(torch, args.dtype)
    loaded, hf, _ = lora_serving.load("smollm2", dtype, torch.device("cpu"))
    rng = random.Random(0)
    vocab = loaded.model.shape.vocab_size
    n_req = 96
    prompts = [[rng.randrange(100, vocab) for _ in range(lora_serving.PROMPT_LEN)] for _ in range(n_req)]
    cases = [(int(n), pop) for n, pop in (c.split(":") for c in args.cases)]
    runs: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="tandem-lora-floor-"))
    real_library = native_cpu.library
    try:
        lora_serving.make_adapters(hf, tmp, max(n for n, _ in cases))
        # One untimed run first: the first round's first build ran cold.
        lora_serving.paired_run(loaded, prompts, lora_serving.OUT_LEN, tmp / "adapters", lora_serving.draw(8, "uniform", n_req, seed=1), lora_serving.adapter_name)
        for rnd in range(args.rounds):
            for n, pop in cases:
                choice = lora_serving.draw(n, pop, n_req, seed=1000 + n + (0 if pop == "uniform" else 1))
                order = list(BUILDS) if rnd % 2 == 0 else list(reversed(BUILDS))  # neither build always goes first
                for build in order:
                    native_cpu.library = lambda floor=0, lib=libs[build]: lib
                    try:
                        ours, base = lora_serving.paired_run(
                            loaded, prompts, lora_serving.OUT_LEN, tmp / "adapters", choice, lora_serving.adapter_name
                        )
                    finally:
                        native_cpu.library = real_library
                    run = {
                        "round": rnd, "adapters": n, "popularity": pop, "build": build,
                        "ratio": ours["tok_s"] / base["tok_s"],
                        "ratio_without_reads": ours["tok_s_without_reads"] / base["tok_s"],
                        "decode_step_ms": ours["decode_step_ms"], "baseline_decode_step_ms": base["decode_step_ms"],
                    }
                    runs.append(run)
                    print(f"round {rnd} {n:5d} {pop:7s} {build:17s} {run['ratio']:.3f}x base "
                          f"({run['ratio_without_reads']:.3f}x without reads; decode step {run['decode_step_ms']:.1f} ms, "
                          f"the baseline's {run['baseline_decode_step_ms']:.1f})", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = []
    print(f"\n{'adapters':>8} {'pop':7} " + " ".join(f"{b:>17}" for b in BUILDS) + "  (mean ratio to base, without reads)")
    for n, pop in cases:
        row = {"adapters": n, "popularity": pop}
        for build in BUILDS:
            mine = [r for r in runs if (r["adapters"], r["popularity"], r["build"]) == (n, pop, build)]
            row[build] = statistics.mean(r["ratio_without_reads"] for r in mine)
            row[build + "_with_reads"] = statistics.mean(r["ratio"] for r in mine)
        # Extra step time over the base's, in base steps: 1/ratio - 1, split three ways.
        extra = {b: 1 / row[b] - 1 for b in BUILDS}
        row["share_around_calls"] = extra["calls_do_nothing"] / extra["kernel"]
        row["share_reading_weights"] = (extra["calls_only_read"] - extra["calls_do_nothing"]) / extra["kernel"]
        row["share_beyond_reading"] = (extra["kernel"] - extra["calls_only_read"]) / extra["kernel"]
        summary.append(row)
        print(f"{n:8d} {pop:7} " + " ".join(f"{row[b]:17.3f}" for b in BUILDS)
              + f"  extra time: {100 * row['share_around_calls']:.0f}% around the calls, "
              f"{100 * row['share_reading_weights']:.0f}% reading weights, {100 * row['share_beyond_reading']:.0f}% beyond")
    write_result(f"lora_floor_cpu_{cpu_kind()}_{args.dtype}", {
        "machine": machine_info(), "benchmark": "lora_floor", "dtype": args.dtype, "rounds": args.rounds,
        "workload": "bench/lora_serving.py's paired_run (32 in flight, 96 requests, 32-token prompts, 64 tokens)",
        "builds": {b: f"native_cpu.library({f})" for b, f in BUILDS.items()},
        "summary": summary, "runs": runs,
    })


if __name__ == "__main__":
    main()
