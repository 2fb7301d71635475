"""Workload sources: the shipped prompts, ShareGPT files, random token prompts, and the
requests built from them (output lengths, ignore_eos, sampling)."""

import asyncio
import json
import math

import numpy as np
import pytest

from tandem.client.bench.arrivals import LoadPoint
from tandem.client.bench.popularity import build_popularity
from tandem.client.bench.prompts import Prompt, random_prompts, sharegpt_prompts, synthetic_prompts
from tandem.client.bench.runner import LoadPlan
from tandem.client.bench.workload import build_requests


async def word_count(text: str) -> list[int]:
    return list(range(len(text.split())))


def test_sharegpt_takes_first_exchanges_that_fit(tmp_path):
    data = [
        {"conversations": [{"from": "human", "value": "one two three"}, {"from": "gpt", "value": "a b c d e"}]},
        {"conversations": [{"from": "human", "value": "short reply"}, {"from": "gpt", "value": "a b"}]},  # < 4 tokens
        {"conversations": [{"from": "gpt", "value": "starts with the model"}, {"from": "human", "value": "x y z w"}]},
        {"conversations": [{"from": "human", "value": "long " * 50}, {"from": "gpt", "value": "a b c d"}]},  # too long
        {"id": "no conversations"},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    prompts = asyncio.run(sharegpt_prompts(path, 10, np.random.default_rng(0), word_count, max_total_len=20))
    assert prompts == [Prompt(messages=({"role": "user", "content": "one two three"},), output_len=5)]
    path.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(ValueError, match="JSON list"):
        asyncio.run(sharegpt_prompts(path, 10, np.random.default_rng(0), word_count, max_total_len=20))


def test_random_prompts_have_the_asked_lengths_and_no_low_ids():
    prompts = random_prompts(50, 20, 8, vocab_size=1000, rng=np.random.default_rng(0), range_ratio=0.5)
    lengths = [len(p.prompt_token_ids) for p in prompts]
    assert min(lengths) >= 10 and max(lengths) <= 30 and len(set(lengths)) > 1
    assert all(100 <= t < 1000 for p in prompts for t in p.prompt_token_ids)
    assert all(4 <= p.output_len <= 12 for p in prompts)
    assert "prompt_token_ids" in prompts[0].request_fields()


def test_synthetic_set_is_chat_prompts_with_lengths():
    prompts = synthetic_prompts()
    assert len(prompts) >= 30 and all(p.output_len and p.messages[0]["role"] == "user" for p in prompts)


def test_requests_cycle_prompts_and_carry_output_length_and_sampling():
    prompts = [Prompt(messages=({"role": "user", "content": str(i)},), output_len=10 + i) for i in range(3)]
    popularity = build_popularity("uniform", ["a", "b"])
    fixed = build_requests(prompts, popularity, 7, np.random.default_rng(0), 16, True, {"temperature": 0.7})
    assert len(fixed) == 7 and {r.adapter for r in fixed} <= {"a", "b"}
    assert all(r.options == {"temperature": 0.7, "max_new_tokens": 16, "ignore_eos": True} for r in fixed)
    assert sorted(r.prompt.output_len for r in fixed[:3]) == [10, 11, 12]  # every prompt before any repeats
    from_dataset = build_requests(prompts, popularity, 3, np.random.default_rng(0), None, False, {})
    assert sorted(r.options["max_new_tokens"] for r in from_dataset) == [10, 11, 12]
    assert "ignore_eos" not in from_dataset[0].options
    assert from_dataset[0].stream_kwargs()["adapter"] in ("a", "b")


def test_load_plans_are_bounded():
    with pytest.raises(ValueError, match="--num-requests or --duration"):
        LoadPlan([LoadPoint(rate=1.0)])
    with pytest.raises(ValueError, match="rate inf"):
        LoadPlan([LoadPoint(rate=math.inf)], duration=5.0)
    assert LoadPlan([LoadPoint(concurrency=2)], duration=5.0).num_requests is None
