"""OpenAI's sampling options in the engine: presence/frequency penalties and min_p against a
plain torch reference, n completions sharing one prefill, prompt log-probabilities against
transformers."""

import torch

from tandem.server.engine.outputs import FinishReason
from tandem.server.engine.sampler import Sampler
from tandem.server.engine.sampling_params import SamplingParams
from tandem.server.engine.sequence import Sequence
from tests.engine.helpers import make_engine, random_prompts


def reference_token(logits: torch.Tensor, output: list[int], params: SamplingParams, noise: torch.Tensor) -> int:
    """What one row should sample, written out in vLLM's order: penalties on the raw logits,
    temperature, min_p on the probabilities, top-k, then top-p over what is left (a token
    goes once the tokens ranked above it cover top_p or more), then the exponential race with
    the row's own noise."""
    counts = torch.zeros_like(logits)
    for t in output:
        counts[t] += 1
    penalized = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()
    if params.greedy:
        return int(penalized.argmax())
    probs = torch.softmax(penalized / params.temperature, dim=-1)
    kept = probs >= params.min_p * probs.max()
    ranked = sorted(range(len(probs)), key=lambda t: -float(probs[t]))
    for rank, t in enumerate(ranked):
        if params.top_k > 0 and rank >= params.top_k:
            kept[t] = False
    mass = probs.where(kept, torch.zeros_like(probs))
    mass = mass / mass.sum()
    covered = 0.0
    for rank, t in enumerate(ranked):
        if rank > 0 and covered >= params.top_p:
            kept[t] = False
        covered += float(mass[t])
    probs = probs.where(kept, torch.zeros_like(probs))
    return int((probs / noise).argmax())


