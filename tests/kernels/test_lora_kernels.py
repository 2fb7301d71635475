"""Batched-LoRA kernels: Triton against the torch reference, the reference against an oracle.

Without CUDA the Triton kernels run under the interpreter (TRITON_INTERPRET=1, float32
only, small shapes); with CUDA they run natively in float32, bfloat16 and float16.
"""

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tandem.kernels.lora import LoRABatch, LoRAWeights, lora_delta, lora_expand, lora_shrink, reference

CUDA = torch.cuda.is_available()


def _import_triton_sgmv():
    """The Triton kernels; on CPU they run interpreted (tests/conftest.py sets TRITON_INTERPRET)."""
    try:
        return importlib.import_module("tandem.kernels.lora.triton_sgmv")
    except ImportError:
        return None


triton_sgmv = _import_triton_sgmv()


needs_triton = pytest.mark.skipif(triton_sgmv is None, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")
DEVICE = "cuda" if CUDA else "cpu"
# The interpreter computes bf16 wrongly, so on CPU the kernels are checked in float32 only.
KERNEL_DTYPES = [torch.float32, torch.bfloat16, torch.float16] if CUDA else [torch.float32]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float64: 1e-10}


class Case:
    """A random slot pool and step: ragged segments, tokens without an adapter, mixed ranks.

    The weights past each slot's rank hold NaN, so any read of them poisons the result.
    slots: the token slots; by default num_tokens random ones, a `no_adapter` share of -1.
    """

    def __init__(self, seed, num_tokens, in_features, out_slices, ranks, max_rank,
                 dtype=torch.float32, device="cpu", no_adapter=0.25, slots=None):
        gen = torch.Generator().manual_seed(seed)
        num_slots, num_slices = len(ranks), len(out_slices)
        self.num_slots = num_slots
        a = torch.randn(num_slots, num_slices * max_rank, in_features, generator=gen) / in_features**0.5
        b = torch.randn(num_slots, sum(out_slices), max_rank, generator=gen) / max_rank**0.5
        self.a_clean, self.b_clean = a.clone(), b.clone()
        for slot, rank in enumerate(ranks):
            for s in range(num_slices):
                a[slot, s * max_rank + rank : (s + 1) * max_rank] = float("nan")
            b[slot, :, rank:] = float("nan")
        slot_ranks = torch.tensor(ranks, dtype=torch.int32, device=device)
        self.w = LoRAWeights(a.to(device, dtype), b.to(device, dtype), slot_ranks, out_slices)
        if slots is None:
            random_slots = torch.randint(0, num_slots, (num_tokens,), generator=gen)
            random_slots[torch.rand(num_tokens, generator=gen) < no_adapter] = -1
            slots = random_slots.tolist()
        self.slots, num_tokens = list(slots), len(slots)
        self.batch = LoRABatch.build(self.slots, num_slots, device=device)
        self.x = torch.randn(num_tokens, in_features, generator=gen).to(device, dtype)
        self.y = torch.randn(num_tokens, sum(out_slices), generator=gen).to(device, dtype)
        self.ranks, self.max_rank, self.out_slices = list(ranks), max_rank, tuple(out_slices)

    def oracle_v(self):
        """float64 v [T, S * max_rank], token by token."""
        num_slices, max_rank = len(self.out_slices), self.max_rank
        x, a = self.x.double().cpu(), self.a_clean.to(self.w.a.dtype).double()
        v = torch.zeros(len(self.slots), num_slices * max_rank, dtype=torch.float64)
        for t, slot in enumerate(self.slots):
            if slot < 0:
                continue
            for s in range(num_slices):
                rows = slice(s * max_rank, s * max_rank + self.ranks[slot])
                v[t, rows] = torch.einsum("k,rk->r", x[t], a[slot, rows])
        return v

    def oracle_expand(self, v):
        """float64 y + per-slice v_s @ b_s.T, token by token."""
        y, b = self.y.double().cpu(), self.b_clean.to(self.w.b.dtype).double()
        v = v.double().cpu()
        for t, slot in enumerate(self.slots):
            if slot < 0:
                continue
            rank, start = self.ranks[slot], 0
            for s, width in enumerate(self.out_slices):
                v_s = v[t, s * self.max_rank : s * self.max_rank + rank]
                y[t, start : start + width] += torch.einsum("r,nr->n", v_s, b[slot, start : start + width, :rank])
                start += width
        return y


