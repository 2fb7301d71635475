"""The OpenAI-compatible HTTP front against gRPC on the same workload: 32 concurrent
streaming requests on the default model (SmolLM2-135M-Instruct), greedy, a fixed number of
tokens each. Goal (issue 8): HTTP costs at most 5% throughput and 5 ms p50 TTFT.

One `tandem serve` process serves both fronts on one engine; this process is the client, on
the same 2 cores, so a client's own CPU time slows the server it measures. Three clients:
- grpc: Tandem's asyncio gRPC client;
- http: a lean HTTP/1.1 client on asyncio streams that reads the SSE lines (one connection per
  request, no keep-alive: if anything it favours gRPC) -- the front's own cost, the goal's figure;
- sdk: the `openai` SDK's AsyncOpenAI, as users would run it; reported beside the goal, since
  what it adds is the SDK's client-side CPU (recorded per round as client_cpu_s), not the front's.
Rounds rotate between the clients (after a warm-up of each), so that the machine's noise falls
on all; each client's figure is its median over the rounds.

TTFT is the time to the first chunk with text on every client. (Measured at the first token id
on gRPC, it would credit gRPC with a whole iteration: SmolLM2's first greedy token for this
raw prompt is <|im_end|>, generated through ignore_eos, whose text is empty, so no front has
text to show before the second token.)

    .venv/bin/python bench/http_vs_grpc.py                # 32 concurrent x 64 tokens, 5 rounds each
    .venv/bin/python bench/http_vs_grpc.py --quick        # 8 concurrent x 16 tokens, 2 rounds (smoke)
"""

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import openai  # noqa: E402

from bench import serve_process  # noqa: E402
from bench.report import machine_info, write_result  # noqa: E402
from tandem.client import AsyncTandemClient  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
MAX_TTFT_MS_OVER_GRPC = 5.0
MAX_THROUGHPUT_LOSS = 0.05


def start_server(root: Path, threads: int | None) -> tuple[subprocess.Popen, int, int]:
    """`tandem serve` on the default model with both fronts; (process, gRPC port, HTTP port)."""
    process, listening = serve_process.start_server(root, ["--http-port", "0"] + (["--num-threads", str(threads)] if threads else []))
    return process, listening["port"], listening["http_port"]


async def grpc_request(client: AsyncTandemClient, tokens: int) -> tuple[float, int]:
    """(seconds to the first token, tokens received) of one streamed request."""
    started = time.perf_counter()
    first, received = None, 0
    async for chunk in client.stream(PROMPT, max_new_tokens=tokens, ignore_eos=True):
        if chunk.text and first is None:
            first = time.perf_counter() - started
        received += len(chunk.token_ids)
    return first, received


