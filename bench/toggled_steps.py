"""SmolLM2 decode steps with a native CPU kernel switched on and off between interleaved
rounds of steps in one engine, so a busy moment of a shared host hits both alike."""

import os
import random
import statistics
import time
from collections.abc import Callable

import torch

from tandem.server.config import EngineConfig
from tandem.server.engine.llm_engine import Engine
from tandem.server.engine.sampling_params import SamplingParams
from tandem.server.heap import frozen_heap


def toggled_decode_steps(
    n: int, rounds: int, steps: int, switch: str, clear: Callable[[], None], dtype: str = "auto"
) -> dict:
    """Median decode-step seconds with the kernel on and off, n sequences decoding. switch is
    the kernel's environment variable, clear empties its library cache so the switch is read."""
    engine = Engine.from_config(EngineConfig(num_threads=torch.get_num_threads(), kv_cache_bytes=256 << 20, dtype=dtype))
    rng = random.Random(n)
    params = SamplingParams(temperature=0.0, max_new_tokens=2 * rounds * steps + 8, ignore_eos=True)
    for i in range(n):
        engine.add_request(f"r{i}", [rng.randrange(1000, 20000) for _ in range(rng.randrange(48, 160))], params)
    medians: dict[str, list[float]] = {"kernel": [], "torch": []}
    with frozen_heap():
        while engine.scheduler.waiting or any(s.num_computed < s.prompt_len for s in engine.scheduler.running):
            engine.step()
        for _ in range(rounds):
            for name, on in (("kernel", "1"), ("torch", "0")):
                os.environ[switch] = on
                clear()
                times = []
                for _ in range(steps):
                    started = time.perf_counter()
                    engine.step()
                    times.append(time.perf_counter() - started)
                medians[name].append(statistics.median(times))
    os.environ.pop(switch)
    clear()
    kernel, plain = statistics.median(medians["kernel"]), statistics.median(medians["torch"])
    return {"sequences": n, "dtype": str(engine.dtype).removeprefix("torch."), "kernel_step_ms": 1000 * kernel, "torch_step_ms": 1000 * plain, "speedup": plain / kernel}
