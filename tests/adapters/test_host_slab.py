"""Adapter reads into the host slab: the bytes and hash are the file's, a file that changes
while it is read is refused or read whole, and the cache's evictions give the slab's space
back to later reads (or, when every adapter is in use, the read takes new memory)."""

import gc
import hashlib
import shutil
import weakref
from pathlib import Path

import grpc
import pytest
import torch

from tandem.server.adapters import host_slab, peft_format
from tandem.server.adapters.host_slab import ALIGN, HostSlab, SlabStats
from tandem.server.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, read_adapter, read_hashed
from tandem.server.adapters.registry import AdapterRegistry
from tandem.server.adapters.slot_pool import SlotPool
from tandem.server.api.status_mapping import status_for
from tandem.server.errors import IncompatibleAdapter, ResourceExhausted
from tandem.server.model.loader import build_from_hf
from tests.adapters.make_adapters import ALL_LINEAR, make_adapter

MAX_RANK = 8


@pytest.fixture(scope="module")
def base(tiny_hf_model):
    return build_from_hf(tiny_hf_model, torch.float32, torch.device("cpu"))


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_hf_model) -> Path:
    """Three adapters of one size (different weights) and one twice as large."""
    root = tmp_path_factory.mktemp("slab-adapters")
    for seed, name in enumerate("abc"):
        make_adapter(tiny_hf_model, root / name, r=4, target_modules=ALL_LINEAR, seed=seed)
    make_adapter(tiny_hf_model, root / "big", r=MAX_RANK, target_modules=ALL_LINEAR, seed=9)
    return root


def file_digest(directory: Path) -> str:
    return hashlib.sha256((directory / CONFIG_FILE).read_bytes() + (directory / WEIGHTS_FILE).read_bytes()).hexdigest()


def in_slab(adapter, slab: HostSlab) -> bool:
    chunks = [(torch.frombuffer(c.buffer, dtype=torch.uint8).data_ptr(), c.size) for c in slab._chunks]
    ptrs = [t.data_ptr() for g in adapter.groups.values() for a, b, _ in g.slices.values() for t in (a, b)]
    return all(any(start <= p < start + size for start, size in chunks) for p in ptrs)


