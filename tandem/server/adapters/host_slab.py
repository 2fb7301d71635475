"""The host cache's memory: adapter files are read into host memory touched once, not into
new memory each time.

Memory a process has never touched costs a page fault per 4 KiB page on first write, and in
a serving process those faults are slow (bench/adapter_reads.py measures a 20 MB read into
new memory against a read into touched memory). The slab is the host cache's byte budget
(`--adapter-cache-bytes`): one chunk of the whole budget touched at start when the server
prefaults it (`--adapter-cache-prefault`, the default: no read while serving pays a fault),
else a few large chunks made on demand (a process that reads three small adapters does not
hold its whole budget). Each chunk is mapped with transparent huge pages where the kernel
allows them, touched once when made (page-locked on CUDA, so slot copies can overlap
compute) and kept until the slab goes, or, made on demand, until a block fits no chunk:
then chunks no block uses are unmapped to map one of its size (remap_block), where a read
larger than the first chunks took new memory beside them, up to twice the budget in all (on
CUDA an unmapped chunk goes back to torch's caching host allocator, which reuses it for
page-locked memory of its size but does not free it). Blocks are carved from the chunks
first fit, page aligned; a block goes back to its chunk's free list when the last object viewing
it dies, not when the cache drops it: a request still holding an evicted adapter keeps its
bytes, and a later read reuses the space only once no tensor can see it.
"""

import bisect
import mmap
import threading
import weakref
from dataclasses import dataclass

import torch

ALIGN = 4096
# The largest chunk the slab grows by (a bigger block gets a chunk of its own size). The
# first chunks are smaller: the slab doubles, so a server of small adapters stays small.
MAX_CHUNK_BYTES = 64 << 20
MIN_CHUNK_BYTES = 1 << 20


@dataclass
class SlabStats:
    capacity: int  # the budget the chunks may grow to
    mapped: int  # bytes of chunks made so far
    used: int  # bytes of blocks some object still views
    blocks: int
    misses: int  # blocks refused for want of room (the caller evicted, or took new memory)


class _Chunk:
    def __init__(self, size: int, pin: bool):
        self.size = size
        if pin:
            self._memory = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            self.buffer = memoryview(self._memory.numpy())
        else:
            self._memory = mmap.mmap(-1, size)
            if hasattr(mmap, "MADV_HUGEPAGE"):
                self._memory.madvise(mmap.MADV_HUGEPAGE)
            self.buffer = memoryview(self._memory)
        # Touch every page now, in one pass, so that no read faults them in later.
        torch.frombuffer(self.buffer, dtype=torch.uint8).zero_()
        self.free: list[tuple[int, int]] = [(0, size)]  # sorted, disjoint, coalesced [start, end)

    def idle(self) -> bool:
        return self.free == [(0, self.size)]

    def take(self, size: int) -> int | None:
        for i, (start, end) in enumerate(self.free):
            if end - start >= size:
                if end - start == size:
                    del self.free[i]
                else:
                    self.free[i] = (start + size, end)
                return start
        return None

    def give_back(self, start: int, size: int) -> None:
        end = start + size
        i = bisect.bisect(self.free, (start, end))
        if i < len(self.free) and self.free[i][0] == end:
            end = self.free.pop(i)[1]
        if i > 0 and self.free[i - 1][1] == start:
            start = self.free.pop(i - 1)[0]
            i -= 1
        self.free.insert(i, (start, end))


