"""Adapters through the engine: more adapters in use than device slots, starvation, preemption,
the host cache's budget, and reloading an adapter while a request still uses the old version.

The oracle for every output is the same request run alone (greedy, float32) on an engine
with enough slots for every adapter."""

import gc
import math
import os
import shutil
import threading
import weakref
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tandem.kernels.lora import LoRABatch, lora_delta, native_cpu
from tandem.kernels.lora.mixture import lora_delta_mixture
from tandem.server.adapters.mixture import Mixture
from tandem.server.adapters.peft_format import LoRAAdapter, read_adapter
from tandem.server.adapters import slot_pool as slot_pool_module
from tandem.server.adapters.slot_pool import SlotPool
from tandem.server.engine.kv_cache import KVCache
from tandem.server.engine.sampling_params import SamplingParams
from tandem.server.engine.sequence import SequenceStatus
from tandem.server.model.loader import build_from_hf
from tests.adapters.make_adapters import ALL_LINEAR, make_adapter, weights_file
from tests.conftest import make_tiny_hf_model
from tests.engine.helpers import make_engine, random_prompts

MAX_RANK = 16
# Mixed ranks and target sets, one rsLoRA, one with per-module rank and alpha patterns.
ADAPTERS = {
    "attn4": dict(r=4),
    "all8": dict(r=8, target_modules=ALL_LINEAR),
    "qv2rs": dict(r=2, target_modules=["q_proj", "v_proj"], use_rslora=True),
    "pattern": dict(r=4, target_modules=ALL_LINEAR, rank_pattern={"down_proj": 8}, alpha_pattern={"o_proj": 32}),
    "mlp16": dict(r=16, target_modules=["gate_proj", "up_proj", "down_proj"]),
}
NAMES = list(ADAPTERS)
KV_CACHE_BYTES = 8 << 20
# Three more of one shape (equal sizes in the host cache), different weights.
SAME_SIZE = ("same0", "same1", "same2")
Request = tuple[str, list[int], SamplingParams, str | None]


def adapter_engine(tiny_hf_model, tokenizer, adapters_dir: Path, **config):
    config = dict(kv_cache_bytes=KV_CACHE_BYTES, max_lora_rank=MAX_RANK, **config)
    return make_engine(tiny_hf_model, tokenizer, adapters_dir=str(adapters_dir), **config)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory, tiny_hf_model) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    for seed, (name, options) in enumerate(ADAPTERS.items()):
        make_adapter(tiny_hf_model, root / name, seed=seed, **options)
    for seed, name in enumerate(SAME_SIZE, start=10):
        make_adapter(tiny_hf_model, root / name, seed=seed, **ADAPTERS["all8"])
    return root


@pytest.fixture(scope="module")
def alone(tiny_hf_model, smollm2_tokenizer, adapters_dir):
    """Output of one request run alone on an engine with a slot for every adapter (memoised)."""
    engine = adapter_engine(tiny_hf_model, smollm2_tokenizer, adapters_dir, max_loras=8)
    cache: dict[tuple, list[int]] = {}

    def reference(prompt: list[int], n: int, adapter: str | None) -> list[int]:
        key = (tuple(prompt), n, adapter)
        if key not in cache:
            cache[key] = run(engine, {0: [("ref", prompt, greedy(n), adapter)]})[0]["ref"]
        return cache[key]

    return reference


def run(engine, arrivals: dict[int, list[Request]], on_step=None, max_steps: int = 2000):
    """Step the engine, adding requests (by adapter name) at the given steps.

    Returns generated ids per request and the step at which each finished."""
    outputs: dict[str, list[int]] = {}
    finished_at: dict[str, int] = {}
    step = 0
    while step <= max(arrivals) or engine.has_work():
        assert step < max_steps, "the engine did not finish its requests"
        for rid, ids, params, name in arrivals.get(step, []):
            engine.add_request(rid, ids, params, None if name is None else engine.registry.get(name))
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.token_ids)
            if out.finished:
                finished_at[out.request_id] = step
        if on_step is not None:
            on_step(engine)
        step += 1
    return outputs, finished_at


def check_slots(engine) -> None:
    """Every running sequence's slot holds its exact adapter version, and pins count them."""
    pool = engine.registry.pool
    for seq in engine.scheduler.waiting:
        assert seq.slot is None
    for seq in engine.scheduler.running:
        if seq.adapter is None:
            assert seq.slot is None
        else:
            assert pool._owner[seq.slot] == seq.adapter.content_hash
    users = Counter(seq.slot for seq in engine.scheduler.running if seq.slot is not None)
    assert pool._pins == [users[s] for s in range(pool.num_slots)]
    assert engine.registry.slot_stats().slots_in_use <= pool.num_slots


