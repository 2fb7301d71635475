"""End to end on the real SmolLM2: our engine's greedy output is transformers' generate."""

import pytest
import torch

from tandem.server.config import EngineConfig
from tandem.server.engine.llm_engine import Engine
from tandem.server.engine.sampling_params import SamplingParams
from tests.engine.helpers import make_engine, run

pytestmark = pytest.mark.smollm

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "What is 12 times 12?",
    "Who wrote Romeo and Juliet?",
    "Give me a synonym for happy.",
    "What is the boiling point of water in Celsius?",
    "Translate 'good morning' into Spanish.",
    "List two planets of the solar system.",
]


def chat_ids(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def test_concurrent_greedy_equals_transformers_generate(smollm2_hf, smollm2_tokenizer):
    prompts = [chat_ids(smollm2_tokenizer, q) for q in QUESTIONS]
    engine = make_engine(smollm2_hf, smollm2_tokenizer, dtype=torch.float32, max_num_batched_tokens=256)
    params = SamplingParams(temperature=0.0, max_new_tokens=24)
    # Staggered: a new request every iteration, so prefill chunks and decodes share batches.
    outputs = run(engine, {i: [(f"q{i}", p, params)] for i, p in enumerate(prompts)})
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = smollm2_hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
        assert outputs[f"q{i}"] == ref[0, len(prompt) :].tolist(), QUESTIONS[i]
    assert engine.stats().num_free_blocks == engine.stats().num_total_blocks


def test_default_model_answers_in_bfloat16():
    """The embedded default loads from the installed package and stays sensible in bf16."""
    engine = Engine.from_config(EngineConfig(dtype="bfloat16"))
    prompt = chat_ids(engine.tokenizer, "What is the capital of France?")
    engine.add_request("fr", prompt, SamplingParams(temperature=0.0, max_new_tokens=20))
    text, reason = "", None
    while engine.has_work():
        for out in engine.step():
            text += out.text
            reason = out.finish_reason
    assert text == "The capital of France is Paris."
    assert reason.value == "eos"
