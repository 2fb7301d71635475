"""Sampling options: seeded reproducibility, filters, penalties, logprobs."""

import math

import pytest
import torch

from tandem.server.engine.outputs import FinishReason
from tandem.server.engine.sampler import Sampler, _filter_top_k_top_p
from tandem.server.engine.sampling_params import SamplingParams
from tandem.server.engine.sequence import Sequence
from tests.engine.helpers import make_engine, random_prompts, run


def test_seeded_sampling_is_independent_of_batch_composition(tiny_hf_model, smollm2_tokenizer):
    vocab = len(smollm2_tokenizer)
    target, *others = random_prompts([7, 19, 4, 30], vocab, seed=3)
    seeded = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=12, seed=1234, ignore_eos=True)

    alone = run(make_engine(tiny_hf_model, smollm2_tokenizer), {0: [("t", target, seeded)]})["t"]
    crowd = {
        0: [(f"o{i}", p, SamplingParams(temperature=1.0, max_new_tokens=10, ignore_eos=True)) for i, p in enumerate(others)],
        2: [("t", target, seeded)],
    }
    crowded = run(make_engine(tiny_hf_model, smollm2_tokenizer, max_num_batched_tokens=16), crowd)["t"]
    assert alone == crowded
    other_seed = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=12, seed=99, ignore_eos=True)
    assert run(make_engine(tiny_hf_model, smollm2_tokenizer), {0: [("t", target, other_seed)]})["t"] != alone


def seqs_for(params_list: list[SamplingParams], token_ids: list[int] | None = None) -> list[Sequence]:
    seqs = []
    for i, p in enumerate(params_list):
        g = None
        if p.seed is not None:
            g = torch.Generator().manual_seed(p.seed)
        ids = token_ids or [1, 2, 3]
        seqs.append(Sequence(f"s{i}", len(ids), list(ids), p, i, g))
    return seqs


