"""The C decode attention against SDPA over the gathered context (the torch path it
replaces) and a float64 reference: float32 to rounding, bfloat16 no further from float64
than SDPA's own bfloat16 result; ragged contexts in blocks scattered over the cache; and the
torch path wherever the kernel cannot take a call."""

import pytest
import torch
import torch.nn.functional as F

from tandem.kernels import decode_attention as kernel

needs_native = pytest.mark.skipif(kernel.library() is None, reason="no C compiler to build the native kernel")


def make_case(n: int, context: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int = 0):
    """n sequences with contexts of context/2 .. context tokens in blocks of 16 slots spread
    over a cache, padded with a last (null) slot as the engine does."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(max(1, context // 2), context + 1, (n,), generator=g).to(torch.int32)
    width, block = int(lens.max()), 16
    num_slots = 2 * n * -(-width // block) * block + 1
    k_cache = torch.randn(num_slots, kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_slots, kv_heads, head_dim, generator=g).to(dtype)
    q = torch.randn(n, heads, head_dim, generator=g).to(dtype)
    blocks = torch.randperm(num_slots // block, generator=g)[: n * -(-width // block)].view(n, -1)
    slots = (blocks[:, :, None] * block + torch.arange(block)).view(n, -1)[:, :width]
    valid = torch.arange(width)[None, :] < lens[:, None].long()
    slots = torch.where(valid, slots, num_slots - 1).contiguous()
    return q, k_cache, v_cache, slots, lens, valid


def sdpa(q, k_cache, v_cache, slots, valid):
    """The torch path: the context gathered, query heads of a KV head along the query axis."""
    n, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    k = k_cache[slots].transpose(1, 2)
    v = v_cache[slots].transpose(1, 2)
    o = F.scaled_dot_product_attention(q.view(n, kv_heads, heads // kv_heads, head_dim), k, v, attn_mask=valid.view(n, 1, 1, -1))
    return o.reshape(n, heads * head_dim)


SHAPES = {
    "smollm2": (24, 200, 9, 3, 64),
    "one-token-contexts": (3, 1, 9, 3, 64),
    "mha-128": (5, 70, 4, 4, 128),
    "gqa-8-to-1": (4, 300, 8, 1, 32),
    "one-sequence-long": (1, 2000, 9, 3, 64),
    "head-48": (3, 50, 6, 2, 48),
    "gqa-2-to-1": (2, 9, 4, 2, 64),
    "gqa-6-to-1-head-16": (3, 37, 6, 1, 16),  # on AVX2, heads in a group of 4 and one of 2
}


@needs_native
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_float32_equals_sdpa(shape):
    q, k_cache, v_cache, slots, lens, valid = make_case(*shape, torch.float32)
    got = kernel.decode_attention(q, k_cache, v_cache, slots, lens)
    torch.testing.assert_close(got, sdpa(q, k_cache, v_cache, slots, valid), rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_bfloat16_is_as_close_to_float64_as_sdpa(shape):
    q, k_cache, v_cache, slots, lens, valid = make_case(*shape, torch.bfloat16, seed=1)
    exact = sdpa(q.double(), k_cache.double(), v_cache.double(), slots, valid)
    got = kernel.decode_attention(q, k_cache, v_cache, slots, lens)
    ours = (got.double() - exact).abs().max().item()
    theirs = (sdpa(q, k_cache, v_cache, slots, valid).double() - exact).abs().max().item()
    assert got.dtype == torch.bfloat16 and ours <= 1.25 * theirs, (ours, theirs)


def test_what_the_kernel_does_not_take_goes_to_torch():
    """Mixed dtypes, a head size that is not a multiple of 16, a query that records a graph:
    None, and the caller's SDPA path serves."""
    q, k_cache, v_cache, slots, lens, _ = make_case(2, 20, 4, 2, 64, torch.float32)
    assert kernel.decode_attention(q.bfloat16(), k_cache, v_cache, slots, lens) is None
    q40, k40, v40, *_ = make_case(2, 20, 4, 2, 40, torch.float32)
    assert kernel.decode_attention(q40, k40, v40, slots, lens) is None
    assert kernel.decode_attention(q.requires_grad_(), k_cache, v_cache, slots, lens) is None


def test_switched_off_it_is_not_built(monkeypatch, tmp_path):
    monkeypatch.setenv("TANDEM_NATIVE_ATTENTION", "0")
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    kernel.library.cache_clear()
    try:
        q, k_cache, v_cache, slots, lens, _ = make_case(2, 20, 4, 2, 64, torch.float32)
        assert kernel.decode_attention(q, k_cache, v_cache, slots, lens) is None
        assert not list(tmp_path.rglob("*.so"))
    finally:
        kernel.library.cache_clear()
