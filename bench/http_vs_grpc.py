"""The OpenAI-compatible HTTP front against gRPC on the same workload: 32 concurrent
streaming requests on the default model (SmolLM2-135M-Instruct), greedy, a fixed number of
tokens each. Goal (issue 8): HTTP costs at most 5% throughput and 5 ms p50 TTFT.

One `tandem serve` process serves both fronts on one engine; this process is the client:
Tandem's asyncio gRPC client and the `openai` SDK's AsyncOpenAI, as users would run them.
Rounds alternate between the fronts (after a warm-up of each), so that the machine's noise
falls on both; each front's figure is its median over the rounds.

TTFT is the time to the first chunk with text on both fronts. (Measured at the first token id
on gRPC, it would credit gRPC with a whole iteration: SmolLM2's first greedy token for this
raw prompt is <|im_end|>, generated through ignore_eos, whose text is empty, so neither front
has text to show before the second token.)

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

from bench.report import machine_info, write_result  # noqa: E402
from tandem.client import AsyncTandemClient, TandemClient, TandemRpcError  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
MAX_TTFT_MS_OVER_GRPC = 5.0
MAX_THROUGHPUT_LOSS = 0.05


def start_server(root: Path, threads: int | None) -> tuple[subprocess.Popen, int, int]:
    """`tandem serve` on the default model with both fronts on free ports; (process, gRPC port, HTTP port)."""
    log = root / "server.log"
    args = [sys.executable, "-m", "tandem.server.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--http-port", "0"]
    if threads:
        args += ["--num-threads", str(threads)]
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    try:
        return _wait_ready(process, log)
    except BaseException:
        process.kill()  # never leave a loading server behind
        raise


def _wait_ready(process: subprocess.Popen, log: Path) -> tuple[subprocess.Popen, int, int]:
    # Generous: on a shared machine the model load may wait behind other work.
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        listening = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{") and '"listening"' in line]
        if listening:
            ports = listening[0]["port"], listening[0]["http_port"]
            with TandemClient(f"127.0.0.1:{ports[0]}", max_retries=0, timeout=30) as client:
                while not _serving(client):
                    assert process.poll() is None, log.read_text()[-2000:]
                    time.sleep(0.2)
            return process, *ports
        assert process.poll() is None, log.read_text()[-2000:]
        time.sleep(0.2)
    raise RuntimeError("the server did not start")


def _serving(client: TandemClient) -> bool:
    try:
        return client.health("tandem.v1.GenerationService") == "SERVING"
    except TandemRpcError:  # a busy machine: the probe's deadline passed
        return False


async def grpc_request(client: AsyncTandemClient, tokens: int) -> tuple[float, int]:
    """(seconds to the first token, tokens received) of one streamed request."""
    started = time.perf_counter()
    first, received = None, 0
    async for chunk in client.stream(PROMPT, max_new_tokens=tokens, ignore_eos=True):
        if chunk.text and first is None:
            first = time.perf_counter() - started
        received += len(chunk.token_ids)
    return first, received


async def http_request(client: openai.AsyncOpenAI, model: str, tokens: int) -> tuple[float, int]:
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


async def one_round(front: str, grpc_port: int, http_port: int, model: str, concurrency: int, tokens: int) -> dict:
    """concurrency requests at once through one front: throughput over the round's wall time, TTFTs."""
    async with AsyncTandemClient(f"127.0.0.1:{grpc_port}", timeout=600) as grpc_client:
        http_client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0, timeout=600)
        started = time.perf_counter()
        if front == "grpc":
            results = await asyncio.gather(*(grpc_request(grpc_client, tokens) for _ in range(concurrency)))
        else:
            results = await asyncio.gather(*(http_request(http_client, model, tokens) for _ in range(concurrency)))
        wall = time.perf_counter() - started
        await http_client.close()
    received = sum(n for _, n in results)
    assert received == concurrency * tokens, f"{front}: {received} tokens, expected {concurrency * tokens}"
    ttfts = [t for t, _ in results]
    return {"front": front, "wall_s": wall, "tokens_per_s": received / wall, "ttft_p50_ms": 1000 * statistics.median(ttfts)}


async def run(grpc_port: int, http_port: int, concurrency: int, tokens: int, rounds: int) -> list[dict]:
    async with AsyncTandemClient(f"127.0.0.1:{grpc_port}") as client:
        model = (await client.model_info()).model
    for front in ("grpc", "http"):  # warm-up: connections, first-call paths, the engine's shapes
        await one_round(front, grpc_port, http_port, model, concurrency, tokens)
    measured = []
    for i in range(rounds):
        for front in ("grpc", "http") if i % 2 == 0 else ("http", "grpc"):
            result = await one_round(front, grpc_port, http_port, model, concurrency, tokens)
            print(f"  round {i + 1} {front:4}  {result['tokens_per_s']:7.1f} tokens/s  p50 TTFT {result['ttft_p50_ms']:7.1f} ms", flush=True)
            measured.append(result)
    return measured


def summary(rounds: list[dict]) -> dict:
    per_front = {}
    for front in ("grpc", "http"):
        mine = [r for r in rounds if r["front"] == front]
        per_front[front] = {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in mine),
            "ttft_p50_ms": statistics.median(r["ttft_p50_ms"] for r in mine),
        }
    grpc, http = per_front["grpc"], per_front["http"]
    throughput_ratio = http["tokens_per_s"] / grpc["tokens_per_s"]
    ttft_over_ms = http["ttft_p50_ms"] - grpc["ttft_p50_ms"]
    return {
        **per_front,
        "http_throughput_ratio": throughput_ratio,
        "http_ttft_p50_over_grpc_ms": ttft_over_ms,
        "goal_met": throughput_ratio >= 1 - MAX_THROUGHPUT_LOSS and ttft_over_ms <= MAX_TTFT_MS_OVER_GRPC,
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
            process.terminate()
            process.wait(60)
    result = {
        "benchmark": "http_vs_grpc",
        "machine": machine_info(),
        "workload": {"concurrency": args.concurrency, "tokens": args.tokens, "rounds": args.rounds, "prompt": PROMPT, "streaming": True},
        "goal": {"max_throughput_loss": MAX_THROUGHPUT_LOSS, "max_ttft_p50_over_grpc_ms": MAX_TTFT_MS_OVER_GRPC},
        "summary": summary(rounds),
        "rounds": rounds,
    }
    s = result["summary"]
    print(f"\n{'front':6} {'tokens/s':>10} {'p50 TTFT ms':>12}")
    for front in ("grpc", "http"):
        print(f"{front:6} {s[front]['tokens_per_s']:10.1f} {s[front]['ttft_p50_ms']:12.1f}")
    print(f"HTTP/gRPC throughput {s['http_throughput_ratio']:.3f}, p50 TTFT +{s['http_ttft_p50_over_grpc_ms']:.1f} ms: goal {'met' if s['goal_met'] else 'NOT met'}")
    write_result("http_vs_grpc" + ("_quick" if args.quick else ""), result)


if __name__ == "__main__":
    main()
