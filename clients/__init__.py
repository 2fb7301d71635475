"""Python clients for Tandem: `TandemClient` (blocking) and `AsyncTandemClient` (asyncio)."""

from clients.async_client import AsyncTandemClient
from clients.errors import TandemRpcError
from clients.sync_client import TandemClient
from clients.types import AdapterInfo, Completion, FinetuneJob, FinetuneJobError, ModelInfo, StreamChunk, TokenLogprob

__all__ = [
    "AdapterInfo",
    "AsyncTandemClient",
    "Completion",
    "FinetuneJob",
    "FinetuneJobError",
    "ModelInfo",
    "StreamChunk",
    "TandemClient",
    "TandemRpcError",
    "TokenLogprob",
]
