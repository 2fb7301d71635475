"""Finish reasons, aborts and scheduling limits; no KV block is ever leaked."""

import gc
import weakref

import pytest
import torch

from tandem.server.config import EngineConfig
from tandem.server.engine.kv_cache import KVCache
from tandem.server.engine.llm_engine import Engine
from tandem.server.engine.outputs import FinishReason
from tandem.server.engine.sampling_params import SamplingParams
from tandem.server.errors import ResourceExhausted
from tandem.server.model.loader import LoadedModel
from tests.engine.helpers import make_engine, random_prompts


def drain(engine):
    finals = {}
    while engine.has_work():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    return finals


def test_finish_reasons(tiny_hf_model, smollm2_tokenizer):
    engine = make_engine(tiny_hf_model, smollm2_tokenizer)
    prompt = random_prompts([6], len(smollm2_tokenizer))[0]
    greedy = dict(temperature=0.0, ignore_eos=True)
    ids = []
    engine.add_request("len", prompt, SamplingParams(max_new_tokens=5, **greedy))
    while engine.has_work():
        for out in engine.step():
            ids += out.token_ids
            last = out
    assert last.finish_reason is FinishReason.LENGTH and last.generated_tokens == 5 == len(ids)

    engine.add_request("stop", prompt, SamplingParams(max_new_tokens=10, stop_token_ids=[ids[2]], **greedy))
    out = drain(engine)["stop"]
    assert out.finish_reason is FinishReason.STOP and out.generated_tokens == ids.index(ids[2]) + 1
    engine.eos_token_ids = {ids[2]}
    engine.add_request("eos", prompt, SamplingParams(max_new_tokens=10, temperature=0.0))
    assert drain(engine)["eos"].finish_reason is FinishReason.EOS
    engine.add_request("ignore", prompt, SamplingParams(max_new_tokens=10, **greedy))
    assert drain(engine)["ignore"].finish_reason is FinishReason.LENGTH


def test_aborts_and_preemptions_leak_no_blocks(tiny_hf_model, smollm2_tokenizer):
    shape = make_engine(tiny_hf_model, smollm2_tokenizer).runner.model.shape
    block_bytes = KVCache.bytes_per_block(shape, 4, torch.float32)
    engine = make_engine(tiny_hf_model, smollm2_tokenizer, block_size=4, kv_cache_bytes=20 * block_bytes, max_num_batched_tokens=24)
    prompts = random_prompts([9, 14, 3, 17, 8, 11, 5, 12], len(smollm2_tokenizer), seed=7)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(temperature=1.0, max_new_tokens=20, ignore_eos=True, seed=i))
    finals = {}
    step = 0
    while engine.has_work():
        if step == 3:
            (finals["r1"],) = engine.abort("r1")  # running
        if step == 4:
            (finals["r7"],) = engine.abort("r7")  # still waiting
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        step += 1
    assert engine.stats().num_preemptions > 0
    assert finals["r1"].finish_reason is FinishReason.ABORT
    assert finals["r7"].finish_reason is FinishReason.ABORT
    assert all(finals[f"r{i}"].finish_reason is FinishReason.LENGTH for i in (0, 2, 3, 4, 5, 6))
    assert engine.stats().num_free_blocks == engine.stats().num_total_blocks
    assert engine.abort("r1") == []


def test_token_budget_and_sequence_cap_are_respected(tiny_hf_model, smollm2_tokenizer):
    engine = make_engine(tiny_hf_model, smollm2_tokenizer, max_num_batched_tokens=10, max_num_seqs=3)
    for i, p in enumerate(random_prompts([25, 4, 4, 4, 4], len(smollm2_tokenizer))):
        engine.add_request(f"r{i}", p, SamplingParams(max_new_tokens=4, temperature=0.0))
    batches = []
    schedule = engine.scheduler.schedule

    def recording(budget=None):
        batch = schedule(budget)
        batches.append({c.seq.request_id: c.num_tokens for c in batch.inference})
        assert len(engine.scheduler.running) <= 3
        return batch

    engine.scheduler.schedule = recording
    finals = drain(engine)
    assert len(finals) == 5
    # The long prompt is chunked to the whole budget; FIFO means nobody jumps ahead of it.
    assert batches[0] == {"r0": 10}
    assert batches[1] == {"r0": 10}
    assert batches[2] == {"r0": 5, "r1": 4, "r2": 1}
    assert all(sum(b.values()) <= 10 for b in batches)
    assert max(len(b) for b in batches) == 3


