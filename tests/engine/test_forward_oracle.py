"""Our forward over a ragged, paged batch must give transformers' logits."""

import pytest
import torch

from tandem.server.engine.kv_cache import KVCache
from tandem.server.engine.llm_engine import Engine
from tandem.server.engine.sampling_params import SamplingParams
from tandem.server.model.loader import build_from_hf
from tests.conftest import make_tiny_hf_model
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



LONGROPE = {"rope_type": "longrope", "short_factor": [1.0 + i / 8 for i in range(8)], "long_factor": [4.0 + i for i in range(8)],
            "original_max_position_embeddings": 128}


@pytest.mark.parametrize("overrides", [
    {"attention_bias": True},
    {"mlp_bias": True},
    {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}},
    {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
    {"rope_scaling": LONGROPE},
    {"head_dim": 32},  # wider than hidden_size / heads, as Mistral-Nemo's
    {"num_key_value_heads": 4},  # one key/value head per query head
    {"num_key_value_heads": 1},  # four query heads a key/value head
    {"tie_word_embeddings": True},
    {"hidden_act": "swish"},  # transformers' other name for SiLU
    # RoPE over the first half of each head, the rest left unrotated (zero frequencies).
    {"rope_scaling": {"rope_type": "proportional", "partial_rotary_factor": 0.5}},
], ids=["attention-bias", "mlp-bias", "linear-rope", "llama3-rope", "yarn-rope", "longrope", "head-dim", "mha", "gqa-4", "tied",
        "swish", "proportional-rope"])
def test_supported_config_variants_match_transformers(smollm2_tokenizer, overrides):
    """Every option the loader accepts changes the logits as transformers' does (a bias it
    dropped or a RoPE it half applied served wrong logits without an error), on a prompt past
    the scaled RoPEs' original length."""
    model = make_tiny_hf_model(smollm2_tokenizer, seed=5, **overrides)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):  # transformers starts them at 0, which proves nothing
                parameter.normal_(0, 0.5)
    engine = make_engine(model, smollm2_tokenizer)
    seen = record_logits(engine)
    prompt = random_prompts([100], len(smollm2_tokenizer), seed=3)[0]
    engine.add_request("r", prompt, SamplingParams(max_new_tokens=4, temperature=0, prompt_logprobs=0, ignore_eos=True))
    outputs = []
    while engine.has_work():
        outputs += engine.step()
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
    got = torch.tensor([lp.logprob for lp in outputs[0].prompt_logprobs])
    torch.testing.assert_close(got, expected[torch.arange(len(prompt) - 1), prompt[1:]], rtol=1e-4, atol=1e-4)
    assert_matches_transformers(model, prompt, [t for out in outputs for t in out.token_ids], seen["r"])  # decode steps too


def make_tiny_model(tokenizer, architecture: str, **overrides):
    """A tiny model of one of the loader's architectures, through its own transformers class,
    its biases (Qwen2's q/k/v) given values."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.conftest import TINY_CONFIG

    torch.manual_seed(7)
    config = AutoConfig.for_model(
        architecture, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **{**TINY_CONFIG, **overrides},
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("architecture", ["qwen2", "mistral"])
def test_qwen2_and_mistral_models_match_transformers(smollm2_tokenizer, architecture):
    """The other architectures the loader accepts, each through its own transformers class
    (Qwen2's q/k/v biases, given values; Mistral's window past the prompt)."""
    extra = {"sliding_window": 512} if architecture == "mistral" else {}
    model = make_tiny_model(smollm2_tokenizer, architecture, **extra)
    assert architecture != "qwen2" or any(name.endswith("q_proj.bias") for name, _ in model.named_parameters())
    engine = make_engine(model, smollm2_tokenizer)
    seen = record_logits(engine)
    prompt = random_prompts([60], len(smollm2_tokenizer), seed=4)[0]
    outputs = run(engine, {0: [("r", prompt, SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))]})
    assert_matches_transformers(model, prompt, outputs["r"], seen["r"])


@pytest.mark.parametrize("architecture, overrides, limit", [
    ("mistral", {"sliding_window": 16, "use_sliding_window": False}, 16),
    ("qwen2", {"sliding_window": 16, "use_sliding_window": True, "max_window_layers": 1}, 16),
    ("qwen2", {"sliding_window": 16, "use_sliding_window": True, "max_window_layers": 2}, 512),
    ("llama", {"sliding_window": 16}, 512),
], ids=["mistral-ignores-use-sliding-window", "qwen2-sliding-layer", "qwen2-all-full-layers", "llama-ignores-it"])
def test_a_sliding_window_is_read_as_transformers_reads_it(smollm2_tokenizer, architecture, overrides, limit):
    """Tandem attends to the whole context, so a sliding window caps it. Mistral slides whenever
    the window is set (use_sliding_window=false was served past it, logits off by ~3); Qwen2
    only on its "sliding_attention" layers and Llama never (both were capped for nothing)."""
    model = make_tiny_model(smollm2_tokenizer, architecture, **overrides)
    engine = make_engine(model, smollm2_tokenizer)
    assert engine.max_model_len == limit
    seen = record_logits(engine)
    prompt = random_prompts([min(limit, 44) - 4], len(smollm2_tokenizer), seed=8)[0]
    outputs = run(engine, {0: [("r", prompt, SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True))]})
    assert_matches_transformers(model, prompt, outputs["r"], seen["r"])


def test_yarn_serves_the_context_its_factor_reaches(smollm2_tokenizer):
    """Qwen2.5's recipe leaves max_position_embeddings at the original length: the limit was
    capped there, and the factor bought nothing. Past it, the logits are transformers'."""
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    model = make_tiny_hf_model(smollm2_tokenizer, seed=6, max_position_embeddings=64, rope_scaling=yarn)
    engine = make_engine(model, smollm2_tokenizer)
    assert engine.max_model_len == 256
    seen = record_logits(engine)
    prompt = random_prompts([150], len(smollm2_tokenizer), seed=5)[0]
    outputs = run(engine, {0: [("r", prompt, SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True))]})
    assert_matches_transformers(model, prompt, outputs["r"], seen["r"])


def test_dynamic_rope_serves_max_position_embeddings_unscaled(smollm2_tokenizer):
    """Up to max_position_embeddings transformers' dynamic NTK keeps the unscaled frequencies,
    and the served context stops there: the logits to its last position are transformers'."""
    dynamic = {"rope_type": "dynamic", "factor": 4.0}
    model = make_tiny_hf_model(smollm2_tokenizer, seed=9, max_position_embeddings=64, rope_scaling=dynamic)
    engine = make_engine(model, smollm2_tokenizer)
    assert engine.max_model_len == 64
    seen = record_logits(engine)
    prompt = random_prompts([60], len(smollm2_tokenizer), seed=9)[0]
    outputs = run(engine, {0: [("r", prompt, SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True))]})
    assert_matches_transformers(model, prompt, outputs["r"], seen["r"])


def test_longrope_serves_its_original_window(smollm2_tokenizer):
    """Past it transformers turns every position to the long factors, cached keys included."""
    engine = make_engine(make_tiny_hf_model(smollm2_tokenizer, **{"rope_scaling": LONGROPE}), smollm2_tokenizer)
    assert engine.max_model_len == LONGROPE["original_max_position_embeddings"]
