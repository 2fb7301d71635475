"""The Triton paged decode attention (CUDA's decode path) against SDPA over the gathered
context: float32 to rounding under the interpreter on CPU and natively on CUDA; bfloat16 and
float16 on CUDA no further from a float64 reference than SDPA's own result in that dtype."""

import pytest
import torch

from tandem.kernels import decode_attention as dispatch
from tests.kernels.test_decode_attention import SHAPES, make_case, sdpa
from tests.kernels.test_lora_kernels import CUDA, DEVICE, needs_cuda, needs_triton

triton_kernel = pytest.importorskip("tandem.kernels.decode_attention_triton")

# Head sizes that are not powers of two (40) are masked inside the kernel.
TRITON_SHAPES = {**SHAPES, "head-dim-40": (3, 50, 8, 2, 40), "llama-8b-heads": (6, 90, 32, 8, 128)}


def on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


@needs_triton
@pytest.mark.parametrize("shape", TRITON_SHAPES.values(), ids=TRITON_SHAPES.keys())
def test_float32_equals_sdpa(shape):
    q, k_cache, v_cache, slots, lens, valid = on_device(*make_case(*shape, torch.float32))
    got = triton_kernel.paged_decode(q, k_cache, v_cache, slots, lens)
    torch.testing.assert_close(got, sdpa(q, k_cache, v_cache, slots, valid), rtol=1e-5, atol=1e-5)


@needs_triton
def test_the_slots_past_each_length_are_never_read():
    """The engine pads contexts with the null slot; the kernel must not depend on it: NaN
    there (slots past the length pointing at a NaN row) leaves the output as it was."""
    q, k_cache, v_cache, slots, lens, valid = make_case(4, 40, 8, 2, 64, torch.float32)
    k_cache[-1], v_cache[-1] = float("nan"), float("nan")
    q, k_cache, v_cache, slots, lens, valid = on_device(q, k_cache, v_cache, slots, lens, valid)
    assert (~valid).any()
    got = triton_kernel.paged_decode(q, k_cache, v_cache, slots, lens)
    assert not got.isnan().any()
    clean_k, clean_v = k_cache.nan_to_num(0.0), v_cache.nan_to_num(0.0)
    torch.testing.assert_close(got, sdpa(q, clean_k, clean_v, slots, valid), rtol=1e-5, atol=1e-5)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", TRITON_SHAPES.values(), ids=TRITON_SHAPES.keys())
def test_half_precision_is_as_close_to_float64_as_sdpa(shape, dtype):
    q, k_cache, v_cache, slots, lens, valid = on_device(*make_case(*shape, dtype, seed=1))
    exact = sdpa(q.double(), k_cache.double(), v_cache.double(), slots, valid)
    got = dispatch.decode_attention(q, k_cache, v_cache, slots, lens)
    ours = (got.double() - exact).abs().max().item()
    theirs = (sdpa(q, k_cache, v_cache, slots, valid).double() - exact).abs().max().item()
    assert got.dtype == dtype and ours <= 1.5 * theirs, (ours, theirs)


@pytest.mark.skipif(not CUDA, reason="the dispatch to Triton happens for CUDA tensors")
def test_cuda_calls_go_to_the_triton_kernel(monkeypatch):
    calls = []
    run = triton_kernel.paged_decode
    monkeypatch.setattr(triton_kernel, "paged_decode", lambda *a: calls.append(1) or run(*a))
    q, k_cache, v_cache, slots, lens, valid = on_device(*make_case(3, 30, 8, 2, 64, torch.float32))
    got = dispatch.decode_attention(q, k_cache, v_cache, slots, lens)
    assert calls and got is not None
    assert dispatch.decode_attention(q.bfloat16(), k_cache, v_cache, slots, lens) is None  # mixed dtypes: torch path
