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