def block_size(directory: Path) -> int:
    return -(-(directory / WEIGHTS_FILE).stat().st_size // ALIGN) * ALIGN


@pytest.mark.parametrize("piece", [peft_format.READ_PIECE_BYTES, 1000], ids=["one-piece", "many-pieces"])
def test_a_slab_read_holds_the_files_bytes_and_their_sha256(sources, base, monkeypatch, piece):
    monkeypatch.setattr(peft_format, "READ_PIECE_BYTES", piece)
    slab = HostSlab(1 << 20)
    weights = sources / "a" / WEIGHTS_FILE
    data, digest = read_hashed(weights, b"prefix", 1 << 30, slab.block)
    assert isinstance(data, memoryview) and bytes(data) == weights.read_bytes()
    assert digest == hashlib.sha256(b"prefix" + weights.read_bytes()).hexdigest()

    adapter = read_adapter("a", sources / "a", base, MAX_RANK, buffer=slab.block)
    fresh = read_adapter("a", sources / "a", base, MAX_RANK)
    assert adapter.content_hash == fresh.content_hash == file_digest(sources / "a")
    assert in_slab(adapter, slab) and not in_slab(fresh, slab)
    for key, g in fresh.groups.items():
        for s, (a, b, scale) in g.slices.items():
            a2, b2, scale2 = adapter.groups[key].slices[s]
            assert torch.equal(a, a2) and torch.equal(b, b2) and scale == scale2


def test_a_block_returns_to_the_slab_when_its_last_view_dies_and_free_space_coalesces():
    slab = HostSlab(4 * ALIGN)
    blocks = [slab.block(ALIGN) for _ in range(4)]
    assert slab.block(1) is None and slab.stats().misses == 1
    view = torch.frombuffer(blocks[1], dtype=torch.uint8)
    del blocks[1:3]
    assert slab.stats().used == 3 * ALIGN  # block 1 is still seen by a tensor
    del view
    gc.collect()
    assert slab.stats().used == 2 * ALIGN
    whole = slab.block(2 * ALIGN)  # blocks 1 and 2, merged back into one run
    assert whole is not None and slab.stats() == SlabStats(4 * ALIGN, 4 * ALIGN, 4 * ALIGN, 3, 1)


def _changing(path: Path, change) -> "peft_format.Buffer":
    """A buffer that changes the file once its size has been taken, before its bytes are read."""

    def buffer(size: int):
        change(path)
        return bytearray(size)

    return buffer


@pytest.mark.parametrize(
    "change",
    [lambda p: p.write_bytes(p.read_bytes()[:100]), lambda p: p.write_bytes(p.read_bytes() + b"\0" * 8)],
    ids=["truncated", "grown"],
)
def test_a_file_that_changes_size_while_read_is_refused_and_its_block_freed(sources, base, tmp_path, change):
    path = shutil.copytree(sources / "a", tmp_path / "x")
    slab = HostSlab(1 << 20)

    def buffer(size: int):
        change(path / WEIGHTS_FILE)
        return slab.block(size)

    with pytest.raises(IncompatibleAdapter) as info:
        read_adapter("x", path, base, MAX_RANK, buffer=buffer)
    assert str(info.value).startswith("adapter 'x' has an unreadable adapter_model.safetensors: ")
    assert str(info.value).endswith("changed size while being read")
    del info
    gc.collect()
    assert slab.stats().used == 0


def test_a_file_overwritten_before_its_bytes_are_read_is_read_whole_and_hashed_as_read(sources, base, tmp_path):
    # The size is taken, then `cp b a` rewrites the file in place (same size): what is read,
    # hashed and checked is b's bytes, all of them, never a mix the hash does not describe.
    path = shutil.copytree(sources / "a", tmp_path / "x")
    other = (sources / "b" / WEIGHTS_FILE).read_bytes()
    adapter = read_adapter("x", path, base, MAX_RANK, buffer=_changing(path / WEIGHTS_FILE, lambda p: p.write_bytes(other)))
    assert adapter.content_hash == hashlib.sha256((path / CONFIG_FILE).read_bytes() + other).hexdigest()
    b = read_adapter("b", sources / "b", base, MAX_RANK)
    q = (0, "qkv")
    assert torch.equal(adapter.groups[q].slices[0][0], b.groups[q].slices[0][0])


def registry_of(root: Path, base, host_bytes: int, prefault: bool = False) -> AdapterRegistry:
    pool = SlotPool(base, 2, MAX_RANK, torch.float32, torch.device("cpu"))
    return AdapterRegistry(str(root), base, MAX_RANK, host_bytes, pool, prefault=prefault)


def test_evicted_adapters_give_their_slab_space_to_later_reads(sources, base, tmp_path):
    for name in "abc":
        shutil.copytree(sources / name, tmp_path / name)
    registry = registry_of(tmp_path, base, 2 * block_size(sources / "a"))
    first = registry.get("a")
    start = first.groups[(0, "qkv")].slices[0][0].data_ptr()
    assert in_slab(first, registry.slab)
    del first
    registry.get("b")
    c = registry.get("c")  # the slab holds two: a, least recently used, goes and c takes its place
    assert list(registry._cache) == ["b", "c"] and registry.host_evictions == 1
    assert in_slab(c, registry.slab) and c.groups[(0, "qkv")].slices[0][0].data_ptr() == start
    stats = registry.slab.stats()
    # One refusal (c's first try), answered by evicting a; nothing read outside the slab.
    assert (stats.mapped, stats.used, stats.blocks, stats.misses) == (registry.host_bytes, registry.host_bytes, 2, 1)
    assert c.content_hash == file_digest(tmp_path / "c")


def test_an_evicted_adapter_a_request_still_holds_keeps_its_bytes(sources, base, tmp_path):
    for name in "ab":
        shutil.copytree(sources / name, tmp_path / name)
    registry = registry_of(tmp_path, base, block_size(sources / "a"))
    a = registry.get("a")
    before = a.groups[(0, "qkv")].slices[0][0].clone()
    b = registry.get("b")  # a is evicted, but its block is still seen: b takes new memory
    assert list(registry._cache) == ["b"] and not in_slab(b, registry.slab)
    assert torch.equal(a.groups[(0, "qkv")].slices[0][0], before)


def test_reads_past_the_free_space_take_new_memory_when_every_cached_adapter_is_in_use(sources, base, tmp_path):
    for name in ("a", "b", "big"):
        shutil.copytree(sources / name, tmp_path / name)
    registry = registry_of(tmp_path, base, 2 * block_size(sources / "a"))
    a = registry.get("a")
    registry.pin(a)
    big = registry.get("big")  # larger than the free space, and a is in use: served all the same
    assert not in_slab(big, registry.slab) and big.content_hash == file_digest(tmp_path / "big")
    assert registry.slab.stats().misses == 1 and list(registry._cache) == ["a", "big"]
    registry.pin(big)
    b = registry.get("b")  # fits beside a once nothing else is left to evict
    assert in_slab(b, registry.slab) and list(registry._cache) == ["a", "big", "b"]
    registry.unpin(a)
    registry.unpin(big)
    assert list(registry._cache) == ["b"]


def test_a_prefaulted_cache_holds_its_whole_budget_from_the_start_and_reads_map_nothing_more(sources, base, tmp_path):
    for name in "abc":
        shutil.copytree(sources / name, tmp_path / name)
    budget = 3 * block_size(sources / "a")
    registry = registry_of(tmp_path, base, budget, prefault=True)
    assert registry.slab.stats() == SlabStats(budget, budget, 0, 0, 0)
    adapters = [registry.get(name) for name in "abc"]
    assert all(in_slab(a, registry.slab) for a in adapters)
    assert registry.slab.stats() == SlabStats(budget, budget, budget, 3, 0) and len(registry.slab._chunks) == 1
    assert [a.content_hash for a in adapters] == [file_digest(tmp_path / name) for name in "abc"]


def test_a_cache_fits_an_adapter_in_the_space_two_evicted_ones_leave(sources, base, tmp_path, monkeypatch):
    # Made on demand the slab is separate chunks (here one per adapter): an adapter larger
    # than any chunk was read into new memory beside them; the evicted adapters' chunks are
    # unmapped for one of its size. Prefaulted it is one run, which evictions free contiguously.
    monkeypatch.setattr("tandem.server.adapters.host_slab.MAX_CHUNK_BYTES", ALIGN)
    monkeypatch.setattr("tandem.server.adapters.host_slab.MIN_CHUNK_BYTES", ALIGN)
    for name in ("a", "b", "big"):
        shutil.copytree(sources / name, tmp_path / name)
    budget = max(2 * block_size(sources / "a"), block_size(sources / "big"))
    assert block_size(sources / "big") > block_size(sources / "a")
    for prefault in (False, True):
        registry = registry_of(tmp_path, base, budget, prefault=prefault)
        registry.get("a"), registry.get("b")
        big = registry.get("big")
        assert in_slab(big, registry.slab) and list(registry._cache) == ["big"]
        assert registry.slab.stats().mapped <= budget


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_adapter_is_held_as_its_file_and_loads_the_slot_float32_would(sources, base, tmp_path, dtype):
    """Most hub adapters ship in bfloat16: held as float32 copies they took twice the file's
    memory outside the slab (the slab block freed at once), so the cache held half as many.
    The slot gets the same numbers as from the file converted to float32."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(sources / "a" / WEIGHTS_FILE)
    for name, tensor_dtype in (("half", dtype), ("full", torch.float32)):
        (tmp_path / name).mkdir()
        shutil.copy(sources / "a" / CONFIG_FILE, tmp_path / name / CONFIG_FILE)
        save_file({k: v.to(dtype).to(tensor_dtype) for k, v in tensors.items()}, tmp_path / name / WEIGHTS_FILE)
    registry = registry_of(tmp_path, base, 4 * block_size(sources / "a"))
    half = registry.get("half")
    held = [t for g in half.groups.values() for a, b, _ in g.slices.values() for t in (a, b)]
    assert in_slab(half, registry.slab) and {t.dtype for t in held} == {dtype}
    assert half.nbytes == sum(v.numel() for v in tensors.values()) * 2 and half.float32_bytes == 2 * half.nbytes
    pool = registry.pool
    slots = [pool.acquire(registry.get(name)) for name in ("half", "full")]
    for w in pool.weights.values():
        assert torch.equal(w.a[slots[0]], w.a[slots[1]]) and torch.equal(w.b[slots[0]], w.b[slots[1]])


def test_a_slab_grown_on_demand_says_which_blocks_could_ever_fit():
    """Chunks made on demand are unmapped for a larger block once no block uses them: any
    block up to the capacity could fit, none past it; a chunk is remapped only in room that
    chunks no block uses leave."""
    slab = HostSlab(3 << 20)
    blocks = [slab.block(600 << 10) for _ in range(3)]  # each in a 1 MiB chunk of its own
    assert all(b is not None for b in blocks) and slab.stats().mapped == 3 << 20
    assert slab.could_hold(3 << 20) and not slab.could_hold((3 << 20) + 1)
    assert not slab.can_remap(1) and slab.remap_block(1) is None
    del blocks[:2]
    assert slab.can_remap(2 << 20) and not slab.can_remap((2 << 20) + 1)
    assert slab.remap_block(2 << 20) is not None and slab.stats().mapped == 3 << 20


def test_chunks_made_on_demand_are_remapped_for_a_larger_block_within_the_budget(monkeypatch):
    """With --adapter-cache-prefault false, five 10 MB reads left a 64 MB slab chunks of 10,
    10, 20 and 24 MB, kept for good: once every block was given back a 30 MB read fit none
    of them and took new memory beside them, the host holding up to twice the budget."""
    mb, made = 1 << 20, []
    slab = HostSlab(64 * mb)

    def chunk(size: int, pin: bool):
        assert sum(c.size for c in (ref() for ref in made) if c is not None) + size <= slab.capacity
        made.append(weakref.ref(new := real_chunk(size, pin)))
        return new

    real_chunk = host_slab._Chunk
    monkeypatch.setattr(host_slab, "_Chunk", chunk)
    blocks = [slab.block(10 * mb) for _ in range(5)]
    assert [c.size for c in slab._chunks] == [10 * mb, 10 * mb, 20 * mb, 24 * mb]
    del blocks
    assert slab.block(30 * mb) is None and slab.could_hold(30 * mb)
    block = slab.remap_block(30 * mb)
    assert block is not None and len(block) == 30 * mb
    assert sorted(c.size for c in slab._chunks) == [10 * mb, 10 * mb, 30 * mb]
    assert sum(ref() is not None for ref in made) == 3 and slab.stats().mapped <= slab.capacity


@pytest.mark.parametrize("refusal", [MemoryError(), torch.OutOfMemoryError("CUDA error: out of memory")], ids=["python", "torch"])
def test_a_read_the_host_has_no_memory_for_is_resource_exhausted(sources, base, tmp_path, monkeypatch, refusal):
    """A MemoryError (or torch's, for page-locked memory on CUDA) taking the read's memory
    reached the caller as INTERNAL."""
    shutil.copytree(sources / "a", tmp_path / "a")
    registry = registry_of(tmp_path, base, 2 * block_size(sources / "a"))

    def no_memory(size: int):
        raise refusal

    monkeypatch.setattr(registry.slab, "block", no_memory)
    with pytest.raises(ResourceExhausted, match="not enough host memory to read adapter 'a' .*--adapter-cache-bytes") as info:
        registry.get("a")
    assert status_for(info.value, "r")[0] == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_read_no_eviction_could_make_room_for_evicts_nothing(sources, base, tmp_path):
    """A file larger than the whole cache (here a corrupt one) emptied the cache of every
    adapter not in use to make room it could never make, and then was refused."""
    for name in "ab":
        shutil.copytree(sources / name, tmp_path / name)
    shutil.copytree(sources / "a", tmp_path / "bad")
    registry = registry_of(tmp_path, base, 2 * block_size(sources / "a"))
    registry.get("a")
    registry.get("b")
    (tmp_path / "bad" / WEIGHTS_FILE).write_bytes(b"\xff" * (4 * registry.host_bytes))
    with pytest.raises(IncompatibleAdapter, match="corrupt adapter_model.safetensors"):
        registry.get("bad")
    assert list(registry._cache) == ["a", "b"] and registry.host_evictions == 0