def guard_evictions(engine) -> list[int]:
    """Fail at once if the pool ever loads into a slot a running sequence uses; returns loaded slots."""
    pool = engine.registry.pool
    load = pool._load
    loaded = []

    def checked_load(slot, adapter, *stream):
        assert pool._pins[slot] == 0, f"slot {slot} is pinned"
        assert all(seq.slot != slot for seq in engine.scheduler.running), f"slot {slot} belongs to a running sequence"
        loaded.append(slot)
        load(slot, adapter, *stream)

    pool._load = checked_load
    return loaded


def assert_clean(engine) -> None:
    assert not engine.has_work()
    assert engine.allocator.num_free == engine.allocator.num_blocks
    assert engine.registry.pool._pins == [0] * engine.registry.pool.num_slots
    assert engine.registry._in_use == {}
    assert all(info.in_use == 0 for info in engine.registry.list())


def test_adapters_change_outputs(alone, smollm2_tokenizer):
    """The oracle is worth something: each adapter's greedy output differs from the base's and each other's."""
    prompt = random_prompts([8], len(smollm2_tokenizer), seed=5)[0]
    outputs = [tuple(alone(prompt, 8, name)) for name in [None, *NAMES]]
    assert len(set(outputs)) == len(outputs)


def test_more_adapters_than_slots(tiny_hf_model, smollm2_tokenizer, adapters_dir, alone):
    engine = adapter_engine(
        tiny_hf_model, smollm2_tokenizer, adapters_dir, max_loras=2,
        max_num_batched_tokens=48, block_size=8,
    )
    assert engine.registry.pool.num_slots == 2
    loaded = guard_evictions(engine)
    vocab = len(smollm2_tokenizer)
    prompts = random_prompts([5, 11, 7, 14, 9, 6, 12, 8, 10, 13, 4], vocab, seed=2)
    lengths = [9, 6, 12, 7, 10, 8, 5, 11, 6, 9, 7]
    # A first wave with every adapter and a base request, then a second wave in the reverse order.
    names = [*NAMES, None, *reversed(NAMES)]
    requests = [(f"r{i}", p, greedy(n), name) for i, (p, n, name) in enumerate(zip(prompts, lengths, names))]
    outputs, _ = run(engine, {0: requests[:6], 4: requests[6:]}, on_step=check_slots)
    for rid, prompt, params, name in requests:
        assert outputs[rid] == alone(prompt, params.max_new_tokens, name), (rid, name)
    stats = engine.registry.slot_stats()
    assert stats.evictions > 0 and stats.loads == len(loaded) >= len(NAMES)
    assert stats.slots_in_use == 2
    assert_clean(engine)


@pytest.mark.parametrize("prefetch_ahead", [0, 4], ids=["off", "on"])
def test_prefetch_loads_adapters_before_their_sequences_run(
    tiny_hf_model, smollm2_tokenizer, adapters_dir, alone, prefetch_ahead
):
    # Sequences wait for a running place (max_num_seqs 2) while slots are free: with
    # prefetch on, their adapters are loaded during earlier iterations (on CUDA, overlapping
    # them), so admission finds them resident; outputs are the same either way.
    engine = adapter_engine(tiny_hf_model, smollm2_tokenizer, adapters_dir, max_loras=4, max_num_seqs=2, block_size=8)
    pool = engine.registry.pool
    pool.prefetch_ahead = prefetch_ahead  # off by default on CPU, where nothing overlaps
    loaded = guard_evictions(engine)
    acquire, misses = pool.acquire, []

    def counted_acquire(adapter):
        misses.append(not pool.resident(adapter.content_hash))
        return acquire(adapter)

    pool.acquire = counted_acquire
    prompts = random_prompts([6, 9, 5, 8, 7, 10, 6], len(smollm2_tokenizer), seed=4)
    names = [*NAMES, "attn4", "same0"]
    requests = [(f"r{i}", p, greedy(6), name) for i, (p, name) in enumerate(zip(prompts, names))]
    outputs, _ = run(engine, {0: requests}, on_step=check_slots)
    for rid, prompt, params, name in requests:
        assert outputs[rid] == alone(prompt, params.max_new_tokens, name), (rid, name)
    stats = engine.registry.slot_stats()
    assert stats.loads == len(loaded) and stats.evictions > 0
    if prefetch_ahead:
        # Only the first two, admitted before any iteration ran, are loaded on admission.
        assert sum(misses) == 2 and stats.prefetches == stats.loads - 2
    else:
        assert sum(misses) == stats.loads and stats.prefetches == 0
    assert_clean(engine)