def lora_rows(case):
    return torch.tensor([s >= 0 for s in case.slots], dtype=torch.bool, device=case.y.device)


def assert_close(actual, expected, dtype):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=tol, atol=tol)


# (num_tokens, in_features, out_slices, ranks, max_rank): none of the dims is a block multiple.
SHAPES = {
    "qkv_gqa": (37, 72, (88, 24, 24), [1, 5, 16, 32, 17], 32),
    "gate_up_rank128": (23, 40, (136, 136), [128, 3, 64, 100], 128),
    "down": (19, 150, (200,), [8, 1, 2], 8),
    "long_segments": (200, 48, (40, 24, 24), [16, 5], 16),
    "one_token": (1, 56, (40, 24, 24), [7, 3], 8),
    "no_tokens": (0, 56, (40, 24, 24), [7, 3], 8),
    # Rank 0: the adapter leaves this linear alone (the slot is NaN throughout).
    "rank_zero": (29, 40, (24, 8, 8), [0, 6, 0, 3], 8),
    # Slots padded far past their adapters' ranks, as the default --max-lora-rank 256 pads them.
    "padded_to_256": (21, 40, (48, 16, 16), [8, 16, 3], 256),
}


def make_case(name, dtype, seed=0, device=DEVICE, **kw):
    num_tokens, in_features, out_slices, ranks, max_rank = SHAPES[name]
    return Case(seed, num_tokens, in_features, out_slices, ranks, max_rank, dtype, device, **kw)


@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("name", SHAPES)
def test_triton_shrink_writes_exactly_the_real_rank(name, dtype):
    case = make_case(name, dtype)
    w, batch = case.w, case.batch
    v = torch.full((batch.num_tokens, w.num_slices * w.max_rank), float("nan"), device=DEVICE)
    triton_sgmv.shrink_into(case.x, w, batch, v)
    expected = reference.lora_shrink(case.x, w, batch)
    written = torch.zeros_like(v, dtype=torch.bool)
    for t, slot in enumerate(case.slots):
        if slot >= 0:
            for s in range(w.num_slices):
                written[t, s * w.max_rank : s * w.max_rank + case.ranks[slot]] = True
    assert_close(v[written], expected[written], dtype)
    assert v[~written].isnan().all(), "the kernel wrote past a rank or into a row without adapter"


@needs_triton
@pytest.mark.parametrize("split_k", [2, 3])
def test_triton_shrink_split_k(split_k):
    case = make_case("qkv_gqa", torch.float32, seed=1)
    w, batch = case.w, case.batch
    v = torch.zeros(batch.num_tokens, w.num_slices * w.max_rank, device=DEVICE)
    triton_sgmv.shrink_into(case.x, w, batch, v, split_k=split_k)
    assert_close(v, case.oracle_v(), torch.float32)


@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("name", SHAPES)
def test_triton_expand_matches_reference(name, dtype):
    case = make_case(name, dtype)
    w, batch = case.w, case.batch
    v = case.oracle_v().float().to(DEVICE)
    # Expand must read neither rows without an adapter nor columns past a rank.
    v[v == 0] = float("nan")
    y_triton, y_ref = case.y.clone(), case.y.clone()
    lora_expand(v, w, batch, y_triton, backend="triton")
    reference.lora_expand(v, w, batch, y_ref)
    assert_close(y_triton, y_ref, dtype)
    rows = lora_rows(case)
    assert torch.equal(y_triton[~rows], case.y[~rows]), "rows without an adapter changed"


@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("name", SHAPES)
def test_triton_delta_matches_reference(name, dtype):
    case = make_case(name, dtype, seed=2)
    y_triton, y_ref = case.y.clone(), case.y.clone()
    lora_delta(case.x, case.w, case.batch, y_triton, backend="triton")
    reference.lora_delta(case.x, case.w, case.batch, y_ref)
    assert_close(y_triton, y_ref, dtype)
    rows = lora_rows(case)
    assert torch.equal(y_triton[~rows], case.y[~rows])
    shrunk = lora_shrink(case.x, case.w, case.batch, backend="triton")
    assert_close(shrunk, reference.lora_shrink(case.x, case.w, case.batch), dtype)


