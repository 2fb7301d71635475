"""The engine in a process of its own, behind the least gRPC front there can be: what the
served path would gain from vLLM v1's split (an engine-core process beside the API server's).

In `tandem serve` the engine thread and the event loop share one interpreter: the loop's
Python for every streamed message (gRPC's Cython, the handler) holds the GIL the engine
thread needs between its torch ops. Here the engine (`Engine.from_config(EngineConfig())`,
stepped in a loop) runs in a child process and hands each step's outputs, as plain tuples,
through a pipe to this process, whose only work is GenerationService.GenerateStream: no
interceptor, auth, metrics, adapters or detokenizing beyond what the engine does. So its
ratio to the engine in-process bounds what a split of the real server could reach on this
host. bench/served_vs_engine.py runs it beside the real server.

    .venv/bin/python bench/split_engine.py PORT_FILE   # serve until killed
"""

import asyncio
import multiprocessing
import sys
from multiprocessing.connection import Connection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bare_grpc import start_generation_server  # noqa: E402
from tandem.v1 import generation_pb2, generation_pb2_grpc  # noqa: E402


def run_engine(conn: Connection) -> None:
    """The engine process: requests in, one message of outputs per step out."""
    from tandem.server.config import EngineConfig
    from tandem.server.engine.llm_engine import Engine
    from tandem.server.engine.sampling_params import SamplingParams
    from tandem.server.heap import frozen_heap

    engine = Engine.from_config(EngineConfig())
    conn.send("ready")
    with frozen_heap():  # as `tandem serve` freezes its loaded heap
        while True:
            try:
                if not engine.has_work():
                    conn.poll(None)
                while conn.poll():
                    request_id, prompt, tokens = conn.recv()
                    engine.add_request(request_id, prompt, SamplingParams(temperature=0.0, max_new_tokens=tokens, ignore_eos=True))
            except EOFError:  # the front is gone
                return
            if outputs := engine.step():
                conn.send([(o.request_id, o.text, o.token_ids, o.finished, o.prompt_tokens, o.generated_tokens) for o in outputs])


class _Front(generation_pb2_grpc.GenerationServiceServicer):
    """GenerateStream over the engine process: each step's outputs go to their streams' queues."""

    def __init__(self, conn: Connection):
        self._conn = conn
        self._streams: dict[str, asyncio.Queue] = {}
        self._count = 0
        asyncio.get_running_loop().add_reader(conn.fileno(), self._deliver)

    def _deliver(self) -> None:
        while self._conn.poll():
            for request_id, *output in self._conn.recv():
                if (queue := self._streams.get(request_id)) is not None:
                    queue.put_nowait(output)

    async def GenerateStream(self, request, context):
        self._count += 1
        request_id = str(self._count)
        self._streams[request_id] = queue = asyncio.Queue()
        self._conn.send((request_id, list(request.prompt_token_ids), request.max_new_tokens))
        try:
            finished = False
            while not finished:
                text, token_ids, finished, prompt_tokens, generated_tokens = await queue.get()
                yield generation_pb2.GenerateStreamResponse(
                    text=text, token_ids=token_ids, finish_reason=generation_pb2.FINISH_REASON_LENGTH if finished else 0,
                    usage=generation_pb2.Usage(prompt_tokens=prompt_tokens, generated_tokens=generated_tokens),
                )
        finally:
            del self._streams[request_id]


async def serve(port_file: Path, conn: Connection) -> None:
    server = await start_generation_server(_Front(conn), port_file)
    await server.wait_for_termination()


def main() -> None:
    port_file = Path(sys.argv[1])
    here, there = multiprocessing.Pipe()
    engine = multiprocessing.get_context("spawn").Process(target=run_engine, args=(there,), daemon=True)
    engine.start()
    if here.recv() != "ready":
        raise RuntimeError("the engine process did not start")
    asyncio.run(serve(port_file, here))


if __name__ == "__main__":
    main()