def test_an_unpopular_adapter_is_not_starved(tiny_hf_model, smollm2_tokenizer, adapters_dir, alone):
    """Two popular adapters take both slots with a new request every step; the third adapter
    still gets a slot within a few request lifetimes."""
    engine = adapter_engine(tiny_hf_model, smollm2_tokenizer, adapters_dir, max_loras=2)
    guard_evictions(engine)
    vocab = len(smollm2_tokenizer)
    n = 6
    stream = random_prompts([5] * 60, vocab, seed=3)
    arrivals = {step: [(f"p{step}", stream[step], greedy(n), NAMES[step % 2])] for step in range(60)}
    rare_prompt = random_prompts([7], vocab, seed=4)[0]
    arrivals[3].append(("rare", rare_prompt, greedy(n), NAMES[4]))
    outputs, finished_at = run(engine, arrivals, on_step=check_slots)
    assert finished_at["rare"] - 3 <= 3 * (n + 2)
    assert outputs["rare"] == alone(rare_prompt, n, NAMES[4])
    # The popular stream went on after the unpopular request (nothing stalled for good).
    assert max(finished_at.values()) > finished_at["rare"] and len(finished_at) == 61
    for step in (0, 1, 30, 59):
        assert outputs[f"p{step}"] == alone(stream[step], n, NAMES[step % 2])
    assert_clean(engine)


def test_preemption_with_adapters(tiny_hf_model, smollm2_tokenizer, adapters_dir, alone):
    shape = build_from_hf(tiny_hf_model, torch.float32, torch.device("cpu")).shape
    block_bytes = KVCache.bytes_per_block(shape, 4, torch.float32)
    engine = make_engine(
        tiny_hf_model, smollm2_tokenizer, adapters_dir=str(adapters_dir), max_lora_rank=MAX_RANK, max_loras=3,
        block_size=4, kv_cache_bytes=12 * block_bytes, max_num_batched_tokens=16,
    )
    guard_evictions(engine)
    preempt, preempted = engine.scheduler._preempt, []

    def recording_preempt(seq):
        preempted.append(seq.adapter is not None)
        preempt(seq)

    engine.scheduler._preempt = recording_preempt
    prompts = random_prompts([8, 6, 9, 7, 10, 5, 8, 6], len(smollm2_tokenizer), seed=6)
    names = [NAMES[0], NAMES[1], None, NAMES[2], NAMES[0], NAMES[3], NAMES[1], NAMES[4]]
    requests = [(f"r{i}", p, greedy(12), name) for i, (p, name) in enumerate(zip(prompts, names))]
    outputs, _ = run(engine, {0: requests}, on_step=check_slots)
    assert any(preempted) and engine.scheduler.num_preemptions == len(preempted)
    for rid, prompt, params, name in requests:
        assert outputs[rid] == alone(prompt, params.max_new_tokens, name), (rid, name)
    assert_clean(engine)


def test_host_cache_evicts_the_least_recent_unused_adapter(tiny_hf_model, smollm2_tokenizer, tmp_path, alone, adapters_dir):
    for name, source in zip("abc", SAME_SIZE):
        shutil.copytree(adapters_dir / source, tmp_path / name)
    base = build_from_hf(tiny_hf_model, torch.float32, torch.device("cpu"))
    size = read_adapter("a", tmp_path / "a", base, MAX_RANK).nbytes
    engine = adapter_engine(
        tiny_hf_model, smollm2_tokenizer, tmp_path, max_loras=2,
        adapter_cache_bytes=size * 3 // 2,
    )
    registry = engine.registry

    def cached() -> list[str]:
        return list(registry._cache)

    registry.get("a")
    registry.get("b")
    assert cached() == ["b"] and registry.host_evictions == 1
    registry.get("c")
    assert cached() == ["c"] and registry.host_evictions == 2
    a = registry.get("a")
    assert cached() == ["a"] and registry.host_evictions == 3
    prompt = random_prompts([6], len(smollm2_tokenizer), seed=7)[0]
    engine.add_request("uses-a", prompt, greedy(6), a)
    # a is pinned by its request, and b was just read for a request that will pin it:
    # both stay, over budget, until they are no longer in use.
    b = registry.get("b")
    assert cached() == ["a", "b"] and registry.host_evictions == 3
    engine.add_request("uses-b", prompt, greedy(6), b)
    registry.get("c")
    assert cached() == ["a", "b", "c"]
    assert {i.name: i.in_use for i in registry.list()} == {"a": 1, "b": 1, "c": 0}
    outputs = {}
    while engine.has_work():
        assert "a" in cached()
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.token_ids)
    assert outputs == {"uses-a": alone(prompt, 6, SAME_SIZE[0]), "uses-b": alone(prompt, 6, SAME_SIZE[1])}
    assert sum(registry._cache[n].nbytes for n in cached()) <= size * 3 // 2
    assert_clean(engine)


def test_an_adapter_loaded_from_a_path_is_read_from_there_again_after_eviction(tiny_hf_model, smollm2_tokenizer, tmp_path, adapters_dir):
    for name, source in zip(("a", "v2", "b"), SAME_SIZE):
        shutil.copytree(adapters_dir / source, tmp_path / name)
    engine = adapter_engine(tiny_hf_model, smollm2_tokenizer, tmp_path, max_loras=2, adapter_cache_bytes=1)
    registry = engine.registry
    loaded = registry.load("a", "v2")
    registry.get("b")
    assert list(registry._cache) == ["b"]  # a was evicted: a cache of one adapter
    again = registry.get("a")
    assert again.content_hash == loaded.content_hash and again.path == (tmp_path / "v2").resolve()
    assert {i.name: i.path for i in registry.list()} == {"a": "v2", "b": "b"}