@needs_triton
@pytest.mark.parametrize("num_n_groups", [1, 2, 5])
@pytest.mark.parametrize("name", ["qkv_gqa", "gate_up_rank128", "long_segments", "no_tokens", "padded_to_256"])
def test_triton_fused_delta_matches_reference(name, num_n_groups):
    case = make_case(name, torch.float32, seed=3)
    y_fused, y_ref = case.y.clone(), case.y.clone()
    triton_sgmv.fused_delta(case.x, case.w, case.batch, y_fused, num_n_groups=num_n_groups)
    reference.lora_delta(case.x, case.w, case.batch, y_ref)
    assert_close(y_fused, y_ref, torch.float32)
    rows = lora_rows(case)
    assert torch.equal(y_fused[~rows], case.y[~rows])


@needs_triton
def test_triton_decode_step_fuses_when_the_adapters_ranks_fit_whatever_the_padding(monkeypatch):
    # The fused kernel keeps v on chip up to rank 128: a pool padded to 256 whose adapters
    # are of rank <= 128 must still take it, and one holding a rank-200 adapter must not.
    fused = []
    run_fused = triton_sgmv.fused_delta
    monkeypatch.setattr(triton_sgmv, "fused_delta", lambda *args, **kw: fused.append(1) or run_fused(*args, **kw))
    for ranks, expect_fused in (([8, 16, 3], True), ([8, 200, 3], False)):
        fused.clear()
        case = Case(4, 21, 40, (48, 16, 16), ranks, 256, device=DEVICE)
        y, y_ref = case.y.clone(), case.y.clone()
        lora_delta(case.x, case.w, case.batch, y, backend="triton")
        reference.lora_delta(case.x, case.w, case.batch, y_ref)
        assert_close(y, y_ref, torch.float32)
        assert bool(fused) == expect_fused


@needs_triton
def test_triton_every_token_without_adapter_leaves_y_alone():
    case = make_case("qkv_gqa", torch.float32, no_adapter=1.0)
    y = case.y.clone()
    lora_delta(case.x, case.w, case.batch, y, backend="triton")
    assert torch.equal(y, case.y)
    v = lora_shrink(case.x, case.w, case.batch, backend="triton")
    assert torch.equal(v, torch.zeros_like(v))


@st.composite
def random_cases(draw, dtype):
    num_slices = draw(st.sampled_from([1, 2, 3]))
    max_rank = draw(st.sampled_from([1, 4, 16, 33, 64]))
    # Rank 0 is a slot whose adapter leaves this linear alone.
    ranks = draw(st.lists(st.integers(0, max_rank), min_size=1, max_size=5))
    out_slices = draw(st.lists(st.integers(1, 70), min_size=num_slices, max_size=num_slices))
    return Case(
        seed=draw(st.integers(0, 2**16)),
        num_tokens=draw(st.integers(0, 40)),
        in_features=draw(st.integers(1, 90)),
        out_slices=out_slices,
        ranks=ranks,
        max_rank=max_rank,
        dtype=dtype,
        no_adapter=draw(st.sampled_from([0.0, 0.3, 1.0])),
    )


@settings(max_examples=40, deadline=None)
@given(random_cases(torch.float64))
def test_reference_matches_token_oracle_float64(case):
    expected_v = case.oracle_v()
    v = reference.lora_shrink(case.x, case.w, case.batch)
    assert v.dtype == torch.float64
    assert_close(v, expected_v, torch.float64)
    y = case.y.clone()
    reference.lora_delta(case.x, case.w, case.batch, y)
    assert_close(y, case.oracle_expand(expected_v), torch.float64)
    y = case.y.clone()
    reference.lora_expand(v, case.w, case.batch, y)
    assert_close(y, case.oracle_expand(expected_v), torch.float64)


@settings(max_examples=25, deadline=None)
@given(random_cases(torch.bfloat16))
def test_reference_matches_token_oracle_bfloat16(case):
    y = case.y.clone()
    reference.lora_delta(case.x, case.w, case.batch, y)
    assert y.dtype == torch.bfloat16
    assert_close(y, case.oracle_expand(case.oracle_v()), torch.bfloat16)
    rows = lora_rows(case)
    assert torch.equal(y[~rows], case.y[~rows])
    v = reference.lora_shrink(case.x, case.w, case.batch)
    assert v.dtype == torch.float32
    # Segments of _HALF_POOL_MIN_ROWS rows or more are multiplied in bf16 (by design, 3x
    # faster): v holds bf16 precision then; smaller ones accumulate in float32.
    if any(reference._matmul_dtype(torch.bfloat16, case.w, s.length, s.length) == torch.bfloat16 for s in case.batch.segments):
        assert_close(v.double(), case.oracle_v(), torch.bfloat16)
    else:
        torch.testing.assert_close(v.double(), case.oracle_v(), rtol=1e-3, atol=1e-4)


