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
from tests.engine.helpers import make_engine, random_prompts, run


def drain(engine):
    finals = {}
    while engine.has_work():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    return finals


def complete(engine, request_id, prompt, params):
    """(token ids, text, last output) of one request run alone to its end."""
    engine.add_request(request_id, prompt, params)
    ids, text = [], ""
    while engine.has_work():
        for out in engine.step():
            ids += out.token_ids
            text += out.text
            last = out
    return ids, text, last


def test_finish_reasons(tiny_hf_model, smollm2_tokenizer):
    engine = make_engine(tiny_hf_model, smollm2_tokenizer)
    prompt = random_prompts([6], len(smollm2_tokenizer))[0]
    greedy = dict(temperature=0.0, ignore_eos=True)
    ids, _, last = complete(engine, "len", prompt, SamplingParams(max_new_tokens=5, **greedy))
    assert last.finish_reason is FinishReason.LENGTH and last.generated_tokens == 5 == len(ids)
    # The text of the first n tokens (a request cut there by its length).
    text = {n: complete(engine, f"len{n}", prompt, SamplingParams(max_new_tokens=n, **greedy))[1] for n in range(1, 6)}
    stop = ids.index(ids[2])  # where the stop token first comes
    assert text[stop + 1] != text[stop], "the stop token has text of its own: the test would prove nothing"

    # A stop token id or EOS ends the request: its id is returned, its text is not (vLLM's
    # "Hello world" for stop_token_ids=[id of "."], where the stop token's text came too).
    got, got_text, out = complete(engine, "stop", prompt, SamplingParams(max_new_tokens=10, stop_token_ids=[ids[2]], **greedy))
    assert out.finish_reason is FinishReason.STOP and out.generated_tokens == stop + 1
    assert (got, got_text) == (ids[: stop + 1], text[stop])
    engine.eos_token_ids = {ids[2]}
    got, got_text, out = complete(engine, "eos", prompt, SamplingParams(max_new_tokens=10, temperature=0.0, logprobs=0))
    assert out.finish_reason is FinishReason.EOS
    assert (got, got_text) == (ids[: stop + 1], text[stop])
    assert out.logprobs[-1].token_id == ids[2]  # the logprobs keep it, as the ids do
    # An EOS ignored is any token: its text is served.
    got, got_text, out = complete(engine, "ignore", prompt, SamplingParams(max_new_tokens=5, **greedy))
    assert out.finish_reason is FinishReason.LENGTH and (got, got_text) == (ids, text[5])


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


def test_a_prefetch_that_fails_fails_no_request(tiny_hf_model, smollm2_tokenizer, tmp_path):
    """Prefetch ran inside the iteration's try: a load that failed there (out of memory for a
    slot) aborted every request the iteration carried, though it is only a hint (acquire
    loads the adapter again, charging an error to its request alone). On CPU the pool
    prefetches nothing (prefetch_ahead 0); it is turned on here as on CUDA."""
    from tests.adapters.make_adapters import make_adapter

    make_adapter(tiny_hf_model, tmp_path / "a1", r=4, seed=1)
    make_adapter(tiny_hf_model, tmp_path / "a2", r=4, seed=2)
    prompts = random_prompts([7, 9, 5], len(smollm2_tokenizer), seed=3)
    params = SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)

    def serve(failing: bool) -> dict[str, list[int]]:
        # One running at a time: the others wait, and each step prefetches their adapters.
        engine = make_engine(tiny_hf_model, smollm2_tokenizer, adapters_dir=str(tmp_path), max_lora_rank=8, max_loras=2, max_num_seqs=1)
        pool = engine.registry.pool
        pool.prefetch_ahead = 4
        prefetch, load, prefetching, failed = pool.prefetch, pool._load, [], []

        def prefetch_spied(upcoming):
            prefetching.append(True)
            try:
                return prefetch(upcoming)
            finally:
                prefetching.pop()

        def loading(slot, adapter, stream=None):
            if failing and prefetching:  # a load for prefetch, not acquire's
                failed.append(adapter.name)
                raise torch.OutOfMemoryError("simulated: no memory to prefetch the adapter into a slot")
            return load(slot, adapter, stream)

        pool.prefetch, pool._load = prefetch_spied, loading
        requests = [(f"r{i}", p, params, engine.registry.get(name)) for i, (p, name) in enumerate(zip(prompts, ["a1", "a2", "a1"]))]
        outputs = run(engine, {0: requests})
        assert bool(failed) == failing and pool.prefetches == (0 if failing else 1) and engine.take_failures() == []
        assert engine.allocator.num_free == engine.allocator.num_blocks and sum(pool._pins) == 0
        return outputs

    expected = serve(failing=False)
    assert serve(failing=True) == expected and all(len(ids) == 4 for ids in expected.values())


