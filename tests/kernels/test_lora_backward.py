"""Gradients of batched LoRA: the reference against dense autograd, Triton against the reference.

Without CUDA the Triton kernels run under the interpreter (TRITON_INTERPRET=1, float32
only, small shapes); with CUDA they run natively and mixed precision is checked too.
"""

import importlib

import pytest
import torch

from tandem.kernels.lora import LoRABatch, LoRAWeights, lora_delta_autograd, reference, reference_backward

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _import_triton_backward():
    """The Triton kernels; on CPU they run interpreted (tests/conftest.py sets TRITON_INTERPRET)."""
    try:
        return importlib.import_module("tandem.kernels.lora.triton_sgmv_backward")
    except ImportError:
        return None


triton_backward = _import_triton_backward()
needs_triton = pytest.mark.skipif(triton_backward is None, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


class Step:
    """A random slot pool and step: ragged segments, tokens without an adapter, mixed ranks.

    Storage past each slot's rank, and all of the storage of slots no token uses, holds NaN,
    so any read of it poisons the result. slots: [T] slot of each token, -1 = no adapter.
    """

    def __init__(self, seed, slots, in_features, out_slices, ranks, max_rank, dtype=torch.float64, device="cpu"):
        gen = torch.Generator().manual_seed(seed)
        num_slots, num_slices = len(ranks), len(out_slices)
        a = torch.randn(num_slots, num_slices, max_rank, in_features, generator=gen) / in_features**0.5
        b = torch.randn(num_slots, sum(out_slices), max_rank, generator=gen) / max_rank**0.5
        for slot, rank in enumerate(ranks):
            a[slot, :, rank:] = float("nan")
            b[slot, :, rank:] = float("nan")
            if slot not in slots:
                a[slot] = b[slot] = float("nan")
        self.a = a.view(num_slots, num_slices * max_rank, in_features).to(device, dtype)
        self.b = b.to(device, dtype)
        self.x = torch.randn(len(slots), in_features, generator=gen).to(device, dtype)
        self.dy = torch.randn(len(slots), sum(out_slices), generator=gen).to(device, dtype)
        self.batch = LoRABatch.build(slots, num_slots, device=device)
        self.slots, self.ranks, self.max_rank, self.out_slices = list(slots), list(ranks), max_rank, tuple(out_slices)

    def weights(self, a=None, b=None) -> LoRAWeights:
        a, b = self.a if a is None else a, self.b if b is None else b
        return LoRAWeights(a, b, torch.tensor(self.ranks, dtype=torch.int32, device=a.device), self.out_slices)

    def grads(self, backend, needs=(True, True, True), x=None, a=None, b=None):
        """(delta, dx, da, db) of lora_delta_autograd; a gradient is None where not needed."""
        given = (x, a, b)
        x, a, b = (
            (mine if t is None else t).clone().requires_grad_(need)
            for mine, t, need in zip((self.x, self.a, self.b), given, needs)
        )
        delta = lora_delta_autograd(x, self.weights(a, b), self.batch, backend=backend)
        delta.backward(self.dy.to(delta.dtype))
        return delta.detach(), x.grad, a.grad, b.grad

    def dense_grads(self):
        """(delta, dx, da, db) in float64 from plain autograd of dense_delta."""
        x, a, b = (t.detach().cpu().double().requires_grad_() for t in (self.x, self.a, self.b))
        delta = dense_delta(x, a, b, self.slots, self.ranks, self.out_slices, self.max_rank)
        delta.backward(self.dy.cpu().double())
        return delta.detach(), x.grad, a.grad, b.grad

    def written_rank(self):
        """[num_slots, max_rank] bool: j below the slot's rank, for slots with tokens."""
        used = torch.tensor([slot in self.slots for slot in range(len(self.ranks))])
        below = torch.arange(self.max_rank)[None, :] < torch.tensor(self.ranks)[:, None]
        return used[:, None] & below


def dense_delta(x, a, b, slots, ranks, out_slices, max_rank):
    """Naive LoRA: each token gathers its own A and B, zeroed past its rank, then einsum.

    torch.where (not a product with a mask) keeps the NaN stored past each rank out of the
    result and of the gradients.
    """
    num_tokens, num_slices = x.shape[0], len(out_slices)
    slot_t = torch.tensor(slots, dtype=torch.int64).clamp(min=0)
    rank_t = torch.tensor([ranks[s] if s >= 0 else 0 for s in slots], dtype=torch.int64)
    keep = torch.arange(max_rank)[None, :] < rank_t[:, None]
    a_t = torch.where(keep[:, None, :, None], a[slot_t].view(num_tokens, num_slices, max_rank, x.shape[1]), 0.0)
    b_t = torch.where(keep[:, None, :], b[slot_t], 0.0)
    v = torch.einsum("tsrk,tk->tsr", a_t, x)
    parts, start = [], 0
    for s, width in enumerate(out_slices):
        parts.append(torch.einsum("tr,tnr->tn", v[:, s], b_t[:, start : start + width]))
        start += width
    return torch.cat(parts, 1)


def random_slots(seed, num_tokens, used, no_adapter=0.25):
    """num_tokens slots drawn from `used`, a `no_adapter` share of them -1, in random order."""
    gen = torch.Generator().manual_seed(seed)
    picks = torch.tensor(used)[torch.randint(0, len(used), (num_tokens,), generator=gen)]
    picks[torch.rand(num_tokens, generator=gen) < no_adapter] = -1
    return picks.tolist()


# (num_tokens, slots in use, in_features, out_slices, ranks, max_rank): every pool has a slot
# no token uses, and none of the dims is a block multiple.
SHAPES = {
    "qkv": (37, [0, 1, 2, 3], 40, (40, 24, 24), [4, 16, 9, 0, 7], 16),
    "one_slice_rank64": (29, [0, 2], 72, (40,), [64, 4, 33], 64),
    "in_features_over_a_block": (19, [0, 2], 150, (24, 8, 8), [5, 3, 8], 8),
    "one_token": (1, [1], 33, (20, 12), [3, 6], 8),
    "no_adapter": (5, [0], 24, (16, 8), [4, 4], 4),
    "no_tokens": (0, [0], 24, (16, 8), [4, 4], 4),
}


def make_step(name, dtype=torch.float64, device="cpu", seed=0):
    num_tokens, used, in_features, out_slices, ranks, max_rank = SHAPES[name]
    slots = random_slots(seed, num_tokens, used, no_adapter=1.0 if name == "no_adapter" else 0.25)
    return Step(seed, slots, in_features, out_slices, ranks, max_rank, dtype, device)


def assert_grads_close(actual, expected, tol):
    for name, got, want in zip(("delta", "dx", "da", "db"), actual, expected):
        torch.testing.assert_close(got.double().cpu(), want.double().cpu(), rtol=tol, atol=tol, msg=name)


def assert_zero_where_unused(step, da, db):
    """Gradients of slots without tokens and past each rank are exactly zero."""
    num_slots, num_slices = len(step.ranks), len(step.out_slices)
    written = step.written_rank().to(da.device)
    da = da.view(num_slots, num_slices, step.max_rank, -1)
    assert torch.all(da.masked_fill(written[:, None, :, None], 0) == 0)
    assert torch.all(db.masked_fill(written[:, None, :], 0) == 0)


@pytest.mark.parametrize("name", SHAPES)
def test_reference_matches_dense_autograd(name):
    step = make_step(name, seed=1)
    grads = step.grads("torch")
    assert_grads_close(grads, step.dense_grads(), 1e-10)
    assert_zero_where_unused(step, grads[2], grads[3])


def test_reference_gradcheck():
    step = Step(2, [0, -1, 2, 0, 2, 2], 6, (3, 2), [2, 3, 1], 3)

    def delta(x, a, b):
        return lora_delta_autograd(x, step.weights(a, b), step.batch, backend="torch")

    inputs = tuple(t.clone().requires_grad_() for t in (step.x, step.a, step.b))
    assert torch.autograd.gradcheck(delta, inputs)


def test_reference_mixed_precision():
    # bfloat16 activations with float32 master weights: each gradient in its input's dtype.
    step = make_step("qkv", seed=3)
    # The oracle sees the activations and dy as rounded to bfloat16.
    step.x, step.dy = step.x.bfloat16().double(), step.dy.bfloat16().double()
    dense = step.dense_grads()
    grads = step.grads("torch", x=step.x.bfloat16(), a=step.a.float(), b=step.b.float())
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    assert_grads_close(grads, dense, 3e-2)


def spy(fn, called):
    """fn, recording its name in called on every call."""

    def wrapper(*args):
        called.append(fn.__name__)
        return fn(*args)

    return wrapper


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize(
    "needs, calls",
    [
        ((True, False, False), ["grad_v", "grad_x"]),
        ((False, True, False), ["grad_v", "grad_a"]),
        ((False, False, True), ["grad_b"]),
        ((False, True, True), ["grad_v", "grad_a", "grad_b"]),
    ],
    ids=["x", "a", "b", "a_b"],
)
def test_only_the_needed_gradients_are_computed(backend, needs, calls, monkeypatch):
    dtype = torch.float64 if backend == "torch" else torch.float32
    step = make_step("qkv", dtype, DEVICE if backend == "triton" else "cpu", seed=4)
    full = step.grads(backend)
    module = reference_backward if backend == "torch" else triton_backward
    called = []
    for fn in ("grad_v", "grad_x", "grad_a", "grad_b"):
        monkeypatch.setattr(module, fn, spy(getattr(module, fn), called))
    partial = step.grads(backend, needs)
    assert called == calls
    for need, got, want in zip(needs, partial[1:], full[1:]):
        assert (got is None) == (not need)
        if need:
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_backward_refuses_weights_changed_since_forward():
    step = make_step("qkv")
    w = step.weights(step.a.clone().requires_grad_(), step.b.clone())
    delta = lora_delta_autograd(step.x, w, step.batch)
    with torch.no_grad():
        w.a.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        delta.backward(step.dy)


def test_dispatcher_uses_the_reference_on_cpu():
    step = make_step("qkv", torch.float32, seed=5)
    assert_grads_close(step.grads(None), step.grads("torch"), 0)
    with pytest.raises(ValueError, match="backend"):
        lora_delta_autograd(step.x, step.weights(), step.batch, backend="cutlass")


@needs_triton
@pytest.mark.parametrize("name", SHAPES)
def test_triton_gradients_match_reference(name):
    step = make_step(name, torch.float32, DEVICE, seed=6)
    grads = step.grads("triton")
    assert_grads_close(grads, step.grads("torch"), 1e-4)
    assert_zero_where_unused(step, grads[2], grads[3])


def poisoned(t, keep):
    """t with NaN wherever keep is False."""
    return t.masked_fill(~keep, float("nan"))


@needs_triton
@pytest.mark.parametrize("name", SHAPES)
def test_triton_kernels_write_exactly_their_elements(name):
    # Outputs start as NaN, so an element a kernel should write but does not stays NaN;
    # inputs hold NaN where a kernel must not read (rows without an adapter, past a rank).
    step = make_step(name, torch.float32, DEVICE, seed=7)
    w, batch = step.weights(), step.batch
    num_slices, max_rank = len(step.out_slices), step.max_rank
    lora_token = torch.tensor([s >= 0 for s in step.slots], dtype=torch.bool, device=DEVICE)
    token_rank = torch.tensor([step.ranks[s] if s >= 0 else 0 for s in step.slots], device=DEVICE)
    v_kept = (torch.arange(max_rank, device=DEVICE)[None, :] < token_rank[:, None]).repeat(1, num_slices)
    rank_kept = step.written_rank().to(DEVICE)
    a_kept = rank_kept[:, None, :, None].expand(-1, num_slices, -1, w.in_features).reshape(w.a.shape)
    b_kept = rank_kept[:, None, :].expand(w.b.shape)
    x, dy = poisoned(step.x, lora_token[:, None]), poisoned(step.dy, lora_token[:, None])
    v, dv = reference.lora_shrink(step.x, w, batch), reference_backward.grad_v(step.dy, w, batch)

    def check(into, args, out, expected, kept):
        into(*args, out)
        torch.testing.assert_close(out[kept], expected[kept], rtol=1e-4, atol=1e-4)
        assert out[~kept].isnan().all(), f"{into.__name__} wrote an element it does not own"

    nan = float("nan")
    check(triton_backward.grad_v_into, (dy, w, batch), torch.full_like(dv, nan), dv, v_kept)
    dv_in = poisoned(dv, v_kept)
    check(triton_backward.grad_x_into, (dv_in, w, batch), torch.full_like(step.x, nan),
          reference_backward.grad_x(dv, w, batch, torch.float32), lora_token[:, None].expand_as(step.x))
    check(triton_backward.grad_a_into, (dv_in, x, w, batch), torch.full_like(w.a, nan),
          reference_backward.grad_a(dv, step.x, w, batch), a_kept)
    check(triton_backward.grad_b_into, (dy, poisoned(v, v_kept), w, batch), torch.full_like(w.b, nan),
          reference_backward.grad_b(step.dy, v, w, batch), b_kept)


@needs_triton
def test_triton_long_segment_spans_token_tiles():
    # Over 128 tokens the token tile is 64 rows: the per-slot reductions loop over several.
    slots = [0] * 100 + [1, -1] * 20
    step = Step(8, slots, 48, (40, 24, 24), [16, 5, 7], 16, torch.float32, DEVICE)
    assert_grads_close(step.grads("triton"), step.grads("torch"), 1e-4)


@needs_cuda
@pytest.mark.parametrize("weights_dtype", [torch.float32, torch.bfloat16])
def test_triton_mixed_precision_on_cuda(weights_dtype):
    # bfloat16 activations with float32 master weights or a bfloat16 pool.
    step = make_step("qkv", torch.float32, "cuda", seed=9)
    x, a, b = step.x.bfloat16(), step.a.to(weights_dtype), step.b.to(weights_dtype)
    grads = step.grads("triton", x=x, a=a, b=b)
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.bfloat16, weights_dtype, weights_dtype]
    assert_grads_close(grads, step.grads("torch", x=x, a=a, b=b), 3e-2)
    assert_zero_where_unused(step, grads[2], grads[3])
