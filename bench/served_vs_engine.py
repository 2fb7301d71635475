"""The served path against the engine driven in-process, on the same work, in one run.

32 concurrent requests (prompt 32 token ids, 64 generated tokens, greedy, ignore_eos) on the
default model (SmolLM2-135M-Instruct) with the server's default configuration:
- engine: `Engine.from_config(EngineConfig())` in this process, stepped until done (what the
  engine can do, no server around it);
- served: the same work through `tandem serve` (a child process, same configuration) over
  gRPC, streaming, from Tandem's asyncio client in this process.
Rounds alternate (after a warm-up of each), so that the machine's noise falls on both. Each
side reports its median tokens/s and its spread (max/min over its rounds), and the CPU
seconds its rounds took: the engine's (this process), the server's and the client's (served
rounds), so that what the client costs on a machine it shares with the server is seen. Goals (issue 10):
served >= 0.95x in-process, with a spread no wider than the in-process engine's.

    .venv/bin/python bench/served_vs_engine.py            # 6 rounds each
    .venv/bin/python bench/served_vs_engine.py --quick    # 8 concurrent x 16 tokens, 2 rounds (smoke)
"""

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import serve_process  # noqa: E402
from bench.report import cpu_kind, machine_info, write_result  # noqa: E402
from tandem.client import AsyncTandemClient  # noqa: E402
from tandem.server.config import EngineConfig  # noqa: E402
from tandem.server.engine.llm_engine import Engine  # noqa: E402
from tandem.server.engine.sampling_params import SamplingParams  # noqa: E402
from tandem.server.heap import frozen_heap  # noqa: E402

GOALS = {"served_over_engine": 0.95}
PROMPT_TOKENS = 32


def prompts(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(PROMPT_TOKENS)] for _ in range(count)]


def engine_round(engine: Engine, work: list[list[int]], tokens: int) -> float:
    """tokens/s of the engine stepping all of work to the end."""
    params = SamplingParams(temperature=0.0, max_new_tokens=tokens, ignore_eos=True)
    started = time.perf_counter()
    for i, p in enumerate(work):
        engine.add_request(f"r{i}", p, params)
    generated = 0
    while engine.has_work():
        generated += sum(len(o.token_ids) for o in engine.step())
    assert generated == len(work) * tokens
    return generated / (time.perf_counter() - started)


async def served_round(port: int, work: list[list[int]], tokens: int) -> float:
    """tokens/s of the same work streamed through the server, all requests at once."""
    async with AsyncTandemClient(f"127.0.0.1:{port}", timeout=600) as client:

        async def one(prompt: list[int]) -> int:
            received = 0
            async for chunk in client.stream(prompt_token_ids=prompt, max_new_tokens=tokens, ignore_eos=True):
                received += len(chunk.token_ids)
            return received

        started = time.perf_counter()
        generated = sum(await asyncio.gather(*(one(p) for p in work)))
        wall = time.perf_counter() - started
    assert generated == len(work) * tokens
    return generated / wall


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(fn, server_pid: int) -> dict:
    """fn()'s tokens/s with the CPU seconds this process and the server took meanwhile."""
    own, server = time.process_time(), process_cpu_s(server_pid)
    rate = fn()
    return {"tokens_per_s": rate, "cpu_s": time.process_time() - own, "server_cpu_s": process_cpu_s(server_pid) - server}


def summarize(rounds: list[dict]) -> dict:
    sides = {}
    for side in ("engine", "served"):
        mine = [r for r in rounds if r["side"] == side]
        rates = [r["tokens_per_s"] for r in mine]
        sides[side] = {
            "tokens_per_s": statistics.median(rates), "spread": max(rates) / min(rates),
            # engine: the in-process engine's; served: the client's (this process)
            "cpu_s": statistics.median(r["cpu_s"] for r in mine),
            "server_cpu_s": statistics.median(r["server_cpu_s"] for r in mine),
        }
    ratio = sides["served"]["tokens_per_s"] / sides["engine"]["tokens_per_s"]
    return {
        **sides,
        "served_over_engine": ratio,
        "goal_met": ratio >= GOALS["served_over_engine"] and sides["served"]["spread"] <= sides["engine"]["spread"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--quick", action="store_true", help="8 concurrent x 16 tokens, 2 rounds")
    args = ap.parse_args()
    if args.quick:
        args.concurrency, args.tokens, args.rounds = 8, 16, 2
    config = EngineConfig()
    engine = Engine.from_config(config)
    work = prompts(args.concurrency, engine.info.vocab_size)
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        process, listening = serve_process.start_server(Path(tmp), [])
        try:
            run = {"engine": lambda: engine_round(engine, work, args.tokens),
                   "served": lambda: asyncio.run(served_round(listening["port"], work, args.tokens))}
            for side in ("engine", "served"):  # warm-up: first-call paths and shapes on both
                run[side]()
            with frozen_heap():  # this process's loaded heap, as `tandem serve` freezes its own
                for i in range(args.rounds):
                    for side in ("engine", "served") if i % 2 == 0 else ("served", "engine"):
                        record = timed(run[side], process.pid)
                        rounds.append({"side": side, **record})
                        print(f"  round {i + 1} {side:6} {record['tokens_per_s']:7.1f} tokens/s, CPU s: this process "
                              f"{record['cpu_s']:.1f}, server {record['server_cpu_s']:.1f}", flush=True)
        finally:
            serve_process.stop_server(process)
    result = {
        "benchmark": "served_vs_engine",
        "machine": machine_info(),
        "workload": {"concurrency": args.concurrency, "prompt_tokens": PROMPT_TOKENS, "tokens": args.tokens,
                     "rounds": args.rounds, "dtype": engine.info.dtype},
        "goals": GOALS,
        "summary": summarize(rounds),
        "rounds": rounds,
    }
    s = result["summary"]
    print(f"\n{'side':7} {'tokens/s':>9} {'spread':>7} {'CPU s here':>11} {'server':>7}")
    for side in ("engine", "served"):
        print(f"{side:7} {s[side]['tokens_per_s']:9.1f} {s[side]['spread']:7.2f} {s[side]['cpu_s']:11.1f} {s[side]['server_cpu_s']:7.1f}")
    print(f"served / engine {s['served_over_engine']:.3f}: goal {'met' if s['goal_met'] else 'NOT met'}")
    write_result(f"served_vs_engine_cpu_{cpu_kind()}" + ("_quick" if args.quick else ""), result)


if __name__ == "__main__":
    main()
