"""The sampling options the engine gained for OpenAI's API work the same through gRPC:
n, presence/frequency penalties, min_p and prompt logprobs give what the HTTP front gives."""

import pytest

PROMPT = "Once upon a time there was"


def test_n_completions_over_grpc_equal_http(oai, grpc_client, base_model):
    options = dict(temperature=1.0, seed=21, n=3)
    grpc = grpc_client.generate(PROMPT, max_new_tokens=8, **options)
    http = oai.completions.create(model=base_model, prompt=PROMPT, max_tokens=8, **options)
    assert [c.text for c in grpc.choices] == [c.text for c in http.choices]
    assert [c.index for c in grpc.choices] == [0, 1, 2] and grpc.text == grpc.choices[0].text
    assert grpc.generated_tokens == 24 == http.usage.completion_tokens
    streamed = list(grpc_client.stream(PROMPT, max_new_tokens=8, **options))
    for choice in grpc.choices:
        assert "".join(c.text for c in streamed if c.index == choice.index) == choice.text
    assert sorted(c.index for c in streamed if c.finish_reason) == [0, 1, 2]


def test_penalties_and_min_p_over_grpc_equal_http(oai, grpc_client, base_model):
    # The tiny random model never repeats itself greedily; negative penalties make it.
    options = dict(presence_penalty=-2.0, frequency_penalty=-0.5)
    plain = grpc_client.generate(PROMPT, max_new_tokens=24)
    penalized = grpc_client.generate(PROMPT, max_new_tokens=24, **options)
    http = oai.completions.create(model=base_model, prompt=PROMPT, max_tokens=24, temperature=0, **options)
    assert penalized.text == http.choices[0].text != plain.text
    assert len(set(penalized.token_ids)) < len(set(plain.token_ids))
    sampled = dict(temperature=1.0, seed=5, min_p=0.2)
    grpc_min_p = grpc_client.generate(PROMPT, max_new_tokens=12, **sampled)
    http_min_p = oai.completions.create(model=base_model, prompt=PROMPT, max_tokens=12, extra_body={"min_p": 0.2}, temperature=1.0, seed=5)
    assert grpc_min_p.text == http_min_p.choices[0].text


def test_prompt_logprobs_over_grpc_equal_http(oai, grpc_client, base_model):
    grpc = grpc_client.generate(PROMPT, max_new_tokens=1, prompt_logprobs=2)
    http = oai.completions.create(model=base_model, prompt=PROMPT, max_tokens=1, temperature=0, extra_body={"prompt_logprobs": 2})
    entries = http.choices[0].model_extra["prompt_logprobs"][1:]
    assert len(grpc.prompt_logprobs) == len(entries) == grpc.prompt_tokens - 1
    for lp, entry in zip(grpc.prompt_logprobs, entries):
        assert entry[str(lp.token_id)]["logprob"] == pytest.approx(lp.logprob, abs=1e-5)
        assert [t for t, _ in lp.top] == [int(k) for k in entry if int(k) in {t for t, _ in lp.top}]