def test_top_k_keeps_only_the_k_best_tokens():
    logits = torch.tensor([[0.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    sampler = Sampler(torch.device("cpu"), seed=0)
    params = SamplingParams(temperature=5.0, top_k=2)
    seen = {sampler(logits, seqs_for([params])).token_ids[0] for _ in range(200)}
    assert seen == {1, 2}


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    filtered = _filter_top_k_top_p(probs.log(), [0], [0.75])
    assert torch.isfinite(filtered[0]).tolist() == [True, True, False, False]
    # The most likely token survives even a tiny top_p.
    assert torch.isfinite(_filter_top_k_top_p(probs.log(), [0], [0.01])[0]).tolist() == [True, False, False, False]


def test_top_k_keeps_every_token_tied_with_the_kth():
    """As vLLM and transformers do (by value, not rank): which of two tied tokens survived
    depended on the sort's order, not on the model."""
    filtered = _filter_top_k_top_p(torch.tensor([[0.0, 5.0, 5.0, 1.0]]), [1], [1.0])
    assert torch.isfinite(filtered[0]).tolist() == [False, True, True, False]


def test_top_p_cuts_a_token_once_the_tokens_above_it_cover_top_p_exactly():
    probs = torch.tensor([[0.5, 0.25, 0.25]])
    assert torch.isfinite(_filter_top_k_top_p(probs.log(), [0], [0.5])[0]).tolist() == [True, False, False]


def test_a_row_that_asks_for_no_nucleus_keeps_every_token_beside_one_that_does():
    """Summed from the top, a float32 softmax over a large vocabulary passes 1.0 before its
    tail ends: top_p 1 cut tens of thousands of tokens of a row whose neighbour asked for top_p."""
    logits = torch.randn(2, 128256, generator=torch.Generator().manual_seed(0)) * 4
    filtered = _filter_top_k_top_p(logits, [0, 0], [1.0, 0.9])
    assert bool(torch.isfinite(filtered[0]).all())
    assert not bool(torch.isfinite(filtered[1]).all())


def test_a_repetition_penalty_near_zero_boosts_the_repeated_token_instead_of_sampling_token_0():
    """1e-39 took the repeated token's logit to +inf: the row's softmax was NaN and every draw token 0."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 3.0, -1.0]])
    params = SamplingParams(temperature=1.0, repetition_penalty=1e-39)
    sampler = Sampler(torch.device("cpu"), seed=0)
    assert {sampler(logits, seqs_for([params], [1])).token_ids[0] for _ in range(20)} == {1}


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().expand(4000, 3).clone()
    params = [SamplingParams(temperature=1.0)] * 4000
    tokens = torch.tensor(Sampler(torch.device("cpu"), seed=1)(logits, seqs_for(params)).token_ids)
    freq = torch.bincount(tokens, minlength=3).float() / 4000
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)


def test_greedy_rows_stay_greedy_next_to_sampled_rows():
    logits = torch.tensor([[0.0, 1.0, 0.5], [0.0, 1.0, 0.5]])
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=100.0, seed=5)]
    for _ in range(20):
        assert Sampler(torch.device("cpu"))(logits, seqs_for(params)).token_ids[0] == 1


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(1, 50)
    history = [3, 7, 7, 20, 41]
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([history]), logits.clone())
    got = Sampler(torch.device("cpu"))._penalize(logits, seqs_for([SamplingParams(repetition_penalty=1.3)], history))
    torch.testing.assert_close(got, expected)


def test_logprobs_are_raw_log_softmax_with_top_alternatives():
    """vLLM's default: the model's own distribution, before penalties, temperature and filters."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    out = Sampler(torch.device("cpu"))(logits, seqs_for([SamplingParams(temperature=0.0, logprobs=2)]))
    lp = out.logprobs[0]
    expected = torch.log_softmax(logits[0], -1)
    assert lp.token_id == 0 and math.isclose(lp.logprob, expected[0].item(), rel_tol=1e-6)
    assert [t for t, _ in lp.top] == [0, 1]
    assert out.logprobs == [lp]
    # Penalised, at a temperature, filtered: the same raw numbers.
    params = SamplingParams(temperature=0.5, presence_penalty=1.5, repetition_penalty=1.4, top_k=2, logprobs=4, seed=1)
    seqs = seqs_for([params], [0, 0, 1])
    out = Sampler(torch.device("cpu"))(logits, seqs)
    lp = out.logprobs[0]
    assert math.isclose(lp.logprob, expected[lp.token_id].item(), rel_tol=1e-6)
    assert [t for t, _ in lp.top] == [0, 1, 2, 3]
    assert all(math.isclose(v, expected[t].item(), rel_tol=1e-6) for t, v in lp.top)


def test_no_logprobs_unless_asked():
    out = Sampler(torch.device("cpu"))(torch.zeros(1, 4), seqs_for([SamplingParams(temperature=0.0)]))
    assert out.logprobs == [None]


def test_top_p_zero_keeps_the_top_token_only_and_a_negative_seed_seeds(tiny_hf_model, smollm2_tokenizer):
    """OpenAI takes top_p in [0, 1] (0: the most likely token alone) and any signed 64-bit
    seed: a negative seed reproduces its tokens and differs from its absolute value."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    kept = _filter_top_k_top_p(logits, [0, 0, 0], [0.0, 0.0, 0.0]).isfinite()
    assert kept.sum(1).tolist() == [1, 1, 1] and kept.float().argmax(1).tolist() == logits.argmax(1).tolist()
    (prompt,) = random_prompts([7], len(smollm2_tokenizer), seed=3)
    params = lambda **kw: SamplingParams(temperature=1.0, max_new_tokens=12, ignore_eos=True, **kw)  # noqa: E731
    tokens = lambda p: run(make_engine(tiny_hf_model, smollm2_tokenizer), {0: [("t", prompt, p)]})["t"]  # noqa: E731
    negative = tokens(params(seed=-5))
    assert negative == tokens(params(seed=-5)) and negative != tokens(params(seed=5))
    # The gRPC field is a uint64: its upper half was refused (a client drawing 64 random bits failed half the time).
    upper = tokens(params(seed=2**64 - 1))
    assert upper == tokens(params(seed=2**64 - 1)) and upper != negative
    assert tokens(params(top_p=0.0, seed=1)) == tokens(SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True))


@pytest.mark.parametrize("field,value,message", [
    ("temperature", -0.1, "temperature"),
    ("temperature", float("nan"), "temperature"),
    ("top_p", -0.1, "top_p"),
    ("top_p", 1.5, "top_p"),
    ("top_k", -1, "top_k"),
    ("top_k", 2**32, "top_k"),
    ("repetition_penalty", 0.0, "repetition_penalty"),
    ("max_new_tokens", 0, "max_new_tokens"),
    ("max_new_tokens", 10_000, "maximum context length"),
    ("seed", -(2**63) - 1, "seed"),
    ("seed", 2**64, "seed"),
    ("stop", [""], "stop strings"),
    ("stop_token_ids", [10**9], "stop_token_ids"),
    ("logprobs", 21, "logprobs"),
])
def test_invalid_sampling_params_are_refused_with_the_field_named(field, value, message):
    from tandem.server.errors import InvalidRequest

    params = SamplingParams(**{field: value})
    with pytest.raises(InvalidRequest, match=message):
        params.validate(prompt_len=5, max_model_len=512, vocab_size=1000)


def test_a_default_max_new_tokens_ends_at_the_context_instead_of_refusing(tiny_hf_model, smollm2_tokenizer):
    """A caller who left max_tokens out asked for no number: a 500-token prompt in a
    512-token context generates to its end (it was refused over the default's 256)."""
    engine = make_engine(tiny_hf_model, smollm2_tokenizer)
    params = SamplingParams(temperature=0.0, ignore_eos=True, default_max_new_tokens=True)
    engine.add_request("long", [5] * 500, params)
    generated = []
    while engine.has_work():
        for out in engine.step():
            generated += out.token_ids
            last = out
    assert len(generated) == 12 and last.finish_reason is FinishReason.LENGTH
    engine.add_request("short", [5, 6], SamplingParams(temperature=0.0, ignore_eos=True, max_new_tokens=3, default_max_new_tokens=True))
    assert sum(len(out.token_ids) for _ in range(6) for out in engine.step()) == 3


def test_prompts_that_cannot_run_are_refused(tiny_hf_model, smollm2_tokenizer):
    from tandem.server.errors import InvalidRequest

    engine = make_engine(tiny_hf_model, smollm2_tokenizer)
    with pytest.raises(InvalidRequest, match="empty"):
        engine.add_request("a", [], SamplingParams())
    with pytest.raises(InvalidRequest, match="maximum context length"):
        engine.add_request("b", [5] * 600, SamplingParams(max_new_tokens=1))
    with pytest.raises(InvalidRequest, match="vocabulary|token ids"):
        engine.add_request("c", [len(smollm2_tokenizer) + 5], SamplingParams())
    engine.add_request("d", [5, 6], SamplingParams(max_new_tokens=1))
    with pytest.raises(InvalidRequest, match="already in use"):
        engine.add_request("d", [5, 6], SamplingParams(max_new_tokens=1))