def test_a_step_that_computes_no_rows_counts_no_routed_rows(tiny_hf_model, smollm2_tokenizer, tmp_path):
    """A forward with routed rows whose step failed before record_top_experts (the sampler
    raised) left its routing in the runner; a co-served backward slice's step, which runs no
    forward rows, then counted those rows of an aborted request under its router's experts."""
    from tandem.server.adapters.router_format import router_config, write_router
    from tandem.server.engine.iteration import SchedulerOutput
    from tandem.server.engine.llm_engine import StepFailed
    from tests.adapters.make_adapters import ALL_LINEAR, make_adapter
    from tests.adapters.test_routers import random_gates

    for seed, name in enumerate(["e0", "e1"]):
        make_adapter(tiny_hf_model, tmp_path / name, r=4, target_modules=ALL_LINEAR, seed=seed)
    write_router(tmp_path / "router", router_config(["e0", "e1"], 1, 1.0), random_gates(tiny_hf_model, 2, seed=5))
    engine = make_engine(tiny_hf_model, smollm2_tokenizer, adapters_dir=str(tmp_path), max_lora_rank=8, max_loras=2)
    params = SamplingParams(temperature=0.0, max_new_tokens=3, ignore_eos=True)
    engine.add_request("r", [5, 17, 300, 42], params, engine.registry.get("router"))
    sampler = engine.sampler

    def failing(*args):
        raise RuntimeError("boom")

    engine.sampler = failing
    with pytest.raises(StepFailed):
        engine.step()
    engine.sampler = sampler
    counted = dict(engine.runner.router_expert_tokens)
    # What step() runs for an iteration that carries a backward slice alone.
    with torch.no_grad():
        engine.runner.execute(SchedulerOutput())
    engine.runner.record_top_experts()
    assert dict(engine.runner.router_expert_tokens) == counted == {}
    # And a routed request after it is counted as ever: every token computed once.
    engine.add_request("s", [5, 17, 300, 42], params, engine.registry.get("router"))
    drain(engine)
    assert sum(engine.runner.router_expert_tokens.values()) == 4 + 3 - 1


def test_a_seeded_sample_is_the_same_whether_or_not_the_request_was_preempted(tiny_hf_model, smollm2_tokenizer):
    """The sequence keeps its generator through a preemption: its draws go on where they
    were (one seeded anew at preemption would draw its first tokens' noise again)."""
    shape = make_engine(tiny_hf_model, smollm2_tokenizer).runner.model.shape
    block_bytes = KVCache.bytes_per_block(shape, 4, torch.float32)
    prompts = random_prompts([10, 9, 11], len(smollm2_tokenizer), seed=2)
    params = [SamplingParams(temperature=1.0, max_new_tokens=12, ignore_eos=True, seed=40 + i) for i in range(3)]
    requests = {0: [(f"r{i}", p, params[i]) for i, p in enumerate(prompts)]}
    roomy = make_engine(tiny_hf_model, smollm2_tokenizer, block_size=4)
    expected = run(roomy, requests)
    # 12 blocks of 4 tokens: three sequences of 10 + 12 tokens cannot all fit.
    tight = make_engine(tiny_hf_model, smollm2_tokenizer, block_size=4, kv_cache_bytes=12 * block_bytes)
    preempted = []
    preempt = tight.scheduler._preempt
    tight.scheduler._preempt = lambda seq: preempted.append(seq.request_id) or preempt(seq)
    got = run(tight, requests)
    assert roomy.stats().num_preemptions == 0 and preempted
    assert got == expected and all(len(ids) == 12 for ids in got.values())
