"""Building engines around in-memory transformers models, running them to completion, and
waiting for an async engine's stream to end."""

import asyncio
import time

import torch

from tandem.server.config import EngineConfig
from tandem.server.engine.async_engine import AsyncEngine
from tandem.server.engine.llm_engine import Engine
from tandem.server.model.loader import LoadedModel, build_from_hf, eos_token_ids


def make_engine(hf_model, tokenizer, dtype: torch.dtype = torch.float32, device: str = "cpu", **config) -> Engine:
    model = build_from_hf(hf_model, dtype, torch.device(device))
    loaded = LoadedModel(model, tokenizer, "test-model", hf_model.config.model_type, eos_token_ids(hf_model, tokenizer))
    config.setdefault("adapter_cache_prefault", False)  # 2 GiB touched per test engine: too much
    return Engine(loaded, EngineConfig(**config))


def run(engine: Engine, arrivals: dict[int, list[tuple]]) -> dict[str, list[int]]:
    """Step the engine, adding requests (rid, prompt ids, params[, adapter]) at the given
    iterations; returns generated ids per request."""
    outputs: dict[str, list[int]] = {}
    step = 0
    while step <= max(arrivals) or engine.has_work():
        for request in arrivals.get(step, []):
            engine.add_request(*request)
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.token_ids)
        step += 1
    return outputs


def random_prompts(lengths: list[int], vocab: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


async def stream_ended(engine: AsyncEngine, request_id: str) -> None:
    """Until the request's last output or error has reached its stream's loop: the engine
    ends the request (num_running 0) before it delivers the last output."""
    stream = engine._streams[request_id]
    deadline = time.monotonic() + 60
    while not (stream.items and (isinstance(stream.items[-1], Exception) or stream.items[-1].finished)):
        assert time.monotonic() < deadline, "the stream did not end"
        await asyncio.sleep(0.01)
