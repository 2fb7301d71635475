"""Safetensors files as bytes that depend on their contents only.

safetensors' own writer orders the metadata keys by a Rust HashMap, seeded afresh for each
map: two saves of the same tensors and metadata in one process could differ in bytes, so
the content hash, and with it the adapter's version, changed with nothing changed (a job's
republish after a restart, the same merge or compression run twice).
"""

import json

import torch
from safetensors.torch import save


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors.torch.save's file with its header's keys sorted (the data is untouched:
    its offsets are relative to the end of the header)."""
    data = save(tensors, metadata)
    length = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + length]), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    header += b" " * (-len(header) % 8)  # the format aligns the data to 8 bytes
    return len(header).to_bytes(8, "little") + header + data[8 + length :]
