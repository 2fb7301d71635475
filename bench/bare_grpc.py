"""gRPC streaming with nothing behind it: what the transport alone costs per streamed message.

A served token costs the server a message built and written by grpc.aio and the client one
read; on a host whose cores the engine fills, that CPU comes out of the engine's time. This
server answers GenerationService.GenerateStream with max_new_tokens one-token messages, one
per tick for every open stream at once (as the engine hands out one token per stream per
step), and no model; the client reads them with a bare stub. bench/served_vs_engine.py runs
it beside the real server to put a measured floor under the served path's ratio, and reads it (--read) beside
the engine stepping in-process, to measure what that CPU costs the engine on shared cores.

    .venv/bin/python bench/bare_grpc.py PORT_FILE [--tick SECONDS]   # serve until killed
    .venv/bin/python bench/bare_grpc.py --read PORT [--streams N]     # read N endless streams until killed
"""

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tandem.v1 import generation_pb2, generation_pb2_grpc  # noqa: E402


class _Ticker:
    """Wakes every waiting stream at once, every `seconds`."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._tick = asyncio.Event()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.seconds)
            self._tick.set()
            self._tick = asyncio.Event()

    async def wait(self) -> None:
        await self._tick.wait()


class _Streamer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, ticker: _Ticker):
        self._ticker = ticker

    async def GenerateStream(self, request, context):
        for i in range(request.max_new_tokens):
            await self._ticker.wait()
            yield generation_pb2.GenerateStreamResponse(text="x", token_ids=[i])


async def start_generation_server(servicer: generation_pb2_grpc.GenerationServiceServicer, port_file: Path) -> grpc.aio.Server:
    """A gRPC server with servicer as its GenerationService, started on a free local port,
    which port_file then holds (what the bench waits for)."""
    server = grpc.aio.server()
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port_file.write_text(str(port))
    return server


async def serve(port_file: Path, tick: float) -> None:
    ticker = _Ticker(tick)
    server = await start_generation_server(_Streamer(ticker), port_file)  # kept: a server collected stops
    await asyncio.gather(ticker.run(), server.wait_for_termination())


async def read_streams(port: int, streams: int, messages: int, on_first: Callable[[], None] | None = None) -> int:
    """Open `streams` streams of `messages` messages each at once; the messages read.
    on_first: called once, when every stream has had its first message."""
    first = asyncio.Barrier(streams)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)

        async def one() -> int:
            request = generation_pb2.GenerateStreamRequest(max_new_tokens=messages)
            read = 0
            async for _ in stub.GenerateStream(request):
                read += 1
                if read == 1 and await first.wait() == 0 and on_first is not None:
                    on_first()
            return read

        return sum(await asyncio.gather(*(one() for _ in range(streams))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("port_file", type=Path, nargs="?")
    ap.add_argument("--tick", type=float, default=0.02)
    ap.add_argument("--read", type=int, metavar="PORT", help="read from the server at PORT instead, until killed")
    ap.add_argument("--streams", type=int, default=32)
    args = ap.parse_args()
    if args.read is not None:
        # "reading" on stdout once every stream flows: the caller times its work from there.
        asyncio.run(read_streams(args.read, args.streams, 2**31 - 1, lambda: print("reading", flush=True)))
    else:
        asyncio.run(serve(args.port_file, args.tick))


if __name__ == "__main__":
    main()