def test_float32_pool_multiplies_prefill_chunks_in_the_activations_dtype():
    # The CPU serving pool is float32 and the activations bf16: a 200-token chunk is
    # multiplied in bf16 (its weights converted), decode-sized work in float32.
    case = Case(12, 0, 40, (24, 8, 8), [6, 5], 8, torch.float32, slots=[0] * 200 + [1, 1, -1])
    case.x, case.y = case.x.bfloat16().float(), case.y.bfloat16().float()
    x, y = case.x.bfloat16(), case.y.bfloat16()
    assert reference._matmul_dtype(x.dtype, case.w, 200, 200) == torch.bfloat16
    assert reference._matmul_dtype(x.dtype, case.w, 128, 16) == torch.float32
    assert reference._matmul_dtype(x.dtype, case.w, 2, 2) == torch.float32
    reference.lora_delta(x, case.w, case.batch, y)
    assert_close(y, case.oracle_expand(case.oracle_v()), torch.bfloat16)
    assert torch.equal(y[-1], case.y[-1].bfloat16())


@pytest.mark.parametrize("tokens", [4, 300])
def test_reference_few_and_many_tokens(tokens):
    # Few tokens run in one grid; 300 over two adapters of different ranks, each on its own.
    case = Case(3, tokens, 64, (96, 32, 32), [16, 9], 16, torch.float32, no_adapter=0.1)
    y = case.y.clone()
    reference.lora_delta(case.x, case.w, case.batch, y)
    assert_close(y, case.oracle_expand(case.oracle_v()), torch.float32)


def test_reference_decode_grid_path():
    # Many short segments of one rank: one bmm pair over the padded grid of slots 0..4,
    # where slot 1 holds NaN and no token uses it.
    slots = [0, 2, 3, 4, 0, 2, 3, 4, -1, 0]
    case = Case(4, 0, 48, (40, 16, 16), [8, 8, 8, 8, 8], 16, torch.float32, slots=slots)
    case.w.a[1].fill_(float("nan"))
    case.w.b[1].fill_(float("nan"))
    (grid,) = case.batch.cpu_plan.grids
    assert grid.num_slots == 5 and not case.batch.cpu_plan.loose
    y = case.y.clone()
    reference.lora_delta(case.x, case.w, case.batch, y)
    assert_close(y, case.oracle_expand(case.oracle_v()), torch.float32)
    assert torch.equal(y[8], case.y[8])


@pytest.mark.parametrize(
    "dtype, num_tokens, grid_dtype",
    [
        (torch.bfloat16, 24, torch.float32),
        (torch.bfloat16, 90, torch.bfloat16),
        (torch.float32, 90, torch.float32),
        (torch.float32, 300, torch.float32),
    ],
)
def test_reference_grid_dtype(dtype, num_tokens, grid_dtype):
    # Small grids and float32 activations run in float32; larger grids in a half pool's dtype.
    slots = [t % 3 for t in range(num_tokens)]
    case = Case(7, 0, 40, (24, 8, 8), [6, 6, 6], 8, dtype, slots=slots)
    (grid,) = case.batch.cpu_plan.grids
    rows = grid.num_slots * grid.length
    assert rows == num_tokens
    assert reference._matmul_dtype(case.x.dtype, case.w, rows, grid.length) == grid_dtype
    y = case.y.clone()
    reference.lora_delta(case.x, case.w, case.batch, y)
    assert_close(y, case.oracle_expand(case.oracle_v()), dtype)


@pytest.mark.parametrize(
    "slots", [[1, 1, 1], [0], [1, 0, 1, 0, 1, 0]], ids=["one_adapter", "one_token", "mixed_ranks"]
)
def test_reference_segment_paths(slots):
    case = Case(5, 0, 33, (20, 12), [3, 7], 8, torch.bfloat16, slots=slots)
    plan = case.batch.cpu_plan
    if len(set(slots)) == 1:
        # One adapter: no grid, and its tokens are read and updated in place, no gather.
        assert not plan.grids and [item.first_token for item in plan.loose] == [0]
    y = case.y.clone()
    reference.lora_delta(case.x, case.w, case.batch, y)
    assert_close(y, case.oracle_expand(case.oracle_v()), torch.bfloat16)


