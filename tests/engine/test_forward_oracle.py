"""Our forward over a ragged, paged batch must give transformers' logits."""

import torch

from tandem.server.engine.kv_cache import KVCache
from tandem.server.engine.llm_engine import Engine
from tandem.server.engine.sampling_params import SamplingParams
from tandem.server.model.loader import build_from_hf
from tests.engine.helpers import make_engine, random_prompts, run


def record_logits(engine: Engine) -> dict[str, list[torch.Tensor]]:
    """Capture every sampled row's logits, per request, as the engine runs."""
    seen: dict[str, list[torch.Tensor]] = {}
    execute = engine.runner.execute

    def wrapped(scheduled):
        result = execute(scheduled)
        for seq, row in zip(result.sampled, result.logits):
            seen.setdefault(seq.request_id, []).append(row.clone())
        return result

    engine.runner.execute = wrapped
    return seen


def assert_matches_transformers(hf_model, prompt_ids, generated, logits_rows):
    full = torch.tensor([prompt_ids + generated], device=hf_model.device)
    with torch.no_grad():
        ref = hf_model(full).logits[0].float()
    expected = ref[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(generated)]
    assert len(logits_rows) == len(generated)
    got = torch.stack(logits_rows).to(expected.device)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert got.argmax(-1).tolist() == generated


def test_ragged_staggered_batch_matches_transformers(tiny_hf_model, smollm2_tokenizer):
    engine = make_engine(tiny_hf_model, smollm2_tokenizer, dtype=torch.float32, max_num_batched_tokens=40, block_size=8)
    seen = record_logits(engine)
    lengths = [5, 37, 1, 64, 12, 23]
    ps = random_prompts(lengths, len(smollm2_tokenizer))
    greedy = SamplingParams(temperature=0.0, max_new_tokens=9, ignore_eos=True)
    arrivals = {0: [("a", ps[0], greedy), ("b", ps[1], greedy)], 2: [("c", ps[2], greedy), ("d", ps[3], greedy)], 5: [("e", ps[4], greedy), ("f", ps[5], greedy)]}
    outputs = run(engine, arrivals)
    for rid, prompt in zip("abcdef", ps):
        assert len(outputs[rid]) == 9
        assert_matches_transformers(tiny_hf_model, prompt, outputs[rid], seen[rid])
    assert engine.stats().num_free_blocks == engine.stats().num_total_blocks


def test_preempted_sequence_is_recomputed_exactly(tiny_hf_model, smollm2_tokenizer):
    shape = build_from_hf(tiny_hf_model, torch.float32, torch.device("cpu")).shape
    block_bytes = KVCache.bytes_per_block(shape, 4, torch.float32)
    # 12 blocks of 4 tokens: three sequences of 10 + 12 tokens cannot all fit.
    engine = make_engine(tiny_hf_model, smollm2_tokenizer, block_size=4, kv_cache_bytes=12 * block_bytes)
    seen = record_logits(engine)
    ps = random_prompts([10, 9, 11], len(smollm2_tokenizer), seed=2)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
    outputs = run(engine, {0: [(f"r{i}", p, greedy) for i, p in enumerate(ps)]})
    assert engine.stats().num_preemptions > 0
    for i, prompt in enumerate(ps):
        rid = f"r{i}"
        # Recomputation after preemption samples nothing twice: one logits row per token.
        assert_matches_transformers(tiny_hf_model, prompt, outputs[rid], seen[rid])
    assert engine.stats().num_free_blocks == engine.stats().num_total_blocks

