"""Start-up made visible: each phase of loading the model is logged as it starts and when it
ends, with its duration, through the process's logging (JSON lines by default), so a slow
start says where it is instead of staying silent."""

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("tandem.load")

# In the order they run: config and tokenizer; weights to float32 (GGUF: dequantised); our
# fused layout; the engine (KV cache, adapter tiers, fine-tuning jobs).
PHASES = ("read", "dequantise", "build", "engine")


@contextmanager
def load_phase(phase: str, **fields: object) -> Iterator[None]:
    """Logs `phase` starting, then done with its seconds (or failed, then re-raises)."""
    step = f"{PHASES.index(phase) + 1}/{len(PHASES)}"
    # live: on a terminal this line is redrawn in place until the next one (logging_setup).
    started_fields = {"phase": phase, "step": step, "state": "started", **fields}
    log.info(f"loading the model: {phase} ({step})", extra={"fields": started_fields, "live": True})
    started = time.perf_counter()
    state = "failed"
    try:
        yield
        state = "done"
    finally:
        seconds = round(time.perf_counter() - started, 3)
        log.info(f"loading the model: {phase} {state} ({step})", extra={"fields": {"phase": phase, "step": step, "state": state, "seconds": seconds, **fields}})
