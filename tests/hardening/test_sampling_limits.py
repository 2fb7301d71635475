"""Issue 11, defects 9 and 11: stop lists are bounded (count and length) so one request cannot
slow everyone's tokens, and temperatures so small that logits / temperature overflow are
greedy instead of NaN probabilities that always pick token 0."""

import time

import grpc
import pytest
import torch

from tandem.client import TandemClient, TandemRpcError
from tandem.server.engine.detokenizer import IncrementalDetokenizer
from tandem.server.engine.sampler import Sampler
from tandem.server.engine.sampling_params import MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, SamplingParams
from tandem.server.errors import InvalidRequest
from tests.api.conftest import loopback, start_engine
from tests.api.harness import ServerThread
from tests.engine.helpers import make_engine, random_prompts, run
from tests.engine.test_sampling import seqs_for

# float32 turns 1e-40 into a subnormal, which is what a proto float field delivers.
TINY = [1e-40, float(torch.tensor(1e-40, dtype=torch.float32)), 1e-30, 1e-8, 9.9e-6]


def test_tiny_temperatures_pick_the_most_likely_token():
    logits = torch.randn(len(TINY), 1000, generator=torch.Generator().manual_seed(0)) * 20
    params = [SamplingParams(temperature=t, seed=i) for i, t in enumerate(TINY)]
    assert all(p.greedy for p in params)
    chosen = Sampler(torch.device("cpu"), seed=0)(logits, seqs_for(params)).token_ids
    assert chosen == logits.argmax(dim=-1).tolist()


def test_the_smallest_sampled_temperature_does_not_overflow():
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(1)) * 1000
    params = SamplingParams(temperature=1e-5)
    assert not params.greedy
    assert Sampler(torch.device("cpu"), seed=0)(logits, seqs_for([params])).token_ids == [int(logits.argmax())]


def test_a_tiny_temperature_generates_what_greedy_does(tiny_hf_model, smollm2_tokenizer):
    prompt = random_prompts([9], len(smollm2_tokenizer), seed=4)[0]
    outputs = {}
    for name, temperature in (("greedy", 0.0), ("tiny", 1e-40)):
        params = SamplingParams(temperature=temperature, max_new_tokens=8, ignore_eos=True)
        outputs[name] = run(make_engine(tiny_hf_model, smollm2_tokenizer), {0: [(name, prompt, params)]})[name]
    assert outputs["tiny"] == outputs["greedy"]
    assert outputs["tiny"] != [0] * 8


def validate(**fields) -> None:
    SamplingParams(**fields).validate(prompt_len=5, max_model_len=512, vocab_size=1000)


def test_stop_lists_are_bounded():
    validate(stop=["x" * MAX_STOP_CHARS] * MAX_STOP_STRINGS, stop_token_ids=[1] * MAX_STOP_TOKEN_IDS)
    with pytest.raises(InvalidRequest) as info:
        validate(stop=["x"] * (MAX_STOP_STRINGS + 1))
    assert str(info.value) == "stop has 17 strings; at most 16 are allowed"
    with pytest.raises(InvalidRequest) as info:
        validate(stop=["ok", "x" * (MAX_STOP_CHARS + 1)])
    assert str(info.value) == "stop strings may have at most 256 characters; one has 257"
    with pytest.raises(InvalidRequest) as info:
        validate(stop_token_ids=[10**9] * 1000)
    assert str(info.value) == "stop_token_ids has 1000 ids; at most 256 are allowed"


def test_the_earliest_stop_string_wins_whatever_its_place_in_the_list(smollm2_tokenizer):
    """Both complete with the token " three": the text is cut before the one that starts first."""
    ids = smollm2_tokenizer("one two three four", add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(smollm2_tokenizer, [1], ["three", "two thr"])
    assert next(i for i, t in enumerate(ids) if detok.add(t)) == 2
    assert detok.take(finished=True) == "one "


def test_a_million_stop_strings_are_refused_at_once(tiny_model_dir):
    engine = start_engine(tiny_model_dir)
    server = ServerThread(loopback(), engine)
    try:
        with TandemClient(server.target, timeout=60, max_retries=0) as client:
            started = time.monotonic()
            with pytest.raises(TandemRpcError) as info:
                client.generate("hi", max_new_tokens=4, stop=["s"] * 1_000_000)
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.message == "stop has 1000000 strings; at most 16 are allowed"
            assert time.monotonic() - started < 10
            # A temperature a proto float turns subnormal is greedy over gRPC too, not NaN
            # probabilities that always pick token 0.
            greedy = client.generate("hi", max_new_tokens=8, temperature=0.0, ignore_eos=True).token_ids
            tiny = client.generate("hi", max_new_tokens=8, temperature=1e-40, ignore_eos=True).token_ids
            assert tiny == greedy and len(tiny) == 8 and tiny != [0] * 8
    finally:
        server.stop()
        engine.shutdown()
