"""Shared fixtures: a tiny random Llama (with the real SmolLM2 tokenizer) and the real SmolLM2."""

import os
import socket
from pathlib import Path

import pytest
import torch

# Without CUDA, Triton kernels run only under Triton's interpreter, and Triton reads this
# variable when it is first imported, which peft and transformers do during collection.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings

from tandem.server.model.loader import default_model_path

# Property tests draw the same inputs on every run (a seed from each test's name, no example
# database): a release is never blocked by an input no earlier run tried. For a wider hunt,
# HYPOTHESIS_PROFILE=explore draws new inputs each run and keeps the failing ones.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    initializer_range=0.1,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name, local_files_only=True)


def ipv6_loopback() -> bool:
    """Whether this host can listen on IPv6's loopback (a container may have no IPv6)."""
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        return False
    return True


def make_tiny_hf_model(tokenizer, seed: int = 0, **overrides):
    """A randomly initialised LlamaForCausalLM sized for tests, vocabulary of the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**TINY_CONFIG, **overrides},
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_hf_model(smollm2_tokenizer):
    return make_tiny_hf_model(smollm2_tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_hf_model, smollm2_tokenizer) -> Path:
    """The tiny model saved as a Hugging Face directory (safetensors + tokenizer + chat template)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_hf_model.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_path):
    """The real SmolLM2 as a transformers model (float32), the oracle for end-to-end tests."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32, local_files_only=True
    ).eval()
