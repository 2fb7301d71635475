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


async def word_count(text: str | None = None, *, messages: list[dict] | None = None) -> list[int]:
    words = text.split() if text is not None else [w for m in messages for w in m["content"].split()]
    return list(range(len(words)))


TEMPLATE_TOKENS = 10


async def chat_word_count(text: str | None = None, *, messages: list[dict] | None = None) -> list[int]:
    """Words, plus a chat template's tokens around messages, as the server renders them."""
    return list(range(len(await word_count(text, messages=messages)) + (TEMPLATE_TOKENS if messages is not None else 0)))


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


def test_sharegpt_counts_the_prompt_as_sent_and_the_output_length_asked(tmp_path):
    """The filter counted the raw prompt text and the reply, but the request sends a chat
    message (the template adds tokens) and --output-len replaces the reply's length: prompts
    it let through were refused by the server (prompt + max_new_tokens > max_model_len)."""
    data = [
        {"conversations": [{"from": "human", "value": "w " * 5}, {"from": "gpt", "value": "a " * 5}]},   # 15 + 5 as sent
        {"conversations": [{"from": "human", "value": "w " * 2}, {"from": "gpt", "value": "a " * 6}]},   # 12 + 6
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    load = lambda fixed: asyncio.run(sharegpt_prompts(path, 10, np.random.default_rng(0), chat_word_count, 18, fixed))  # noqa: E731
    assert [p.messages[0]["content"].count("w") for p in load(None)] == [2]  # 10 raw tokens, 20 as sent: left out
    assert [p.output_len for p in load(4)] == [6]  # 12 + 4 fits; 15 + 4 does not; the reply's length kept as reference
    with pytest.raises(ValueError, match="fit 18 tokens"):
        load(7)  # 12 + 7: no request fits


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


def test_an_infinite_duration_needs_a_request_count():
    """`--duration inf` with a rate and no --num-requests sent forever."""
    for point in (LoadPoint(rate=1.0), LoadPoint(concurrency=2)):
        with pytest.raises(ValueError, match="--duration inf never ends a point: bound it with --num-requests"):
            LoadPlan([point], duration=math.inf)
        assert LoadPlan([point], num_requests=5, duration=math.inf).num_requests == 5


def test_load_plans_are_bounded():
    with pytest.raises(ValueError, match="--num-requests or --duration"):
        LoadPlan([LoadPoint(rate=1.0)])
    with pytest.raises(ValueError, match="rate inf"):
        LoadPlan([LoadPoint(rate=math.inf)], duration=5.0)
    assert LoadPlan([LoadPoint(concurrency=2)], duration=5.0).num_requests is None
