"""The served path against the engine driven in-process, on the same work, in one run.

32 concurrent requests (prompt 32 token ids, 64 generated tokens, greedy, ignore_eos) on the
default model (SmolLM2-135M-Instruct) with the server's default configuration:
- engine: `Engine.from_config(EngineConfig())` in this process, stepped until done (what the
  engine can do, no server around it);
- served: the same work through `tandem serve` (a child process, same configuration) over
  gRPC, streaming, from Tandem's asyncio client in this process;
- served_interval_K: the same through a second server started with `--stream-interval K`
  (a message every K tokens instead of every token), which shows what the per-message cost
  of streaming is.
- split_engine: the same through the engine in a process of its own behind the least gRPC
  front there can be (bench/split_engine.py): what vLLM v1's split of the engine from the
  API server's interpreter could reach here, the GIL no longer shared (its "server" CPU is
  its front's; the engine process's is not counted);
- bare_grpc: the same number of streamed messages from a gRPC server with no model behind it
  (bench/bare_grpc.py) to a bare stub: the transport's own CPU per message, server and client.
  With the engine's CPU per round that gives the ceiling of the served ratio on this host,
  engine CPU / (engine CPU + transport CPU): the 2 cores the engine fills must also run the
  transport, whatever the server does around it. The bare server sends a message to each
  stream per tick, the tick the engine's step (from its warm-up rounds);
- engine_beside_transport: the engine in-process again, while that bare server streams to a
  bare reader (two processes, 32 streams at the engine's pace) beside it: what sharing the
  cores with the transport costs the engine (an OpenMP worker preempted mid-region stalls its
  team) with no server code at all, measured rather than computed. Not a floor: its rounds
  are as noisy as the served ones (on a 2-core Zen 4 they fell into two modes 14% apart).
Rounds alternate (after a warm-up of each), so that the machine's noise falls on all. Each
side reports its median tokens/s and its spread (max/min over its rounds), and the CPU
seconds its rounds took: the engine's (this process), the server's, of it its event loop's
(the main thread, where every streamed message is built and handed to gRPC while holding
the GIL the engine thread needs between its torch ops), and the client's (served rounds),
so that what the client costs on a machine it shares with the server is seen. Goals
(issue 10): served (the default, every token) >= 0.95x in-process, with a spread no wider
than the in-process engine's.

    .venv/bin/python bench/served_vs_engine.py            # 6 rounds each, --stream-interval 4 beside the default
    .venv/bin/python bench/served_vs_engine.py --quick    # 8 concurrent x 16 tokens, 2 rounds (smoke)
"""

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import bare_grpc, serve_process, split_engine  # noqa: E402
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


def bare_round(port: int, work: list[list[int]], tokens: int) -> float:
    """Messages/s of bare gRPC streams, one per request of work, each of `tokens` messages."""
    started = time.perf_counter()
    messages = asyncio.run(bare_grpc.read_streams(port, len(work), tokens))
    assert messages == len(work) * tokens
    return messages / (time.perf_counter() - started)


def engine_beside_round(engine: Engine, work: list[list[int]], tokens: int, bare_port: int) -> tuple[float, dict]:
    """engine_round's tokens/s while a bare reader streams len(work) streams from the bare
    server at bare_port, and the reader's CPU seconds meanwhile."""
    command = [sys.executable, bare_grpc.__file__, "--read", str(bare_port), "--streams", str(len(work))]
    reader = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "reading", "the bare reader did not start"
        stat = Path(f"/proc/{reader.pid}/stat")
        before = cpu_s(stat)
        rate = engine_round(engine, work, tokens)
        return rate, {"reader_cpu_s": cpu_s(stat) - before}
    finally:
        reader.kill()
        reader.wait()


