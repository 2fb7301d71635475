"""End to end on the real SmolLM2-135M-Instruct: a chat question over gRPC gets the right answer."""

import pytest

from tandem.client import TandemClient
from tandem.server.config import EngineConfig
from tandem.server.engine.async_engine import AsyncEngine
from tests.api.conftest import loopback
from tests.api.harness import ServerThread


@pytest.mark.smollm
def test_capital_of_france(smollm2_path):
    engine = AsyncEngine(EngineConfig(model=str(smollm2_path), dtype="float32", kv_cache_bytes=64 << 20))
    engine.start()
    thread = ServerThread(loopback(), engine)
    try:
        with TandemClient(thread.target) as client:
            messages = [{"role": "user", "content": "What is the capital of France?"}]
            answer = client.generate(messages=messages, max_new_tokens=20)
            streamed = "".join(c.text for c in client.stream(messages=messages, max_new_tokens=20))
        assert "Paris" in answer.text and streamed == answer.text
        assert answer.finish_reason in ("eos", "length")
    finally:
        thread.stop()
        engine.shutdown()
