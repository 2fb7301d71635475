"""What transformers' GGUF reader drops, read from the file with llama.cpp's meaning: the
RoPE factors of a Llama 3.x GGUF give transformers' llama3 frequencies, a named scaling type
is refused, and the end-of-turn ids join the end-of-sequence ids."""

import math

import numpy as np
import pytest
import torch
from gguf import GGUFWriter
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from tandem.server.errors import ModelLoadError
from tandem.server.model.gguf_extras import GGUFExtras, scale_rope

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def write_gguf(path, kv: dict, tensors: dict) -> None:
    writer = GGUFWriter(str(path), "llama")
    for key, value in kv.items():
        (writer.add_string if isinstance(value, str) else writer.add_uint32)(key, value)
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


def test_a_gguf_naming_a_rope_scaling_type_is_refused_and_a_plain_one_is_unchanged(tmp_path):
    scaled, plain = tmp_path / "scaled.gguf", tmp_path / "plain.gguf"
    write_gguf(scaled, {"llama.rope.scaling.type": "yarn"}, {})
    write_gguf(plain, {"llama.rope.scaling.type": "none"}, {})
    with pytest.raises(ModelLoadError, match="^scaled.gguf asks for RoPE scaling 'yarn', which Tandem does not read from a GGUF file"):
        GGUFExtras(scaled).rope_factors()
    assert GGUFExtras(plain).rope_factors() is None and GGUFExtras(plain).end_token_ids() == []