def test_an_engine_dropped_frees_its_kv_cache_and_hooks(tiny_hf_model, smollm2_tokenizer):
    # Engines built one after another on one model (a benchmark's runs) must not keep the
    # earlier ones' KV caches alive through the hooks they put on the shared model.
    first = make_engine(tiny_hf_model, smollm2_tokenizer)
    loaded = LoadedModel(first.runner.model, smollm2_tokenizer, "test-model", "llama", [])
    cache = weakref.ref(first.runner.kv_cache)
    hooks = len(first.runner.model.norm._forward_pre_hooks)
    del first
    gc.collect()
    assert cache() is None
    second = Engine(loaded, EngineConfig())
    second.add_request("r", random_prompts([4], len(smollm2_tokenizer))[0], SamplingParams(max_new_tokens=2, temperature=0.0))
    drain(second)
    assert len(second.runner.model.norm._forward_pre_hooks) == hooks


def test_a_slot_load_that_fails_fails_its_request_alone(tiny_hf_model, smollm2_tokenizer, tmp_path):
    """The load's error left schedule(): a fork admitted before it in the same iteration lost
    its prompt's block copies (and decoded from stale keys), and the server failed every
    request. Now the request whose adapter cannot be loaded ends with the error (out of
    memory: RESOURCE_EXHAUSTED), holding nothing, and the iteration runs on with the others."""
    from tests.adapters.make_adapters import make_adapter

    make_adapter(tiny_hf_model, tmp_path / "a1", r=4, seed=1)
    make_adapter(tiny_hf_model, tmp_path / "a2", r=4, seed=2)
    engine = make_engine(tiny_hf_model, smollm2_tokenizer, adapters_dir=str(tmp_path), max_lora_rank=8, max_loras=2)
    pool, total = engine.registry.pool, engine.allocator.num_blocks
    acquire = pool.acquire

    def failing_for_a2(adapter):
        if adapter.name == "a2":
            raise torch.OutOfMemoryError("simulated: no memory to load the adapter into its slot")
        return acquire(adapter)

    params = SamplingParams(temperature=0.0, max_new_tokens=3, ignore_eos=True)
    prompt = random_prompts([10], len(smollm2_tokenizer))[0]
    alone = make_engine(tiny_hf_model, smollm2_tokenizer, adapters_dir=str(tmp_path), max_lora_rank=8, max_loras=2)
    alone.add_request("r", prompt, SamplingParams(temperature=0.0, max_new_tokens=3, ignore_eos=True, n=2), alone.registry.get("a1"))
    expected = {out.index: out.token_ids for out in drain_all(alone)}

    pool.acquire = failing_for_a2
    engine.add_request("r", prompt, SamplingParams(temperature=0.0, max_new_tokens=3, ignore_eos=True, n=2), engine.registry.get("a1"))
    engine.step()  # r's first sequence computes the prompt: its fork is admitted at the next step
    engine.add_request("s", prompt, params, engine.registry.get("a2"))
    finals = {out.index: out.token_ids for out in drain_all(engine)}
    (failure,) = engine.take_failures()
    assert failure[0] == "s" and isinstance(failure[1], ResourceExhausted) and "adapter 'a2' could not be loaded" in str(failure[1])
    assert finals == expected  # the fork decoded from the prompt's keys, copied
    assert engine.allocator.num_free == total and sum(pool._pins) == 0
    pool.acquire = acquire
    engine.add_request("next", prompt, params, engine.registry.get("a2"))
    assert drain(engine)["next"].generated_tokens == 3


def drain_all(engine) -> list:
    """Every request's final outputs, each completion of n."""
    finals = []
    while engine.has_work():
        finals += [out for out in engine.step() if out.finished and out.request_id == "r"]
    return finals


def test_a_context_limit_the_kv_cache_cannot_hold_is_refused_not_cut(tiny_hf_model, smollm2_tokenizer):
    """An explicit --max-model-len past what --kv-cache-bytes holds was cut to it in silence:
    requests failed later naming a limit nobody had set (vLLM refuses it at start)."""
    shape = make_engine(tiny_hf_model, smollm2_tokenizer).runner.model.shape
    cache = 16 * KVCache.bytes_per_block(shape, 16, torch.float32)  # 256 tokens; the model's limit is 512
    with pytest.raises(ValueError, match=r"^max_model_len 300 is more than the KV cache holds \(256 tokens in kv_cache_bytes=\d+\): raise --kv-cache-bytes"):
        make_engine(tiny_hf_model, smollm2_tokenizer, block_size=16, kv_cache_bytes=cache, max_model_len=300)
    assert make_engine(tiny_hf_model, smollm2_tokenizer, block_size=16, kv_cache_bytes=cache, max_model_len=256).max_model_len == 256
    assert make_engine(tiny_hf_model, smollm2_tokenizer, block_size=16, kv_cache_bytes=cache).max_model_len == 256