def test_reload_keeps_versions_apart(tiny_hf_model, smollm2_tokenizer, tmp_path, alone, adapters_dir):
    """A request holds the version it started with; after a reload new requests get the new one."""
    old, new = adapters_dir / NAMES[1], adapters_dir / NAMES[3]
    shutil.copytree(old, tmp_path / "live")
    engine = adapter_engine(
        tiny_hf_model, smollm2_tokenizer, tmp_path, max_loras=2, max_num_seqs=2
    )
    guard_evictions(engine)
    registry = engine.registry
    prompts = random_prompts([7, 9, 8, 6], len(smollm2_tokenizer), seed=8)
    first = registry.get("live")
    engine.add_request("running", prompts[0], greedy(10), first)
    outputs: dict[str, list[int]] = {}

    def step() -> None:
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.token_ids)
        check_slots(engine)

    for _ in range(3):
        step()
    engine.add_request("base", prompts[1], greedy(10), None)
    engine.add_request("queued", prompts[2], greedy(10), registry.get("live"))
    step()
    assert engine.scheduler.find("queued").status is SequenceStatus.WAITING
    assert len(outputs["running"]) == 4

    for f in new.iterdir():
        shutil.copy(f, tmp_path / "live" / f.name)
    info = registry.load("live")
    assert info.content_hash != first.content_hash
    assert [(i.name, i.content_hash, i.rank) for i in registry.list()] == [("live", info.content_hash, 8)]
    engine.add_request("after", prompts[3], greedy(10), registry.get("live"))
    while engine.has_work():
        step()
    assert outputs["running"] == alone(prompts[0], 10, NAMES[1])
    assert outputs["queued"] == alone(prompts[2], 10, NAMES[1])
    assert outputs["after"] == alone(prompts[3], 10, NAMES[3])
    assert outputs["base"] == alone(prompts[1], 10, None)
    assert engine.registry.pool.resident(first.content_hash) and registry.get("live").content_hash == info.content_hash
    assert_clean(engine)


def test_new_adapters_fill_gaps_between_pinned_slots(tiny_hf_model):
    # The CPU path streams every slot between the first and last one a step uses, so a new
    # adapter goes into an unpinned slot inside that span (least recently used first) before
    # one that widens it, even when the slot outside is less recently used.
    pool = SlotPool(build_from_hf(tiny_hf_model, torch.float32, torch.device("cpu")), 6, 4, torch.float32, torch.device("cpu"))

    def adapter(name: str) -> LoRAAdapter:
        return LoRAAdapter(name, Path(name), f"hash-{name}", 4, [], {})

    names = [f"a{i}" for i in range(6)]
    assert [pool.acquire(adapter(n)) for n in names] == list(range(6))
    for slot in range(6):
        pool.release(slot)
    assert [pool.acquire(adapter(n)) for n in names[1:5]] == [1, 2, 3, 4]  # LRU order: 0, 5, 1, 2, 3, 4
    pool.release(2)
    pool.release(3)
    assert pool.acquire(adapter("b")) == 2
    assert pool.acquire(adapter("c")) == 3
    assert pool.acquire(adapter("d")) == 0
    assert not pool.resident("hash-a2") and pool.resident("hash-a5")


def test_a_mixture_whose_expert_fails_to_load_keeps_no_pin(tiny_hf_model):
    """Its experts are pinned one by one: those pinned before the failed load are unpinned,
    or their slots could never be evicted again."""
    pool = SlotPool(build_from_hf(tiny_hf_model, torch.float32, torch.device("cpu")), 3, 4, torch.float32, torch.device("cpu"))
    experts = [LoRAAdapter(n, Path(n), f"hash-{n}", 4, [], {}) for n in ("a", "b")]
    load = pool._load

    def failing(slot, adapter, stream=None):
        if adapter.name == "b":
            raise torch.OutOfMemoryError("simulated")
        load(slot, adapter, stream)

    pool._load = failing
    with pytest.raises(torch.OutOfMemoryError):
        pool.acquire(Mixture(tuple(experts), (0.5, 0.5)))
    assert pool._pins == [0, 0, 0]
    pool._load = load
    slots = pool.acquire(Mixture(tuple(experts), (0.5, 0.5)))
    pool.release(slots)
    assert pool._pins == [0, 0, 0]