class HostSlab:
    """Host memory up to `capacity` bytes, handed out as writable blocks (memoryviews).
    prefault makes and touches all of it now, as one chunk, so a block of any size up to the
    capacity fits wherever free space is contiguous."""

    def __init__(self, capacity: int, pin: bool = False, prefault: bool = False):
        self.capacity = capacity
        self.pin = pin
        self._chunks: list[_Chunk] = [_Chunk(capacity, pin)] if prefault else []
        self._lock = threading.Lock()
        # Blocks whose last view died, given back at the next call: a view can die anywhere,
        # even in a garbage collection inside this class's own critical section.
        self._returned: list[tuple[_Chunk, int, int]] = []
        self._remapping = 0  # bytes of chunks remap_block is mapping outside the lock
        self._used = 0
        self._blocks = 0
        self.misses = 0

    def block(self, size: int) -> memoryview | None:
        """size writable bytes of the slab, or None when no free space of that size is left
        within the capacity (nothing to wait for: the caller evicts, or uses new memory).
        The block is the slab's again once the memoryview and every view of it are gone."""
        need = max(ALIGN, -(-size // ALIGN) * ALIGN)
        with self._lock:
            self._take_returned()
            for chunk in self._chunks:
                start = chunk.take(need)
                if start is not None:
                    return self._handed_out(chunk, start, need, size)
            mapped = sum(c.size for c in self._chunks) + self._remapping
            grow = max(need, min(MAX_CHUNK_BYTES, max(MIN_CHUNK_BYTES, mapped)))
            grow = min(grow, self.capacity - mapped)
            if grow < need:
                self.misses += 1
                return None
            chunk = _Chunk(grow, self.pin)
            self._chunks.append(chunk)
            return self._handed_out(chunk, chunk.take(need), need, size)

    def could_hold(self, size: int) -> bool:
        """Whether a block of size bytes could fit once blocks are given back (remap_block
        then maps a chunk of its size); past the capacity, evicting adapters to make room
        only empties the cache."""
        return max(ALIGN, -(-size // ALIGN) * ALIGN) <= self.capacity

    def can_remap(self, size: int) -> bool:
        """Whether remap_block could now map a chunk for a block of size bytes, in room left
        unmapped and made by unmapping chunks no block uses."""
        need = max(ALIGN, -(-size // ALIGN) * ALIGN)
        with self._lock:
            self._take_returned()
            return self._remappable_room() >= need

    def remap_block(self, size: int) -> memoryview | None:
        """A block in a chunk mapped for it, once chunks no block uses (largest first) are
        unmapped to make room for it within the capacity; None when they leave too little.
        Chunks made on demand are sized by the first reads: a later block larger than each
        took new memory beside them, the host holding up to twice the budget. The chunk is
        mapped and touched outside the slab's lock: called holding no lock of its own, the
        caller keeps those page faults off every other read's path."""
        need = max(ALIGN, -(-size // ALIGN) * ALIGN)
        with self._lock:
            self._take_returned()
            if not self._unmap_idle(need):
                return None
            self._remapping += need
        try:
            chunk = _Chunk(need, self.pin)
        finally:
            with self._lock:
                self._remapping -= need
        with self._lock:
            self._chunks.append(chunk)
            return self._handed_out(chunk, chunk.take(need), need, size)

    def _remappable_room(self) -> int:
        """The room for a new chunk once every chunk no block uses is unmapped."""
        return self.capacity - self._remapping - sum(c.size for c in self._chunks if not c.idle())

    def _unmap_idle(self, need: int) -> bool:
        """Unmap chunks no block uses, largest first, until need bytes more fit within the
        capacity; False, unmapping none, where all of them would leave too little."""
        if self._remappable_room() < need:
            return False
        idle = sorted((c for c in self._chunks if c.idle()), key=lambda c: c.size, reverse=True)
        while self.capacity - self._remapping - sum(c.size for c in self._chunks) < need:
            self._chunks.remove(idle.pop(0))
        return True

    def _handed_out(self, chunk: _Chunk, start: int, need: int, size: int) -> memoryview:
        self._used += need
        self._blocks += 1
        view = chunk.buffer[start : start + size]
        weakref.finalize(view, self._returned.append, (chunk, start, need)).atexit = False
        return view

    def _take_returned(self) -> None:
        while self._returned:
            chunk, start, need = self._returned.pop()
            chunk.give_back(start, need)
            self._used -= need
            self._blocks -= 1

    def stats(self) -> SlabStats:
        with self._lock:
            self._take_returned()
            return SlabStats(self.capacity, sum(c.size for c in self._chunks), self._used, self._blocks, self.misses)
