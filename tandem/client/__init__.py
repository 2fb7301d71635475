"""Python clients for Tandem: `TandemClient` (blocking) and `AsyncTandemClient` (asyncio)."""

from tandem.client.async_client import AsyncTandemClient
from tandem.client.errors import TandemRpcError
from tandem.client.sync_client import TandemClient
from tandem.client.types import (
    AdapterInfo, Choice, Completion, FinetuneJob, FinetuneJobError, MergeResult, ModelInfo, StreamChunk, TokenLogprob,
)

__all__ = [
    "AdapterInfo",
    "AsyncTandemClient",
    "Choice",
    "Completion",
    "FinetuneJob",
    "FinetuneJobError",
    "MergeResult",
    "ModelInfo",
    "StreamChunk",
    "TandemClient",
    "TandemRpcError",
    "TokenLogprob",
]