async def lean_http_request(port: int, model: str, tokens: int) -> tuple[float, int]:
    """(seconds to the first text, completion tokens in the usage chunk) of one streamed
    completion, over a connection of its own."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({
        "model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}, "ignore_eos": True,
    }).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    writer.write(head.encode() + body)
    first, usage = None, 0
    try:
        status = await reader.readline()
        assert b" 200 " in status, status
        while line := await reader.readline():
            if line.startswith(b"data: [DONE]"):
                break
            if not line.startswith(b"data: "):
                continue  # headers, chunk sizes, blank lines
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - started
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
    finally:
        writer.close()
    return first, usage


async def sdk_request(client: openai.AsyncOpenAI, model: str, tokens: int) -> tuple[float, int]:
    started = time.perf_counter()
    first, usage = None, 0
    stream = await client.completions.create(
        model=model, prompt=PROMPT, max_tokens=tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter() - started
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
    return first, usage


CLIENTS = ("grpc", "http", "sdk")


async def one_round(client: str, grpc_port: int, http_port: int, model: str, concurrency: int, tokens: int) -> dict:
    """concurrency requests at once through one client: throughput over the round's wall time,
    TTFTs, and the CPU seconds this (client) process spent."""
    async with AsyncTandemClient(f"127.0.0.1:{grpc_port}", timeout=600) as grpc_client:
        sdk = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0, timeout=600)
        request = {
            "grpc": lambda: grpc_request(grpc_client, tokens),
            "http": lambda: lean_http_request(http_port, model, tokens),
            "sdk": lambda: sdk_request(sdk, model, tokens),
        }[client]
        started, cpu = time.perf_counter(), time.process_time()
        results = await asyncio.gather(*(request() for _ in range(concurrency)))
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        await sdk.close()
    received = sum(n for _, n in results)
    assert received == concurrency * tokens, f"{client}: {received} tokens, expected {concurrency * tokens}"
    ttfts = [t for t, _ in results]
    return {"client": client, "wall_s": wall, "tokens_per_s": received / wall, "ttft_p50_ms": 1000 * statistics.median(ttfts), "client_cpu_s": cpu}


async def run(grpc_port: int, http_port: int, concurrency: int, tokens: int, rounds: int) -> list[dict]:
    async with AsyncTandemClient(f"127.0.0.1:{grpc_port}") as client:
        model = (await client.model_info()).model
    for name in CLIENTS:  # warm-up: connections, first-call paths, the engine's shapes
        await one_round(name, grpc_port, http_port, model, concurrency, tokens)
    measured = []
    for i in range(rounds):
        for name in CLIENTS[i % 3 :] + CLIENTS[: i % 3]:
            result = await one_round(name, grpc_port, http_port, model, concurrency, tokens)
            print(f"  round {i + 1} {name:4}  {result['tokens_per_s']:7.1f} tokens/s  p50 TTFT {result['ttft_p50_ms']:7.1f} ms  client CPU {result['client_cpu_s']:.2f} s", flush=True)
            measured.append(result)
    return measured


def summary(rounds: list[dict]) -> dict:
    per_client = {}
    for name in CLIENTS:
        mine = [r for r in rounds if r["client"] == name]
        per_client[name] = {key: statistics.median(r[key] for r in mine) for key in ("tokens_per_s", "ttft_p50_ms", "client_cpu_s")}
    grpc = per_client["grpc"]
    against = {
        name: {
            "throughput_ratio": per_client[name]["tokens_per_s"] / grpc["tokens_per_s"],
            "ttft_p50_over_grpc_ms": per_client[name]["ttft_p50_ms"] - grpc["ttft_p50_ms"],
        }
        for name in ("http", "sdk")
    }
    http = against["http"]
    return {
        **per_client,
        "over_grpc": against,
        "goal_met": http["throughput_ratio"] >= 1 - MAX_THROUGHPUT_LOSS and http["ttft_p50_over_grpc_ms"] <= MAX_TTFT_MS_OVER_GRPC,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="the server's --num-threads (unset: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="8 concurrent x 16 tokens, 2 rounds")
    args = parser.parse_args()
    if args.quick:
        args.concurrency, args.tokens, args.rounds = 8, 16, 2
    with tempfile.TemporaryDirectory() as tmp:
        process, grpc_port, http_port = start_server(Path(tmp), args.threads)
        try:
            rounds = asyncio.run(run(grpc_port, http_port, args.concurrency, args.tokens, args.rounds))
        finally:
            serve_process.stop_server(process)
    result = {
        "benchmark": "http_vs_grpc",
        "machine": machine_info(),
        "workload": {"concurrency": args.concurrency, "tokens": args.tokens, "rounds": args.rounds, "prompt": PROMPT, "streaming": True},
        "goal": {"max_throughput_loss": MAX_THROUGHPUT_LOSS, "max_ttft_p50_over_grpc_ms": MAX_TTFT_MS_OVER_GRPC},
        "summary": summary(rounds),
        "rounds": rounds,
    }
    s = result["summary"]
    print(f"\n{'client':6} {'tokens/s':>10} {'p50 TTFT ms':>12} {'client CPU s':>13} {'vs gRPC':>8} {'TTFT +ms':>9}")
    for name in CLIENTS:
        over = s["over_grpc"].get(name, {"throughput_ratio": 1.0, "ttft_p50_over_grpc_ms": 0.0})
        print(f"{name:6} {s[name]['tokens_per_s']:10.1f} {s[name]['ttft_p50_ms']:12.1f} {s[name]['client_cpu_s']:13.2f} "
              f"{over['throughput_ratio']:8.3f} {over['ttft_p50_over_grpc_ms']:+9.1f}")
    print(f"HTTP front (lean client) vs gRPC: goal {'met' if s['goal_met'] else 'NOT met'}")
    write_result("http_vs_grpc" + ("_quick" if args.quick else ""), result)


if __name__ == "__main__":
    main()
