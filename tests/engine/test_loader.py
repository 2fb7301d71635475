"""Loading a model: clear errors, never a traceback, for paths we cannot serve."""

import json

import pytest
import torch

from tandem.server.errors import ModelLoadError
from tandem.server.model.loader import load_model

CPU = torch.device("cpu")


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"), torch.float32, CPU)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path), torch.float32, CPU)


def test_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"\0" * 10)
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_model(str(f), torch.float32, CPU)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelLoadError, match="unsupported architecture 'gpt2'"):
        load_model(str(tmp_path), torch.float32, CPU)


def test_corrupt_gguf(tmp_path):
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="could not"):
        load_model(str(f), torch.float32, CPU)


def test_truncated_safetensors(tmp_path, tiny_model_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="could not load the weights"):
        load_model(str(broken), torch.float32, CPU)


def test_an_activation_other_than_silu_is_refused(tmp_path, smollm2_tokenizer):
    from tests.conftest import make_tiny_hf_model

    make_tiny_hf_model(smollm2_tokenizer, hidden_act="gelu").save_pretrained(tmp_path)
    smollm2_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"unsupported MLP activation 'gelu': Tandem's MLP is SwiGLU \(silu\)"):
        load_model(str(tmp_path), torch.float32, CPU)


def test_a_checkpoint_missing_weights_is_refused_not_filled_at_random(tmp_path, tiny_model_dir):
    """A shard set without layer 1's down_proj: transformers fills it with random values and
    only logs it; served, it would answer garbage that changes on every restart."""
    import shutil

    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    shutil.copytree(tiny_model_dir, partial)
    weights = load_file(partial / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"lacks 1 weight\(s\) a causal LM needs \(model\.layers\.1\.mlp\.down_proj\.weight\)"):
        load_model(str(partial), torch.float32, CPU)


def test_a_base_model_save_without_its_head_is_refused(tmp_path, smollm2_tokenizer):
    """A bare LlamaModel save with untied embeddings (an embedding model) has no lm_head."""
    from transformers import LlamaModel

    from tests.conftest import make_tiny_hf_model

    hf = make_tiny_hf_model(smollm2_tokenizer, tie_word_embeddings=False)
    body = LlamaModel(hf.config)
    body.config.architectures = ["LlamaForCausalLM"]
    body.save_pretrained(tmp_path)
    smollm2_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"lm_head\.weight\).*not a complete causal-LM checkpoint"):
        load_model(str(tmp_path), torch.float32, CPU)


def test_quantized_weights_are_refused_not_served_without_their_scales(tiny_hf_model):
    """float8 codes copied without their scales would serve projections off by ~1000x."""
    from tandem.server.model.loader import check_full_precision

    sd = dict(tiny_hf_model.state_dict())
    check_full_precision(sd)
    sd["model.layers.0.self_attn.q_proj.weight"] = sd["model.layers.0.self_attn.q_proj.weight"].to(torch.float8_e4m3fn)
    with pytest.raises(ModelLoadError, match=r"quantized weights \(model\.layers\.0\.self_attn\.q_proj\.weight: float8_e4m3fn\)"):
        check_full_precision(sd)