@pytest.mark.parametrize(
    "ranks, slots",
    [
        ([5, 16, 9, 1], [0, 1, 3, 0, -1, 3]),
        ([9, 9, 9, 9], [0, 1, 3, 0, -1, 3]),
        ([9, 9, 9, 9], [3, 3]),
        ([0, 9, 9, 9], [0, 1, 3, 0, -1, 3, 1]),
        ([0, 9, 9, 0], [3, 3, 0]),
    ],
    ids=["segments", "grid", "in_order", "rank_zero_in_grid", "rank_zero_loose"],
)
def test_reference_ignores_weights_past_the_rank(ranks, slots):
    # Case stores NaN past every rank; slot 2, which no token uses, is NaN throughout.
    case = Case(6, 0, 40, (24, 8, 8), ranks, 16, torch.float32, slots=slots)
    case.w.a[2].fill_(float("nan"))
    case.w.b[2].fill_(float("nan"))
    expected_v = case.oracle_v()
    expected_y = case.oracle_expand(expected_v)
    assert_close(reference.lora_shrink(case.x, case.w, case.batch), expected_v, torch.float32)
    v = expected_v.float()
    v[v == 0] = float("nan")
    y = case.y.clone()
    reference.lora_expand(v, case.w, case.batch, y)
    assert_close(y, expected_y, torch.float32)
    y = case.y.clone()
    reference.lora_delta(case.x, case.w, case.batch, y)
    assert_close(y, expected_y, torch.float32)


def test_dispatcher_uses_the_reference_on_cpu():
    case = make_case("qkv_gqa", torch.float32, device="cpu")
    y, y_ref = case.y.clone(), case.y.clone()
    lora_delta(case.x, case.w, case.batch, y)
    reference.lora_delta(case.x, case.w, case.batch, y_ref)
    assert torch.equal(y, y_ref)
    with pytest.raises(ValueError, match="backend"):
        lora_delta(case.x, case.w, case.batch, y, backend="cutlass")


def test_batch_groups_tokens_by_slot():
    batch = LoRABatch.build([2, -1, 0, 2, 2, -1, 0], num_slots=4)
    assert batch.sorted_tokens.tolist() == [2, 6, 0, 3, 4, 1, 5]
    assert batch.seg_slots.tolist() == [0, 2, -1, -1]
    assert batch.seg_starts.tolist()[:2] == [0, 2]
    assert batch.seg_lens.tolist() == [2, 3, 0, 0]
    assert batch.num_lora_tokens == 5
    assert [(s.slot, s.start, s.length) for s in batch.segments] == [(0, 0, 2), (2, 2, 3)]
    assert batch.token_slots.dtype == torch.int32
    (grid,) = batch.cpu_plan.grids
    assert (grid.first_slot, grid.num_slots, grid.length) == (0, 3, 3)
    assert grid.tokens.tolist() == [2, 6, 0, 0, 0, 0, 0, 3, 4]
    assert grid.rows.tolist() == [0, 1, 6, 7, 8]
    assert grid.row_tokens.tolist() == [2, 6, 0, 3, 4]
    assert not batch.cpu_plan.loose
    one = LoRABatch.build([-1, 1, 1], num_slots=2).cpu_plan
    assert not one.grids and [(item.segment.slot, item.first_token) for item in one.loose] == [(1, 1)]
    scattered = LoRABatch.build([1, -1, 1], num_slots=2).cpu_plan
    assert [(item.tokens.tolist(), item.first_token) for item in scattered.loose] == [([0, 2], None)]


def test_cpu_plan_runs_long_segments_loose():
    # A 100-token prefill chunk on slot 1 next to one decode token on each of 6 slots: the
    # decode tokens share a grid of length 1 (slot 1's row is padding); the chunk runs alone.
    slots = [3, 0] + [1] * 100 + [2, 4, 5, 6, -1]
    case = Case(8, 0, 40, (24, 8, 8), [6] * 7, 8, torch.float32, slots=slots)
    plan = case.batch.cpu_plan
    (grid,) = plan.grids
    assert (grid.first_slot, grid.num_slots, grid.length) == (0, 7, 1)
    assert sorted(grid.row_tokens.tolist()) == [0, 1, 102, 103, 104, 105]
    assert [(item.segment.slot, item.first_token) for item in plan.loose] == [(1, 2)]
    y = case.y.clone()
    reference.lora_delta(case.x, case.w, case.batch, y)
    assert_close(y, case.oracle_expand(case.oracle_v()), torch.float32)
    assert torch.equal(y[106], case.y[106])


