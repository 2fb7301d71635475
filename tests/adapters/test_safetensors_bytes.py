"""An adapter's weights file is a function of its contents: its content hash names a version."""

import torch
from safetensors.torch import load

from tandem.server.adapters.safetensors_bytes import safetensors_bytes


def test_the_same_tensors_and_metadata_give_the_same_bytes_every_time():
    """safetensors ordered the metadata keys by a freshly seeded hash map: saves of one
    adapter in one process came out in two byte orders (two content hashes, two versions)."""
    tensors = {"b.weight": torch.arange(6.0).reshape(2, 3), "a.weight": torch.ones(5, dtype=torch.float16)}
    metadata = {"format": "pt", "tandem.lora_a_init_seed": "4", "version": "1", "tensors": '{"é": 1}'}
    files = {safetensors_bytes(tensors, metadata) for _ in range(40)}
    assert len(files) == 1
    (data,) = files
    length = int.from_bytes(data[:8], "little")
    assert length % 8 == 0  # the data stays aligned
    back = load(data)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    header = data[8 : 8 + length].decode()
    assert header.startswith('{"__metadata__":{"format":"pt","tandem.lora_a_init_seed":"4","tensors":"{\\"é\\": 1}","version":"1"}')
