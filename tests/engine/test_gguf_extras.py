"""What transformers' GGUF reader drops, read from the file with llama.cpp's meaning: the
RoPE factors of a Llama 3.x GGUF give transformers' llama3 frequencies, a linear factor its
linear ones, another named scaling type is refused, and the end-of-turn ids join the
end-of-sequence ids."""

import math

import gguf
import numpy as np
import pytest
import torch
from gguf import GGUFWriter
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from tandem.server.config import EngineConfig
from tandem.server.engine.llm_engine import Engine
from tandem.server.engine.sampling_params import SamplingParams
from tandem.server.errors import ModelLoadError
from tandem.server.model.gguf_extras import GGUFExtras, scale_rope
from tandem.server.model.loader import load_model
from tests.conftest import TINY_CONFIG
from tests.engine.test_forward_oracle import assert_matches_transformers, record_logits
from tests.engine.helpers import random_prompts, run

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def add_keys(writer: GGUFWriter, kv: dict) -> None:
    for key, value in kv.items():
        {str: writer.add_string, int: writer.add_uint32, float: writer.add_float32}[type(value)](key, value)


def write_gguf(path, kv: dict, tensors: dict) -> None:
    writer = GGUFWriter(str(path), "llama")
    add_keys(writer, kv)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def converter_factors(inv_freq: torch.Tensor, scaling: dict) -> np.ndarray:
    """The rope_freqs llama.cpp's convert_hf_to_gguf.py writes for a llama3-scaled model."""
    low, high = scaling["original_max_position_embeddings"] / scaling["low_freq_factor"], scaling["original_max_position_embeddings"] / scaling["high_freq_factor"]
    factors = []
    for freq in inv_freq.tolist():
        wavelength = 2 * math.pi / freq
        if wavelength < high:
            factors.append(1.0)
        elif wavelength > low:
            factors.append(scaling["factor"])
        else:
            smooth = (scaling["original_max_position_embeddings"] / wavelength - scaling["low_freq_factor"]) / (scaling["high_freq_factor"] - scaling["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / scaling["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


def test_a_llama3_gguf_s_rope_factors_give_transformers_llama3_frequencies(tmp_path):
    """transformers' GGUF reader skipped rope_freqs: a Llama 3.x GGUF ran unscaled."""
    config = dict(hidden_size=2048, num_attention_heads=32, rope_theta=500000.0, max_position_embeddings=131072)
    plain, _ = ROPE_INIT_FUNCTIONS["linear"](LlamaConfig(**config, rope_scaling={"rope_type": "linear", "factor": 1.0}))
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**config, rope_scaling=LLAMA3))
    path = tmp_path / "llama3.gguf"
    write_gguf(path, {"tokenizer.ggml.eot_token_id": 128009, "tokenizer.ggml.eom_token_id": 128008},
               {"rope_freqs.weight": converter_factors(plain, LLAMA3)})
    extras = GGUFExtras(path)
    factors = extras.rope_factors()
    assert factors is not None and not torch.equal(expected, plain)
    torch.testing.assert_close(scale_rope(plain, factors, path), expected.float(), rtol=1e-6, atol=0)
    assert extras.end_token_ids() == [128009, 128008]
    with pytest.raises(ModelLoadError, match="has 32 RoPE frequency factors .* for 16 frequencies"):
        scale_rope(plain[:16], factors, path)


def write_tiny_gguf(path, model, kv: dict) -> None:
    """A transformers Llama model as llama.cpp's converter writes it (q and k rows permuted),
    float32, with a byte-level BPE tokenizer of single characters and the extra keys kv."""
    config = model.config
    writer = GGUFWriter(str(path), "llama")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    # Without a merge transformers reads the file's tokenizer as a SentencePiece one.
    chars = [chr(0x100 + i) for i in range(config.vocab_size - len(specials) - 1)]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(specials + chars + [chars[0] + chars[1]])
    writer.add_token_types([gguf.TokenType.CONTROL] * len(specials) + [gguf.TokenType.NORMAL] * (len(chars) + 1))
    writer.add_token_merges([f"{chars[0]} {chars[1]}"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    add_keys(writer, kv)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}.get(name.split(".")[-2])
        if heads:
            tensor = tensor.reshape(heads, 2, tensor.shape[0] // heads // 2, -1).transpose(1, 2).reshape(tensor.shape)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


LINEAR_KEYS = [
    {"llama.rope.scaling.factor": 4.0},
    {"llama.rope.scale_linear": 4.0},
    {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0},
]


@pytest.mark.parametrize("kv", LINEAR_KEYS, ids=["no-type", "old-key", "linear"])
def test_a_gguf_s_linear_factor_gives_transformers_linear_frequencies(tmp_path, kv):
    """llama.cpp reads a missing scaling type as linear, its factor under either key:
    transformers' GGUF reader drops both, and such a file ran unscaled (or, naming linear, was
    refused); "none" never scales."""
    config = dict(hidden_size=2048, num_attention_heads=32, rope_theta=10000.0)
    plain, _ = ROPE_INIT_FUNCTIONS["linear"](LlamaConfig(**config, rope_scaling={"rope_type": "linear", "factor": 1.0}))
    expected, _ = ROPE_INIT_FUNCTIONS["linear"](LlamaConfig(**config, rope_scaling={"rope_type": "linear", "factor": 4.0}))
    scaled, unscaled = tmp_path / "scaled.gguf", tmp_path / "unscaled.gguf"
    write_gguf(scaled, kv, {})
    write_gguf(unscaled, {**kv, "llama.rope.scaling.type": "none"}, {})
    factors = GGUFExtras(scaled).rope_factors()
    assert factors is not None
    assert torch.equal(scale_rope(plain, factors, scaled), expected)
    assert GGUFExtras(unscaled).rope_factors() is None


@pytest.mark.parametrize("kv", LINEAR_KEYS, ids=["no-type", "old-key", "linear"])
def test_a_linear_gguf_serves_the_logits_of_transformers_linear_rope(tmp_path, kv):
    """End to end: a tiny GGUF with a linear factor against the same weights in transformers
    with rope_scaling linear; unscaled, the logits were off from the second token."""
    torch.manual_seed(3)
    linear = {"rope_type": "linear", "factor": 4.0}
    config = LlamaConfig(**{**TINY_CONFIG, "vocab_size": 512, "tie_word_embeddings": True}, rope_scaling=linear)
    oracle = LlamaForCausalLM(config).eval()
    path = tmp_path / "linear.gguf"
    write_tiny_gguf(path, oracle, kv)
    engine = Engine(load_model(str(path), torch.float32, torch.device("cpu")), EngineConfig(adapter_cache_prefault=False))
    seen = record_logits(engine)
    prompt = random_prompts([20], config.vocab_size, seed=3)[0]
    outputs = run(engine, {0: [("r", prompt, SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True))]})
    assert_matches_transformers(oracle, prompt, outputs["r"], seen["r"])


def test_a_gguf_naming_a_rope_scaling_type_is_refused_and_a_plain_one_is_unchanged(tmp_path):
    scaled, plain = tmp_path / "scaled.gguf", tmp_path / "plain.gguf"
    write_gguf(scaled, {"llama.rope.scaling.type": "yarn"}, {})
    write_gguf(plain, {"llama.rope.scaling.type": "none"}, {})
    with pytest.raises(ModelLoadError, match="^scaled.gguf asks for RoPE scaling 'yarn', which Tandem does not read from a GGUF file"):
        GGUFExtras(scaled).rope_factors()
    assert GGUFExtras(plain).rope_factors() is None and GGUFExtras(plain).end_token_ids() == []