def test_a_load_that_fails_leaves_its_slot_empty_not_named_for_the_adapter_it_evicted(tiny_hf_model, monkeypatch):
    """The evicted adapter's mapping went before the copy and the slot's owner only after
    it: a copy that raised (out of memory) left the slot named for the adapter it no longer
    held, and every later eviction of it raised KeyError (INTERNAL for every cold load)."""
    from tandem.server.adapters import slot_pool

    pool = SlotPool(build_from_hf(tiny_hf_model, torch.float32, torch.device("cpu")), 2, 4, torch.float32, torch.device("cpu"))

    def adapter(name: str) -> LoRAAdapter:
        return LoRAAdapter(name, Path(name), f"hash-{name}", 4, [], {})

    for slot in (pool.acquire(adapter("a0")), pool.acquire(adapter("a1"))):
        pool.release(slot)
    dense = slot_pool.dense_slices

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(slot_pool, "dense_slices", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        pool.acquire(adapter("b"))
    assert not pool.resident("hash-a0") and not pool.resident("hash-b") and pool.resident("hash-a1")
    assert pool.stats().slots_in_use == 1
    monkeypatch.setattr(slot_pool, "dense_slices", dense)
    for name in ("b", "c", "a0"):
        pool.release(pool.acquire(adapter(name)))
    assert [pool.resident(f"hash-{n}") for n in ("a0", "a1", "b", "c")] == [True, False, False, True]
    assert pool._pins == [0, 0]


def test_a_mixture_reads_the_adapter_a_slot_holds_now_after_a_reload(tiny_hf_model, tmp_path):
    """The native CPU load wrote the pools without bumping their versions: a mixture's
    stacked weights, cached by version, went on serving the evicted adapter (off by ~20)."""
    model = build_from_hf(tiny_hf_model, torch.float32, torch.device("cpu"))
    adapters = [read_adapter(n, make_adapter(tiny_hf_model, tmp_path / n, r=4, seed=i, b_std=0.5), model, MAX_RANK) for i, n in enumerate("ab")]
    pool = SlotPool(model, 1, MAX_RANK, torch.float32, torch.device("cpu"))
    key = next(iter(pool.weights))
    w = pool.weights[key]
    xs, mix = torch.randn(3, w.in_features, generator=torch.Generator().manual_seed(0)), torch.ones(3, 1)
    for adapter in adapters:
        slot = pool.acquire(adapter)
        served = lora_delta_mixture(xs, w, (slot,), adapter.groups[key].rank, mix)
        want = torch.zeros_like(served)
        lora_delta(xs, w, LoRABatch.build([slot] * 3, 1), want)
        torch.testing.assert_close(served, want, rtol=1e-4, atol=1e-4)
        pool.release(slot)


def test_prefetch_loads_upcoming_adapters_without_evicting_pinned_or_upcoming(tiny_hf_model):
    pool = SlotPool(build_from_hf(tiny_hf_model, torch.float32, torch.device("cpu")), 3, 4, torch.float32, torch.device("cpu"))

    def adapter(name: str) -> LoRAAdapter:
        return LoRAAdapter(name, Path(name), f"hash-{name}", 4, [], {})

    running, upcoming = adapter("running"), adapter("upcoming")
    assert [pool.acquire(running), pool.acquire(upcoming), pool.acquire(adapter("old"))] == [0, 1, 2]
    pool.release(1)
    pool.release(2)
    # Slot 1 (unpinned, least recently used) holds an upcoming adapter: only slot 2 may go.
    assert pool.prefetch([upcoming, adapter("new"), adapter("newer")]) == 1
    assert pool.resident("hash-new") and pool.resident("hash-upcoming") and not pool.resident("hash-old")
    loads = pool.loads
    assert pool.acquire(adapter("new")) == 2 and pool.loads == loads
    assert pool.prefetch([adapter("newer")]) == 1  # slot 1 is no longer kept for anyone
    # Slots 0 and 2 are pinned, slot 1 holds "newer", which comes first: nothing to evict.
    assert pool.prefetch([adapter("newer"), adapter("newest")]) == 0
    assert pool.resident("hash-newer") and pool.stats().prefetches == 2
    assert 0 < pool.stats().load_seconds_total < 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_prefetch_copies_on_a_side_stream_and_acquire_waits_for_it(tiny_hf_model, adapters_dir):
    model = build_from_hf(tiny_hf_model, torch.float32, torch.device("cpu"))
    pool = SlotPool(model, 2, MAX_RANK, torch.float32, torch.device("cuda"))
    assert pool.prefetch_ahead > 0
    adapter = read_adapter("all8", adapters_dir / "all8", model, MAX_RANK).pin_memory()
    assert pool.prefetch([adapter]) == 1 and pool._pending
    slot = pool.acquire(adapter)
    assert not pool._pending
    for key, delta in adapter.groups.items():
        w = pool.weights[key]
        a_slot = w.a[slot].view(w.num_slices, MAX_RANK, -1).cpu()
        for s, (a, b, scale) in delta.slices.items():
            start = sum(w.out_slices[:s])
            assert torch.equal(a_slot[s, : a.shape[0]], a)
            torch.testing.assert_close(w.b[slot][start : start + b.shape[0], : b.shape[1]].cpu(), b * scale)
        assert int(w.slot_ranks[slot]) == delta.rank == w.host_ranks[slot]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_prefetch_holds_the_adapter_until_its_copy_has_read_it(tiny_hf_model, adapters_dir):
    # The copy reads the adapter's host block, which the slab reuses once nothing views it:
    # a waiting request aborted mid-copy must not free it under the copy.
    model = build_from_hf(tiny_hf_model, torch.float32, torch.device("cpu"))
    pool = SlotPool(model, 2, MAX_RANK, torch.float32, torch.device("cuda"))
    adapter = read_adapter("all8", adapters_dir / "all8", model, MAX_RANK).pin_memory()
    alive = weakref.ref(adapter)
    assert pool.prefetch([adapter]) == 1
    del adapter
    gc.collect()
    assert alive() is not None
    torch.cuda.synchronize()
    pool.prefetch([])
    gc.collect()
    assert alive() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_a_load_that_fails_halfway_is_still_waited_for(tiny_hf_model, adapters_dir, monkeypatch):
    """A prefetch that ran out of memory after queueing some copies (Engine._prefetch logs it
    and serving goes on) left them untracked: the slot's next load raced them, and the
    adapter's host bytes could be reused under them."""
    model = build_from_hf(tiny_hf_model, torch.float32, torch.device("cpu"))
    pool = SlotPool(model, 1, MAX_RANK, torch.float32, torch.device("cuda"))
    adapter = read_adapter("all8", adapters_dir / "all8", model, MAX_RANK).pin_memory()
    real = slot_pool_module.staged

    def failing(slices, device):
        yield from real(slices, device)[:1]
        raise torch.OutOfMemoryError("staging")

    monkeypatch.setattr(slot_pool_module, "staged", failing)
    with pytest.raises(torch.OutOfMemoryError):
        pool.prefetch([adapter])
    assert 0 in pool._pending and [a for _, a in pool._in_flight] == [adapter]
    assert not pool.resident(adapter.content_hash)


def test_a_cached_adapter_keeps_its_weights_when_its_file_is_overwritten_in_place(tiny_hf_model, adapters_dir, tmp_path):
    # `cp new.safetensors old.safetensors` rewrites the file in place: the version already
    # read must keep its own weights (same size: no silent swap; smaller: no crash).
    model = build_from_hf(tiny_hf_model, torch.float32, torch.device("cpu"))
    path = shutil.copytree(adapters_dir / "all8", tmp_path / "x")
    weights, other = path / "adapter_model.safetensors", adapters_dir / "same0" / "adapter_model.safetensors"
    assert weights.stat().st_size == other.stat().st_size
    adapter = read_adapter("x", path, model, MAX_RANK)

    def snapshot() -> dict:
        return {(key, s): (a.clone(), b.clone()) for key, g in adapter.groups.items() for s, (a, b, _) in g.slices.items()}

    before = snapshot()
    with open(weights, "r+b") as f:
        f.write(other.read_bytes())
    after = snapshot()
    assert all(torch.equal(before[k][0], after[k][0]) and torch.equal(before[k][1], after[k][1]) for k in before)
    os.truncate(weights, 100)
    pool = SlotPool(model, 1, MAX_RANK, torch.float32, torch.device("cpu"))
    slot = pool.acquire(adapter)
    a_q = before[((0, "qkv"), 0)][0]
    assert torch.equal(pool.weights[(0, "qkv")].a[slot, : a_q.shape[0]], a_q)


def test_on_cuda_new_adapters_take_empty_slots_then_the_least_recently_used(tiny_hf_model):
    # The Triton kernels read only the slots a step uses: no reason to evict a warm adapter
    # while a slot is empty.
    pool = SlotPool(build_from_hf(tiny_hf_model, torch.float32, torch.device("cpu")), 4, 4, torch.float32, torch.device("cpu"))
    pool.compact_slots = False  # what a CUDA pool does

    def adapter(name: str) -> LoRAAdapter:
        return LoRAAdapter(name, Path(name), f"hash-{name}", 4, [], {})

    assert [pool.acquire(adapter(n)) for n in "abc"] == [0, 1, 2]
    pool.release(1)
    assert pool.acquire(adapter("d")) == 3 and pool.resident("hash-b")
    pool.release(0)
    assert pool.acquire(adapter("e")) == 0  # a was used before b
    assert pool.resident("hash-b") and not pool.resident("hash-a")


def test_a_half_precision_pool_rounds_scaled_b_once(tiny_hf_model, adapters_dir):
    model = build_from_hf(tiny_hf_model, torch.float32, torch.device("cpu"))
    adapter = read_adapter("qv2rs", adapters_dir / "qv2rs", model, MAX_RANK)  # rsLoRA: scale alpha / sqrt(r)
    pool = SlotPool(model, 1, MAX_RANK, torch.bfloat16, torch.device("cpu"))
    slot = pool.acquire(adapter)
    a, b, scale = adapter.groups[(0, "qkv")].slices[0]
    assert scale not in (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
    assert torch.equal(pool.weights[(0, "qkv")].b[slot, : b.shape[0], : b.shape[1]], (b * scale).bfloat16())


@pytest.mark.skipif(native_cpu.library() is None, reason="no C compiler to build the native kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_native_slot_load_writes_what_torch_copies_write(smollm2_tokenizer, tmp_path, monkeypatch, dtype):
    """One C call loads a slot on CPU (native_cpu.load_slot); it must write the bits the torch
    copies write: per-projection ranks and scales, projections left out, widths that are not a
    multiple of 16, scaled values that are bfloat16 denormals, and nothing outside the slot."""
    hf = make_tiny_hf_model(smollm2_tokenizer, hidden_size=72, intermediate_size=100)
    model = build_from_hf(hf, torch.float32, torch.device("cpu"))
    path = make_adapter(hf, tmp_path / "x", r=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                        rank_pattern={"v_proj": 3, "down_proj": 5}, alpha_pattern={"up_proj": 7}, use_rslora=True)
    tensors = load_file(weights_file(path))
    tensors["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"][:, 0] = 3e-39  # x 7/sqrt(8): a bf16 denormal
    save_file(tensors, weights_file(path))
    adapter = read_adapter("x", path, model, MAX_RANK)
    pools = []
    for native in (True, False):
        if not native:
            monkeypatch.setattr(native_cpu, "load_slot", lambda slot, slices: False)
        pool = SlotPool(model, 3, MAX_RANK, dtype, torch.device("cpu"))
        for w in pool.weights.values():
            w.a.fill_(math.nan)
            w.b.fill_(math.nan)
        pool._load(1, adapter)
        pools.append(pool)
    for key, w in pools[0].weights.items():
        torch_w = pools[1].weights[key]
        rank = w.host_ranks[1]
        assert rank == torch_w.host_ranks[1] == (adapter.groups[key].rank if key in adapter.groups else 0)
        read = (lambda p: p.a[1].view(p.num_slices, MAX_RANK, -1)[:, :rank], lambda p: p.b[1][:, :rank])
        for part in read:
            assert torch.equal(part(w), part(torch_w)), key
        assert w.a[[0, 2]].isnan().all() and w.b[[0, 2]].isnan().all(), "other slots must stay untouched"


@pytest.mark.skipif(native_cpu.library() is None, reason="no C compiler to build the native kernel")
def test_the_native_slot_load_refuses_slices_that_do_not_fit_and_writes_nothing(tiny_hf_model):
    """The C load writes where its pointers say: a rank past the pool's, a wrong input width,
    columns past the pool's outputs or a slot past its slots wrote outside the slot (or the
    pool), where torch's copies raise. It refuses them, and the caller's torch copy says why."""
    model = build_from_hf(tiny_hf_model, torch.float32, torch.device("cpu"))
    pool = SlotPool(model, 2, MAX_RANK, torch.float32, torch.device("cpu"))
    w = pool.weights[(0, "qkv")]
    before = (w.a.clone(), w.b.clone())
    fin, n = w.in_features, w.b.shape[1]
    good = (w, 0, 0, torch.ones(4, fin), torch.ones(w.out_slices[0], 4), 1.0)
    bad = [
        (0, (w, 0, 0, torch.ones(MAX_RANK + 1, fin), torch.ones(w.out_slices[0], MAX_RANK + 1), 1.0)),
        (0, (w, 0, 0, torch.ones(4, fin + 1), torch.ones(w.out_slices[0], 4), 1.0)),
        (0, (w, 0, n - 2, torch.ones(4, fin), torch.ones(w.out_slices[0], 4), 1.0)),
        (0, (w, 0, 0, torch.ones(4, fin), torch.ones(w.out_slices[0], 3), 1.0)),
        (0, (w, w.num_slices, 0, torch.ones(4, fin), torch.ones(w.out_slices[0], 4), 1.0)),
        (2, good),
    ]
    for slot, piece in bad:
        assert not native_cpu.load_slot(slot, [good, piece] if slot == 0 else [piece])
        assert torch.equal(w.a, before[0]) and torch.equal(w.b, before[1])
    assert native_cpu.load_slot(0, [good])


def test_a_burst_of_requests_for_an_uncached_adapter_reads_it_once(tiny_hf_model, smollm2_tokenizer, adapters_dir, tmp_path, monkeypatch):
    """The server resolves each request's adapter in a thread of its own: a burst for an
    adapter not in memory must share one read (and one failure), not read the file per request."""
    from tandem.server.adapters import registry as registry_module
    from tandem.server.errors import IncompatibleAdapter

    shutil.copytree(adapters_dir, tmp_path / "adapters")
    weights_file(tmp_path / "adapters" / "mlp16").write_bytes(b"not a safetensors file")
    engine = adapter_engine(tiny_hf_model, smollm2_tokenizer, tmp_path / "adapters")
    reads = Counter()
    read = registry_module.read_adapter
    joined = threading.Condition()
    waiters = 0

    class CountedFuture(Future):
        """A read in progress that counts the callers waiting on it."""

        def result(self, timeout=None):
            nonlocal waiters
            with joined:
                waiters += 1
                joined.notify_all()
            return super().result(timeout)

    def slow_read(name, *args, **kwargs):
        reads[name] += 1
        with joined:  # until the other two callers of each name wait on its read
            joined.wait_for(lambda: waiters == 4, timeout=30)
        return read(name, *args, **kwargs)

    monkeypatch.setattr(registry_module, "Future", CountedFuture)
    monkeypatch.setattr(registry_module, "read_adapter", slow_read)

    def get(name):
        try:
            return engine.registry.get(name)
        except IncompatibleAdapter as exc:
            return exc

    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(get, ["all8"] * 3 + ["mlp16"] * 3))
    assert reads == {"all8": 1, "mlp16": 1}
    assert all(a is got[0] for a in got[:3]) and isinstance(got[0], LoRAAdapter)
    assert all(isinstance(e, IncompatibleAdapter) and "mlp16" in str(e) for e in got[3:])
    assert engine.registry.get("all8") is got[0]  # cached: no read
    with pytest.raises(IncompatibleAdapter):  # a failed read is not remembered: asked again, read again
        engine.registry.get("mlp16")
    assert reads == {"all8": 1, "mlp16": 2}


def test_a_load_stages_an_adapters_tensors_in_one_copy(tiny_hf_model, adapters_dir):
    """On CUDA a load copies the span of the file's bytes that the adapter's tensors view once,
    then reads each slice from that copy: every slice must come back exactly, from one buffer.
    Here onto the CPU; tests/engine/test_cuda.py stages onto the GPU."""
    model = build_from_hf(tiny_hf_model, torch.float32, torch.device("cpu"))
    check_staged(read_adapter("pattern", adapters_dir / "pattern", model, MAX_RANK), torch.device("cpu"))


def check_staged(adapter: LoRAAdapter, device: torch.device) -> None:
    from tandem.server.adapters.compeft_format import dense_slices
    from tandem.server.adapters.slot_pool import staged

    dense = dense_slices(adapter)
    slices = [(key, s, 0, a, b, scale) for key, g in adapter.groups.items() for s, (_, _, scale) in g.slices.items()
              for a, b in [dense[(key, s)]]]
    out = staged(slices, device)
    storages = {t.untyped_storage().data_ptr() for *_, a, b, _ in out for t in (a, b)}
    assert len(storages) == 1 and storages.isdisjoint({slices[0][3].untyped_storage().data_ptr()})
    for before, after in zip(slices, out):
        assert before[:3] == after[:3] and before[5] == after[5] and after[3].device.type == device.type
        assert torch.equal(before[3], after[3].cpu()) and torch.equal(before[4], after[4].cpu())
    apart = [(k, s, c, a.clone(), b, scale) for k, s, c, a, b, scale in slices]  # not views of one buffer
    assert staged(apart, device) is apart


@pytest.mark.skipif(native_cpu.library() is None, reason="no C compiler to build the native kernel")
def test_a_reused_slot_serves_its_new_adapter_in_the_kernel(smollm2_tokenizer, tmp_path):
    """In a bfloat16 CPU pool, after a slot's adapter is evicted for one of other ranks and
    projections, the C kernel's delta over segments long and short is the new adapter's
    (torch's over the pool's own weights), never the old one's."""
    hf = make_tiny_hf_model(smollm2_tokenizer, hidden_size=72, intermediate_size=100)
    model = build_from_hf(hf, torch.float32, torch.device("cpu"))
    first = read_adapter("a", make_adapter(hf, tmp_path / "a", r=16, target_modules=ALL_LINEAR, seed=1), model, MAX_RANK)
    second = read_adapter("b", make_adapter(hf, tmp_path / "b", r=8, target_modules=["q_proj", "down_proj"],
                                           rank_pattern={"down_proj": 3}, seed=2), model, MAX_RANK)
    pool = SlotPool(model, 1, MAX_RANK, torch.bfloat16, torch.device("cpu"))
    torch.manual_seed(0)
    slots = [0] * 20 + [-1] * 3 + [0] * 3
    batch = LoRABatch.build(slots, 1)
    for adapter in (first, second):
        pool.acquire(adapter)
        pool.release(0)
        for key, w in pool.weights.items():
            x = torch.randn(len(slots), w.in_features).bfloat16()
            y = torch.randn(len(slots), w.out_features).bfloat16()
            expected = y.clone()
            lora_delta(x, w, batch, expected, backend="torch")
            lora_delta(x, w, batch, y)
            torch.testing.assert_close(y.float(), expected.float(), atol=2e-2, rtol=2e-2, msg=f"{adapter.name} {key}")
