"""The engine with a layer's elementwise ops in the C kernels gives the torch path's tokens and
logits, and the kernels do take every norm, rope and SiLU of an inference forward."""

from collections import Counter

import pytest
import torch

from tandem.kernels import fused_elementwise
from tests.conftest import make_tiny_hf_model
from tests.engine.test_packed_forward import LOGITS_TOLERANCE, greedy_run

pytestmark = pytest.mark.skipif(fused_elementwise.library() is None, reason="no C compiler to build the native kernels")


@pytest.fixture(scope="module")
def model_32_wide_heads(smollm2_tokenizer):
    """The tiny model with heads of 32 (the rope kernel's smallest), 2 layers."""
    return make_tiny_hf_model(smollm2_tokenizer, hidden_size=128, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_give_the_torch_paths_tokens_and_logits(model_32_wide_heads, smollm2_tokenizer, monkeypatch, dtype):
    taken: Counter[str] = Counter()
    for name in ("rms_norm", "rope", "silu_mul"):
        kernel = getattr(fused_elementwise, name)

        def counted(*args, _kernel=kernel, _name=name, **kwargs):
            out = _kernel(*args, **kwargs)
            taken[_name] += out is not None
            return out

        monkeypatch.setattr(fused_elementwise, name, counted)
    _, fused_out, fused_logits = greedy_run(model_32_wide_heads, smollm2_tokenizer, dtype)
    steps = sum(len(v) for v in fused_logits.values())
    layers = model_32_wide_heads.config.num_hidden_layers
    # Every forward: two norms a layer and the final one, one rope and one SiLU a layer.
    assert taken["rope"] == taken["silu_mul"] and taken["rope"] % layers == 0 and taken["rope"] > 0
    assert taken["rms_norm"] == taken["rope"] * 2 + taken["rope"] // layers
    assert steps > 0

    monkeypatch.setattr(fused_elementwise, "library", lambda: None)
    _, plain_out, plain_logits = greedy_run(model_32_wide_heads, smollm2_tokenizer, dtype)
    assert fused_out == plain_out
    for rid in plain_out:
        torch.testing.assert_close(torch.stack(fused_logits[rid]), torch.stack(plain_logits[rid]), **LOGITS_TOLERANCE[dtype])