def start_script(root: Path, script: Path, timeout_s: float, *args: str) -> tuple[subprocess.Popen, int]:
    """`python script PORT_FILE args` (bare_grpc.py, split_engine.py) started, and its port."""
    port_file = root / f"{script.stem}.port"
    process = subprocess.Popen([sys.executable, str(script), str(port_file), *args])
    deadline = time.monotonic() + timeout_s
    while not port_file.exists() or not port_file.read_text():
        assert process.poll() is None and time.monotonic() < deadline, f"{script.name} did not start"
        time.sleep(0.1)
    return process, int(port_file.read_text())


def cpu_s(stat: Path) -> float:
    """CPU seconds (user + system) from a /proc stat file: a process's (all threads) or a thread's."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(fn, server_pid: int | None) -> dict:
    """fn()'s tokens/s with the CPU seconds this process, the server and the server's event
    loop (its main thread) took meanwhile (server_pid None: no server)."""
    stats = {} if server_pid is None else {
        "server_cpu_s": Path(f"/proc/{server_pid}/stat"), "server_loop_cpu_s": Path(f"/proc/{server_pid}/task/{server_pid}/stat")}
    own, before = time.process_time(), {k: cpu_s(v) for k, v in stats.items()}
    rate, extra = fn(), {}
    if isinstance(rate, tuple):  # (tokens/s, more CPU seconds it measured itself)
        rate, extra = rate
    return {"tokens_per_s": rate, "cpu_s": time.process_time() - own, **{k: cpu_s(v) - before[k] for k, v in stats.items()}, **extra}


def summarize(rounds: list[dict]) -> dict:
    sides = {}
    for side in dict.fromkeys(r["side"] for r in rounds):
        mine = [r for r in rounds if r["side"] == side]
        rates = [r["tokens_per_s"] for r in mine]
        sides[side] = {
            "tokens_per_s": statistics.median(rates), "spread": max(rates) / min(rates),
            # engine: the in-process engine's; served: the client's (this process)
            "cpu_s": statistics.median(r["cpu_s"] for r in mine),
            **{k: statistics.median(r[k] for r in mine) for k in ("server_cpu_s", "server_loop_cpu_s", "reader_cpu_s") if k in mine[0]},
        }
    bare = sides.pop("bare_grpc", None)
    for side in sides:
        sides[side]["over_engine"] = sides[side]["tokens_per_s"] / sides["engine"]["tokens_per_s"]
    ratio = sides["served"]["over_engine"]
    ceiling = {}
    if bare is not None:
        engine_cpu, transport_cpu = sides["engine"]["cpu_s"], bare["cpu_s"] + bare["server_cpu_s"]
        ceiling = {"bare_grpc": bare | {"transport_cpu_s": transport_cpu},
                   "served_ceiling_over_engine": engine_cpu / (engine_cpu + transport_cpu)}
    if "engine_beside_transport" in sides:
        ceiling["served_over_engine_beside_transport"] = ratio / sides["engine_beside_transport"]["over_engine"]
    return {
        **sides,
        **ceiling,
        "served_over_engine": ratio,
        "goal_met": ratio >= GOALS["served_over_engine"] and sides["served"]["spread"] <= sides["engine"]["spread"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--stream-interval", type=int, default=4, help="a second server's --stream-interval (1: no second server)")
    ap.add_argument("--quick", action="store_true", help="8 concurrent x 16 tokens, 2 rounds")
    args = ap.parse_args()
    if args.quick:
        args.concurrency, args.tokens, args.rounds = 8, 16, 2
    machine = machine_info()  # at the start: its date and load average, not the run's own
    config = EngineConfig()
    engine = Engine.from_config(config)
    work = prompts(args.concurrency, engine.info.vocab_size)
    rounds = []
    servers = {"served": []} | ({f"served_interval_{args.stream_interval}": ["--stream-interval", str(args.stream_interval)]}
                                 if args.stream_interval > 1 else {})
    with tempfile.TemporaryDirectory() as tmp:
        processes = {}
        try:
            for side, flags in servers.items():
                (Path(tmp) / side).mkdir()
                processes[side] = serve_process.start_server(Path(tmp) / side, ["--http-port", "0", *flags])
            run = {"engine": (lambda: engine_round(engine, work, args.tokens), None)}
            for side, (process, listening) in processes.items():
                run[side] = (lambda port=listening["port"]: asyncio.run(served_round(port, work, args.tokens)), process.pid)
            # The bare server's tick: the engine's step, from its warm-up (the second round).
            pace = [engine_round(engine, work, args.tokens) for _ in range(2)][-1]
            bare, bare_port = start_script(Path(tmp), Path(bare_grpc.__file__), 60, "--tick", f"{len(work) / pace:.4f}")
            processes["bare_grpc"] = (bare, None)
            split, split_port = start_script(Path(tmp), Path(split_engine.__file__), serve_process.START_TIMEOUT_S)
            processes["split_engine"] = (split, None)
            run["split_engine"] = (lambda: asyncio.run(served_round(split_port, work, args.tokens)), split.pid)
            run["bare_grpc"] = (lambda: bare_round(bare_port, work, args.tokens), bare.pid)
            run["engine_beside_transport"] = (lambda: engine_beside_round(engine, work, args.tokens, bare_port), bare.pid)
            for fn, _ in run.values():  # warm-up: first-call paths and shapes on every side
                fn()
            with frozen_heap():  # this process's loaded heap, as `tandem serve` freezes its own
                for i in range(args.rounds):
                    for side in list(run) if i % 2 == 0 else list(run)[::-1]:
                        record = timed(*run[side])
                        rounds.append({"side": side, **record})
                        server = "" if run[side][1] is None else (
                            f", server {record['server_cpu_s']:.1f} (its event loop {record['server_loop_cpu_s']:.2f})")
                        print(f"  round {i + 1} {side:24} {record['tokens_per_s']:7.1f} {'messages' if side == 'bare_grpc' else 'tokens'}/s, CPU s: this process "
                              f"{record['cpu_s']:.2f}{server}", flush=True)
        finally:
            for process, _ in processes.values():
                serve_process.stop_server(process)
    result = {
        "benchmark": "served_vs_engine",
        "machine": machine,
        "workload": {"concurrency": args.concurrency, "prompt_tokens": PROMPT_TOKENS, "tokens": args.tokens,
                     "rounds": args.rounds, "dtype": engine.info.dtype, "stream_interval": args.stream_interval},
        "goals": GOALS,
        "summary": summarize(rounds),
        "rounds": rounds,
    }
    s = result["summary"]
    print(f"\n{'side':24} {'tokens/s':>9} {'x engine':>9} {'spread':>7} {'CPU s here':>11} {'server':>7} {'its loop':>9}")
    for side in run:
        if side == "bare_grpc":
            continue
        row = s[side]
        print(f"{side:24} {row['tokens_per_s']:9.1f} {row['over_engine']:9.3f} {row['spread']:7.2f} {row['cpu_s']:11.2f} "
              f"{row.get('server_cpu_s', 0):7.1f} {row.get('server_loop_cpu_s', 0):9.2f}")
    bare = s["bare_grpc"]
    print(f"bare gRPC, {len(work) * args.tokens} messages a round: CPU s server {bare['server_cpu_s']:.2f} + client {bare['cpu_s']:.2f}; "
          f"so the served ratio's ceiling here is {s['served_ceiling_over_engine']:.3f}")
    print(f"split engine (its front's CPU in 'server'; the engine process's not counted) / engine {s['split_engine']['over_engine']:.3f}")
    beside = s["engine_beside_transport"]
    print(f"engine beside the bare transport (its server {beside['server_cpu_s']:.2f} + reader {beside['reader_cpu_s']:.2f} CPU s a round) "
          f"/ engine {beside['over_engine']:.3f}; served / that {s['served_over_engine_beside_transport']:.3f}")
    print(f"served / engine {s['served_over_engine']:.3f}: goal {'met' if s['goal_met'] else 'NOT met'}")
    write_result(f"served_vs_engine_cpu_{cpu_kind()}" + ("_quick" if args.quick else ""), result)


if __name__ == "__main__":
    main()
