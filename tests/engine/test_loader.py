"""Loading a model: clear errors, never a traceback, for paths we cannot serve."""

import json
from pathlib import Path

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


@pytest.mark.parametrize("rope_scaling", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4, "original_max_position_embeddings": 128},
], ids=lambda scaling: scaling["rope_type"])
def test_rope_over_part_of_each_head_is_refused_at_build(smollm2_tokenizer, rope_scaling):
    """A scaled RoPE's partial_rotary_factor gives frequencies for part of each head: the model
    built, then its half-wide rotary table failed at the first forward."""
    from tandem.server.model.loader import build_from_hf
    from tests.conftest import make_tiny_hf_model

    model = make_tiny_hf_model(smollm2_tokenizer, partial_rotary_factor=0.5, rope_scaling=rope_scaling)
    match = rf"RoPE over 8 of each head's 16 dimensions \(partial_rotary_factor with RoPE type '{rope_scaling['rope_type']}'\)"
    with pytest.raises(ModelLoadError, match=match):
        build_from_hf(model, torch.float32, CPU)


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


@pytest.mark.parametrize("method", ["gptq", "bitsandbytes", "fp8"])
def test_a_quantized_checkpoint_is_refused_before_its_weights_load(tmp_path, tiny_model_dir, monkeypatch, method):
    """transformers first asked for the method's package (`pip install optimum`, ...), advice
    that ended, after the whole load, in the refusal of its weights; fp8 served on a CPU host
    (dequantised there) and was refused on a recent GPU."""
    import shutil

    import transformers

    model = tmp_path / "quantized"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": method, "bits": 4}}))

    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    with pytest.raises(ModelLoadError, match=f"the checkpoint is quantized \\({method}\\)") as info:
        load_model(str(model), torch.float32, CPU)
    assert "pip install" not in str(info.value)


def test_a_model_directory_given_as_dot_is_served_under_its_name(tiny_model_dir, monkeypatch):
    """`--model .` served the model as "" (the OpenAI model id, every metric's model_name)."""
    from tandem.server.model.loader import served_name

    monkeypatch.chdir(tiny_model_dir)
    assert served_name(".") == served_name("./") == tiny_model_dir.name
    assert served_name("..") == tiny_model_dir.parent.name


def test_yarn_without_a_factor_serves_the_context_transformers_derives(tiny_hf_model):
    """transformers takes an unset YaRN factor as max_position_embeddings / original; the
    context limit multiplied None and raised a TypeError outside the load's error handling."""
    import copy

    from transformers import LlamaForCausalLM

    from tandem.server.model.loader import _max_position

    config = copy.deepcopy(tiny_hf_model.config)
    config.max_position_embeddings = 4096
    config.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": None, "original_max_position_embeddings": 1024}
    rotary = LlamaForCausalLM(config).model.rotary_emb  # transformers accepts it and scales as for factor 4
    with_factor = copy.deepcopy(config)
    with_factor.rope_parameters = {**config.rope_parameters, "factor": 4.0}
    assert torch.equal(rotary.inv_freq, LlamaForCausalLM(with_factor).model.rotary_emb.inv_freq)
    assert _max_position(config) == _max_position(with_factor) == 4096