def test_penalties_min_p_top_k_and_top_p_match_a_torch_reference():
    vocab, rows = 40, 288
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, vocab, generator=g) * 2
    seqs, expected = [], []
    for i in range(rows):
        prompt = torch.randint(0, vocab, (5,), generator=g).tolist()
        output = torch.randint(0, vocab, (int(torch.randint(0, 12, (1,), generator=g)),), generator=g).tolist()
        params = SamplingParams(
            temperature=[0.0, 0.7, 1.0, 1.5][i % 4],
            presence_penalty=[0.0, 0.8, -0.5, 2.0][i // 4 % 4],
            frequency_penalty=[0.0, 0.6, 1.2][i // 16 % 3],
            min_p=[0.0, 0.05, 0.3][i % 3],
            top_k=[0, 3, 12][i // 96 % 3],
            top_p=[1.0, 0.5, 0.9][i // 48 % 3],
            seed=1000 + i,
        )
        seqs.append(Sequence(f"s{i}", len(prompt), prompt + output, params, i, torch.Generator().manual_seed(1000 + i)))
        noise = torch.empty(vocab).exponential_(generator=torch.Generator().manual_seed(1000 + i))
        expected.append(reference_token(logits[i], output, params, noise))
    assert Sampler(torch.device("cpu"), seed=0)(logits, seqs).token_ids == expected


def test_min_p_never_samples_below_its_floor():
    probs = torch.tensor([0.5, 0.3, 0.12, 0.08])
    logits = probs.log().expand(3000, 4).clone()
    seqs = [Sequence(f"s{i}", 1, [0], SamplingParams(temperature=1.0, min_p=0.2), i) for i in range(3000)]
    counts = torch.bincount(torch.tensor(Sampler(torch.device("cpu"), seed=1)(logits, seqs).token_ids), minlength=4)
    assert counts[3] == 0 and counts[2] > 0  # the floor is 0.2 * 0.5: 0.08 is below it, 0.12 is not
    assert abs(counts[0] / 3000 - 0.5 / 0.92) < 0.04


def test_min_p_cuts_before_top_p_as_vllm_does():
    """[0.4, 0.35, 0.25] with min_p 0.7 leaves [0.53, 0.47], whose top_p 0.5 nucleus is the
    first token alone; top_p first (as before) kept two tokens and min_p neither of them."""
    logits = torch.tensor([0.4, 0.35, 0.25]).log().expand(2000, 3).clone()
    seqs = [Sequence(f"s{i}", 1, [0], SamplingParams(temperature=1.0, top_p=0.5, min_p=0.7), i) for i in range(2000)]
    assert set(Sampler(torch.device("cpu"), seed=3)(logits, seqs).token_ids) == {0}


def _completions(engine, request_id: str) -> dict[int, list[int]]:
    tokens: dict[int, list[int]] = {}
    while engine.has_work():
        for out in engine.step():
            if out.request_id == request_id:
                tokens.setdefault(out.index, []).extend(out.token_ids)
    return tokens


def _forked_and_separate(model, tokenizer, prompt: list[int], n: int, seed: int, config: dict, sampled: dict):
    """The completions of one request for n (seed) and of n requests seeded seed + i, each
    on an engine of its own; the forked engine must have computed the prompt once and
    hold nothing after."""
    forked = make_engine(model, tokenizer, **config)
    forked.add_request("r", prompt, SamplingParams(n=n, seed=seed, **sampled))
    together = _completions(forked, "r")
    assert forked.iteration_tokens["prefill"] == len(prompt)
    assert forked.allocator.num_free == forked.allocator.num_blocks
    separate = make_engine(model, tokenizer, **config)
    alone = {}
    for i in range(n):
        separate.add_request(f"s{i}", prompt, SamplingParams(seed=seed + i, **sampled))
        alone[i] = _completions(separate, f"s{i}")[0]
    return together, alone


def test_n_completions_share_one_prefill_and_sample_as_separate_seeded_requests(tiny_hf_model, smollm2_tokenizer):
    """A request for n = 3 (seed s) computes its prompt once and returns what three requests
    seeded s, s+1, s+2 return, through chunked prefill and copied KV blocks."""
    (prompt,) = random_prompts([37], len(smollm2_tokenizer), seed=5)
    sampled = dict(temperature=1.0, max_new_tokens=10, ignore_eos=True)
    together, alone = _forked_and_separate(
        tiny_hf_model, smollm2_tokenizer, prompt, 3, 11, dict(block_size=8, max_num_batched_tokens=16), sampled
    )
    assert together == alone
    assert len({tuple(t) for t in together.values()}) == 3


def test_forks_admitted_after_the_first_completion_ended_copy_the_prompt_from_a_sibling(tiny_hf_model, smollm2_tokenizer):
    """With two seats, completions 2 and 3 wait until 0 and 1 finish: they copy the prompt's
    keys from a sibling still running (each computed the whole prompt again before) and
    still return what separately seeded requests return."""
    (prompt,) = random_prompts([29], len(smollm2_tokenizer), seed=9)
    sampled = dict(temperature=1.0, max_new_tokens=6, ignore_eos=True)
    together, alone = _forked_and_separate(tiny_hf_model, smollm2_tokenizer, prompt, 4, 3, dict(block_size=8, max_num_seqs=2), sampled)
    assert together == alone


def test_aborting_an_n_request_ends_every_completion(tiny_hf_model, smollm2_tokenizer):
    engine = make_engine(tiny_hf_model, smollm2_tokenizer, block_size=8)
    (prompt,) = random_prompts([20], len(smollm2_tokenizer), seed=6)
    engine.add_request("r", prompt, SamplingParams(n=4, temperature=1.0, max_new_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    finals = engine.abort("r")
    assert sorted(o.index for o in finals) == [0, 1, 2, 3]
    assert all(o.finished and o.finish_reason is FinishReason.ABORT for o in finals)
    assert engine.abort("r") == [] and not engine.has_work()
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_prompt_logprobs_match_transformers(tiny_hf_model, smollm2_tokenizer):
    (prompt,) = random_prompts([41], len(smollm2_tokenizer), seed=8)
    engine = make_engine(tiny_hf_model, smollm2_tokenizer, max_num_batched_tokens=16)
    engine.add_request("r", prompt, SamplingParams(temperature=0.0, max_new_tokens=2, prompt_logprobs=3))
    outputs = []
    while engine.has_work():
        outputs.extend(engine.step())
    (with_prompt,) = [o for o in outputs if o.prompt_logprobs is not None]
    with torch.no_grad():
        logits = tiny_hf_model(torch.tensor([prompt])).logits[0].float()
    expected = torch.log_softmax(logits, dim=-1)
    got = with_prompt.prompt_logprobs
    assert [lp.token_id for lp in got] == prompt[1:]
    assert torch.allclose(torch.tensor([lp.logprob for lp in got]), expected[torch.arange(40), torch.tensor(prompt[1:])], atol=1e-4)
    top_values, top_ids = expected[:-1].topk(3, dim=-1)
    assert [[t for t, _ in lp.top] for lp in got] == top_ids.tolist()
    assert torch.allclose(torch.tensor([[p for _, p in lp.top] for lp in got]), top_values, atol=1e-4)