def test_cpu_plan_splits_grids_at_wide_gaps():
    # Slots 0-2 and 60-62 in use: two grids, not one streaming the 57 unused slots between.
    slots = [0, 1, 2, 60, 61, 62, 0, 61]
    case = Case(10, 0, 40, (24, 8, 8), [6] * 63, 8, torch.float32, slots=slots)
    plan = case.batch.cpu_plan
    assert [(g.first_slot, g.num_slots, g.length) for g in plan.grids] == [(0, 3, 2), (60, 3, 2)]
    assert not plan.loose
    y = case.y.clone()
    reference.lora_delta(case.x, case.w, case.batch, y)
    assert_close(y, case.oracle_expand(case.oracle_v()), torch.float32)


def test_reference_grid_with_mixed_ranks_runs_a_grid_per_rank():
    # One grid over slots 0-3 with ranks 3, 7, 3, 5 in this weight group: slots 0 and 2 run
    # as one rank-3 grid over slots 0-2 (slot 1's rows are computed at rank 3 and thrown
    # away); slots 1 and 3, alone in their ranks, run loose. Storage past every rank is NaN.
    slots = [0, 1, 0, 1, 2, 3, 2]
    case = Case(9, 0, 40, (24, 8, 8), [3, 7, 3, 5], 8, torch.float32, slots=slots)
    plan = case.batch.cpu_plan
    (grid,) = plan.grids
    by_rank, alone = plan.by_rank(grid, (3, 7, 3, 5))
    assert [(rank, g.first_slot, g.num_slots) for rank, g in by_rank] == [(3, 0, 3)]
    assert [item.segment.slot for item in alone] == [1, 3]
    y = case.y.clone()
    reference.lora_delta(case.x, case.w, case.batch, y)
    assert_close(y, case.oracle_expand(case.oracle_v()), torch.float32)


def test_batch_rejects_unknown_slots():
    with pytest.raises(ValueError, match="token slots"):
        LoRABatch.build([0, 4], num_slots=4)
    with pytest.raises(ValueError, match="token slots"):
        LoRABatch.build(torch.tensor([-2]), num_slots=4)


def test_weights_validate_shapes_and_ranks():
    a, b = torch.zeros(2, 3 * 8, 16), torch.zeros(2, 40, 8)
    ranks = torch.tensor([8, 2], dtype=torch.int32)
    w = LoRAWeights(a, b, ranks, (24, 8, 8))
    assert (w.num_slices, w.max_rank, w.in_features, w.out_features) == (3, 8, 16, 40)
    assert w.slice_starts.tolist() == [0, 24, 32]
    assert w.top_rank == 8  # what a launch's rank tile (and a decode graph's key) must cover
    w.set_rank(1, 5)
    assert w.host_ranks == [8, 5] and w.slot_ranks.tolist() == [8, 5]
    w.set_rank(0, 3)  # the highest slot reloaded lower: the top follows it down
    assert w.top_rank == 5
    w.set_rank(0, 8)
    w.set_rank(1, 0)  # the slot's adapter leaves this linear alone
    assert w.host_ranks == [8, 0] and w.slot_ranks.tolist() == [8, 0] and w.top_rank == 8
    with pytest.raises(ValueError, match="rank must"):
        w.set_rank(0, 9)
    with pytest.raises(ValueError, match="out_slices"):
        LoRAWeights(a, b, ranks, (24, 8, 9))
    with pytest.raises(ValueError, match="a must be"):
        LoRAWeights(a, b, ranks, (32, 8))
    for bad in ([-1, 2], [9, 2]):
        with pytest.raises(ValueError, match="ranks"):
            LoRAWeights(a, b, torch.tensor(bad, dtype=torch.int32), (24, 8, 8))
    with pytest.raises(ValueError, match="slot_ranks must be int32"):  # the C kernel read int64 [8, 2] as [8, 0]
        LoRAWeights(a, b, ranks.long(), (24, 8, 8))


@needs_cuda
def test_batch_built_on_cuda_matches_host():
    host = LoRABatch.build([1, -1, 0, 1], num_slots=3)
    dev = LoRABatch.build(torch.tensor([1, -1, 0, 1], device="cuda"), num_slots=3)
    assert dev.sorted_tokens.is_cuda and dev.segments == host.segments
    assert torch.equal(dev.seg_lens.cpu(), host.seg_lens)