def test_quantized_weights_are_refused_not_served_without_their_scales(tiny_hf_model):
    """float8 codes copied without their scales would serve projections off by ~1000x."""
    from tandem.server.model.loader import check_full_precision

    sd = dict(tiny_hf_model.state_dict())
    check_full_precision(sd)
    sd["model.layers.0.self_attn.q_proj.weight"] = sd["model.layers.0.self_attn.q_proj.weight"].to(torch.float8_e4m3fn)
    with pytest.raises(ModelLoadError, match=r"quantized weights \(model\.layers\.0\.self_attn\.q_proj\.weight: float8_e4m3fn\)"):
        check_full_precision(sd)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_directory_loads_straight_into_the_serving_dtype_with_the_cast_weights(tiny_model_dir, tiny_hf_model, dtype):
    """Cast once from the stored dtype: the same numbers as casting the float32 weights, and
    none of them shared with the staging model."""
    from tandem.server.model.loader import build_from_hf

    loaded = load_model(str(tiny_model_dir), dtype, CPU).model.state_dict()
    cast = build_from_hf(tiny_hf_model, dtype, CPU).state_dict()
    assert loaded.keys() == cast.keys()
    for name, tensor in loaded.items():
        assert tensor.dtype == dtype, name
        assert torch.equal(tensor, cast[name]), name
    staged = {t.untyped_storage().data_ptr() for t in tiny_hf_model.state_dict().values()}
    same_dtype = build_from_hf(tiny_hf_model, torch.float32, CPU).state_dict().values()
    assert not staged & {t.untyped_storage().data_ptr() for t in same_dtype}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the anonymous memory of /proc/self/status")
@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
def test_loading_a_directory_into_bfloat16_holds_one_copy_of_the_weights(tmp_path, tiny_model_dir, smollm2_tokenizer, stored):
    """Staged in float32 beside the built model, a bfloat16 directory's load peaked at 3.1x the
    model's size (an 8B model: 50 GB); staged in the serving dtype, a float32 directory's at
    2x. The files are mapped as stored and each tensor cast once: about 1x (bench/load_memory.py)."""
    from bench.load_memory import measure
    from tests.conftest import make_tiny_hf_model

    big = tmp_path / "big"
    make_tiny_hf_model(smollm2_tokenizer, hidden_size=512, intermediate_size=2048, num_hidden_layers=4).to(stored).save_pretrained(big)
    smollm2_tokenizer.save_pretrained(big)
    load = measure(big, "bfloat16", tiny_model_dir, "tandem")
    assert load["peak_mb"] / load["model_mb"] < 1.5


def test_a_gguf_file_loads_in_bfloat16_as_the_cast_of_its_float32_weights_without_warnings(smollm2_path, smollm2_hf, caplog):
    """Dequantised straight into bfloat16: the same numbers as the float32 load cast, and no
    warning from transformers that packed GGUF weights are fastest in float32 (they are
    always unpacked here)."""
    from tandem.server.model.loader import build_from_hf

    with caplog.at_level("WARNING"):
        loaded = load_model(str(smollm2_path), torch.bfloat16, CPU).model.state_dict()
    assert not [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    cast = build_from_hf(smollm2_hf, torch.bfloat16, CPU).state_dict()
    assert loaded.keys() == cast.keys()
    for name, tensor in loaded.items():
        assert torch.equal(tensor, cast[name]), name


def test_a_released_staging_model_is_freed_and_the_built_model_is_the_same(smollm2_tokenizer):
    """release: the staging model's weights are let go as the layers are built (a bfloat16
    directory's staging is a mapping of its file, which the peak test above cannot see), and
    what is built is what building without release gives."""
    from tandem.server.model.loader import build_from_hf
    from tests.conftest import make_tiny_hf_model

    kept = build_from_hf(make_tiny_hf_model(smollm2_tokenizer, seed=3), torch.bfloat16, CPU).state_dict()
    staging = make_tiny_hf_model(smollm2_tokenizer, seed=3)
    released = build_from_hf(staging, torch.bfloat16, CPU, release=True).state_dict()
    assert all(p.is_meta for p in staging.parameters())
    assert released.keys() == kept.keys() and all(torch.equal(released[k], kept[k]) for k in kept)


def test_a_max_model_len_past_the_models_limit_is_refused_before_its_weights_load(tiny_model_dir, monkeypatch):
    """It was refused by the engine, after the whole load: a large model's minutes spent on a bad flag."""
    import transformers

    from tandem.server.config import EngineConfig
    from tandem.server.engine.llm_engine import Engine

    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    config = EngineConfig(model=str(tiny_model_dir), dtype="float32", device="cpu", max_model_len=513)
    with pytest.raises(ValueError, match="^max_model_len 513 exceeds the model's limit of 512$"):
        Engine.from_config(config)
