"""The paged KV cache: fixed-size blocks, a free list, per-layer key/value storage.

A token's flat slot is block_id * block_size + offset; every layer uses the same slots, so
one block table per sequence addresses all layers. One more slot past the last block, the
null slot, is never handed out and never written: padded attention positions read it, so
what a freed block still holds (another request's keys, even NaN) never reaches a softmax.
"""

import torch

from tandem.server.model.llama import ModelShape


class BlockAllocator:
    """Hands out block ids from a free list; the free count is how tests check for leaks."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, table: list[int], num_tokens: int) -> int:
        """Extra blocks a sequence with this table needs to hold num_tokens tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(table))

    def can_grow(self, table: list[int], num_tokens: int) -> bool:
        return self.blocks_needed(table, num_tokens) <= len(self._free)

    def grow(self, table: list[int], num_tokens: int) -> None:
        for _ in range(self.blocks_needed(table, num_tokens)):
            table.append(self._free.pop())

    def free(self, table: list[int]) -> None:
        self._free.extend(reversed(table))
        table.clear()


class KVCache:
    """Key and value storage for every layer: each [num_blocks * block_size + 1, kv_heads, head_dim],
    the last row the all-zero null slot."""

    def __init__(self, shape: ModelShape, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device):
        self.null_slot = num_blocks * block_size
        slots = self.null_slot + 1
        self.layers = [
            (
                torch.zeros(slots, shape.num_kv_heads, shape.head_dim, dtype=dtype, device=device),
                torch.zeros(slots, shape.num_kv_heads, shape.head_dim, dtype=dtype, device=device),
            )
            for _ in range(shape.num_layers)
        ]

    def copy_blocks(self, pairs: list[tuple[int, int]], block_size: int) -> None:
        """Copy every layer's keys and values of block source into block destination, for
        each (source, destination) pair."""
        offsets = torch.arange(block_size)
        src = (torch.tensor([s for s, _ in pairs])[:, None] * block_size + offsets).flatten()
        dst = (torch.tensor([d for _, d in pairs])[:, None] * block_size + offsets).flatten()
        device = self.layers[0][0].device
        src, dst = src.to(device), dst.to(device)
        for keys, values in self.layers:
            keys.index_copy_(0, dst, keys.index_select(0, src))
            values.index_copy_(0, dst, values.index_select(0, src))

    @staticmethod
    def bytes_per_block(shape: ModelShape, block_size: int, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * shape.num_layers * block_size * shape.num_kv_heads * shape.head_dim * itemsize
