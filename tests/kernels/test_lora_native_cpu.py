"""The C batched-LoRA kernel (kernels/lora/native_cpu.py) against the float64 token oracle,
with the weights past each slot's rank poisoned with NaN, in the layout the CPU slot pool keeps."""

import ctypes

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tandem.kernels import native_build
from tandem.kernels.lora import LoRABatch, LoRAWeights, lora_delta, native_cpu, reference
from tandem.server.adapters.slot_pool import b_pool, b_row
from tests.kernels.test_lora_kernels import SHAPES, Case, assert_close, lora_rows, make_case

needs_native = pytest.mark.skipif(native_cpu.library() is None, reason="no C compiler to build the native kernel")
DTYPES = [torch.float32, torch.bfloat16]


def pool_layout(case: Case, dtype: torch.dtype = torch.float32, weight_dtype: torch.dtype = torch.float32) -> Case:
    """The case as the CPU slot pool serves it: weights in weight_dtype with b stored
    [slots, max_rank, b_row(N)] in memory (slot_pool.b_pool; the padding past N poisoned with
    NaN too), activations (x, y) in dtype."""
    w = case.w
    slots, n, rank = w.b.shape
    b = b_pool(slots, n, rank, weight_dtype, torch.device("cpu"))
    row = b_row(n, weight_dtype)
    torch.as_strided(b, (slots, rank, row), (rank * row, row, 1)).fill_(float("nan"))
    b.copy_(w.b)
    case.w = LoRAWeights(w.a.to(weight_dtype), b, w.slot_ranks, w.out_slices)
    case.x, case.y = case.x.to(dtype), case.y.to(dtype)
    return case


def check_native(case: Case, dtype: torch.dtype) -> None:
    y = case.y.clone()
    assert native_cpu.lora_delta(case.x, case.w, case.batch, y)
    assert y.dtype == dtype
    assert_close(y, case.oracle_expand(case.oracle_v()), dtype)
    rows = lora_rows(case)
    assert torch.equal(y[~rows], case.y[~rows]), "rows without an adapter must stay bit-identical"


@needs_native
@pytest.mark.parametrize("weight_dtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", SHAPES)
def test_native_matches_token_oracle(name, dtype, weight_dtype):
    check_native(pool_layout(make_case(name, torch.float32, device="cpu"), dtype, weight_dtype), dtype)


@needs_native
@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16), num_tokens=st.integers(1, 70), in_features=st.sampled_from([8, 16, 33, 576]),
    out_slices=st.sampled_from([(8,), (40, 16, 16), (72, 72), (33, 7)]), max_rank=st.sampled_from([1, 4, 16]),
    num_slots=st.integers(1, 6), dtype=st.sampled_from(DTYPES), weight_dtype=st.sampled_from(DTYPES),
    no_adapter=st.sampled_from([0.0, 0.3, 1.0]), data=st.data(),
)
def test_native_matches_token_oracle_random(
    seed, num_tokens, in_features, out_slices, max_rank, num_slots, dtype, weight_dtype, no_adapter, data
):
    ranks = data.draw(st.lists(st.integers(0, max_rank), min_size=num_slots, max_size=num_slots))
    case = Case(seed, num_tokens, in_features, out_slices, ranks, max_rank, torch.float32, "cpu", no_adapter=no_adapter)
    check_native(pool_layout(case, dtype, weight_dtype), dtype)


@needs_native
@pytest.mark.parametrize("weight_dtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_rows", [0, 3, 40])
def test_long_segments_go_to_torch_and_still_match(monkeypatch, max_rows, dtype, weight_dtype):
    """Segments past MAX_SEGMENT_ROWS (prefill chunks) run through the torch reference, the
    rest through the kernel, in one call: the sum is still the oracle's."""
    monkeypatch.setattr(native_cpu, "MAX_SEGMENT_ROWS", max_rows)
    case = Case(3, 120, 48, (40, 24, 24), [16, 5, 0, 9], 16, torch.float32, "cpu",
                slots=[0] * 50 + [1] * 30 + [-1] * 10 + [2] * 5 + [3] * 20 + [1] * 5)
    check_native(pool_layout(case, dtype, weight_dtype), dtype)


@needs_native
@pytest.mark.parametrize("weight_dtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_b_rows_padded_past_a_multiple_of_8_lines_match_the_oracle(dtype, weight_dtype):
    """Rows of B whose lines are a multiple of 8 (4 KiB apart for SmolLM2's gate_up) are
    padded by a line in the slot pool, and the kernel reads them at that stride."""
    out_slices = (128, 128)
    assert b_row(sum(out_slices), weight_dtype) > sum(out_slices)
    assert b_row(576, torch.float32) == 576 and b_row(3072, torch.float32) == 3088 and b_row(3072, torch.bfloat16) == 3104
    case = Case(5, 70, 48, out_slices, [16, 3, 0, 9], 16, torch.float32, "cpu", slots=[0, 1, 3, -1] * 10 + [0] * 20 + [3] * 10)
    check_native(pool_layout(case, dtype, weight_dtype), dtype)


# Long segments (prefill chunks): on a CPU with AMX the kernel runs them on its tiles, in items
# of up to 64 tokens, its weights repacked per item. Ranks past 32 take two passes of the tile
# depth; a rank of 8 puts two slices in one group of 16 columns of v; widths that are no
# multiple of 16 make a block run past its slice, and (49, 1) one start at N - 1.
AMX_SHAPES = [(576, (576, 192, 192)), (33, (49, 1)), (1536, (40, 24, 24))]


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_rank, ranks", [(16, [16, 5, 0, 9]), (8, [8, 3, 1, 7]), (48, [48, 33, 0, 2]), (1, [1, 1, 0, 1])])
@pytest.mark.parametrize("in_features, out_slices", AMX_SHAPES)
def test_long_segments_match_in_bfloat16(dtype, max_rank, ranks, in_features, out_slices):
    """bfloat16 weights and x, y in either dtype: segments of 16 to 150 tokens, their rows
    interleaved with short segments' and rows without an adapter, match the oracle."""
    slots = [0, 1] * 40 + [-1] * 7 + [3] * 16 + [2] * 9 + [0] * 70 + [1, 3, -1] * 5
    case = Case(7, len(slots), in_features, out_slices, ranks, max_rank, torch.float32, "cpu", slots=slots)
    check_native(pool_layout(case, dtype, torch.bfloat16), dtype)


@needs_native
def test_long_segments_take_the_amx_tiles_where_the_cpu_has_them():
    """Where torch sees AMX, the kernel is built with its path and takes every long segment (a
    fallback to the vector path or to torch would still be correct, only slower)."""
    if not torch.cpu._is_amx_tile_supported():
        pytest.skip("this CPU has no AMX tiles")
    assert native_cpu.library().tandem_lora_amx() == 1
    bf16 = pool_layout(make_case(SHAPES[0], torch.float32, device="cpu"), torch.bfloat16, torch.bfloat16)
    assert native_cpu._segment_rows(bf16.x, bf16.w) >= 1 << 20


@needs_native
@pytest.mark.parametrize("amx", [True, False])
@pytest.mark.parametrize("weight_dtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_long_segments_stay_in_the_kernel_only_where_it_runs_them_on_amx(monkeypatch, amx, dtype, weight_dtype):
    """The kernel runs long segments on AMX tiles only for bfloat16 x and weights, and only
    where it was built with them and may use them; elsewhere its small blocks lose to torch
    past MAX_SEGMENT_ROWS. Keyed on the CPU alone, a float32 server on an AMX host kept every
    2k-token prompt in the small blocks."""
    monkeypatch.setattr(native_cpu, "_amx", lambda: amx)
    monkeypatch.setattr(native_cpu, "MAX_SEGMENT_ROWS", 40)
    sent = []
    monkeypatch.setattr(reference, "add_segment", lambda x, w, batch, segment, y: sent.append(segment.length))
    case = pool_layout(Case(3, 120, 48, (40, 24, 24), [16, 5, 0, 9], 16, torch.float32, "cpu",
                            slots=[0] * 50 + [1] * 30 + [-1] * 10 + [2] * 5 + [3] * 20 + [1] * 5), dtype, weight_dtype)
    assert native_cpu.lora_delta(case.x, case.w, case.batch, case.y.clone())
    takes_all = amx and dtype == weight_dtype == torch.bfloat16
    assert sent == ([] if takes_all else [50])


@needs_native
@pytest.mark.parametrize("serves", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dispatcher_takes_the_native_kernel_for_the_pool_layout_where_it_serves(dtype, serves, monkeypatch):
    """lora_delta on CPU runs the C kernel for the pool's layout where it serves (same result
    as calling it), the torch path where it does not (bfloat16 on CPUs without AVX-512:
    native_cpu.serves), and backend="torch" always forces the reference."""
    monkeypatch.setattr(native_cpu, "serves", lambda x, w, y: serves)
    case = pool_layout(make_case("qkv_gqa", torch.float32, device="cpu"), dtype)
    y_native, y_dispatch, y_ref = case.y.clone(), case.y.clone(), case.y.clone()
    native_cpu.lora_delta(case.x, case.w, case.batch, y_native)
    lora_delta(case.x, case.w, case.batch, y_dispatch)
    lora_delta(case.x, case.w, case.batch, y_ref, backend="torch")
    expected = case.y.clone()
    reference.lora_delta(case.x, case.w, case.batch, expected)
    assert torch.equal(y_ref, expected)
    assert torch.equal(y_dispatch, y_native if serves else expected)
    if dtype == torch.float32:
        assert not torch.equal(y_native, expected)  # the two paths differ in rounding, so the check above tells them apart


@pytest.mark.parametrize(
    "change",
    [
        "plain_b_layout", "float64_x", "strided_x", "x_requires_grad", "float16_pool", "mixed_pool_dtypes",
        "x_narrower_than_the_pool", "y_wider_than_the_pool", "fewer_rows_than_the_batch", "a_slot_past_the_pool",
    ],
)
def test_native_declines_what_it_cannot_take_and_leaves_y_alone(change):
    """The kernel reads x's rows at the pool's width and the batch's token indices: a call
    that does not match them would read and write past the tensors, so it is declined."""
    case = pool_layout(make_case("down", torch.float32, device="cpu"))
    x, w, y, batch = case.x, case.w, case.y.clone(), case.batch
    if change == "a_slot_past_the_pool":  # built for a larger pool than the one it is applied to
        slots = w.a.shape[0]
        batch = LoRABatch.build([slots] * x.shape[0], slots + 1)
    elif change == "x_narrower_than_the_pool":
        x = x[:, :-1].contiguous()
    elif change == "y_wider_than_the_pool":
        y = torch.cat([y, y[:, :1]], 1)
    elif change == "fewer_rows_than_the_batch":
        x, y = x[:-1].contiguous(), y[:-1].contiguous()
    elif change == "plain_b_layout":
        w = make_case("down", torch.float32, device="cpu").w
    elif change == "float64_x":
        x = x.double()
    elif change == "strided_x":
        x = torch.cat([x, x], 1)[:, ::2]
    elif change == "x_requires_grad":
        x = x.clone().requires_grad_()
    elif change == "float16_pool":
        w = LoRAWeights(w.a.half(), w.b.half(), w.slot_ranks, w.out_slices)
    else:  # LoRAWeights refuses mixed dtypes; a pool mutated into them must not reach the kernel
        w.b = w.b.bfloat16()
    before = y.clone()
    assert not native_cpu.lora_delta(x, w, batch, y)
    assert torch.equal(y, before)


def test_without_a_compiler_the_torch_path_serves(monkeypatch, tmp_path):
    """A machine where the build fails (here: a compiler that always fails) serves through
    the reference: library() is None and lora_delta still adds the right deltas."""
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    native_cpu.library.cache_clear()
    try:
        assert native_cpu.library() is None
        case = pool_layout(make_case("qkv_gqa", torch.float32, device="cpu"))
        y = case.y.clone()
        lora_delta(case.x, case.w, case.batch, y)
        assert_close(y, case.oracle_expand(case.oracle_v()), torch.float32)
        assert not list(tmp_path.rglob("*.tmp")), "a failed build leaves no temporary file"
    finally:
        native_cpu.library.cache_clear()


@needs_native
def test_build_lands_whole_in_the_cache(monkeypatch, tmp_path):
    """A fresh cache gets one complete library (built in a temp file, renamed) that loads."""
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    native_cpu.library.cache_clear()
    try:
        assert native_cpu.library() is not None
        built = list((tmp_path / "kernels").iterdir())
        assert len(built) == 1 and built[0].suffix == ".so"
    finally:
        native_cpu.library.cache_clear()


@pytest.mark.parametrize("avx512", [True, False])
def test_slot_dtype_follows_the_kernel(monkeypatch, avx512):
    """CPU slots are bfloat16 for bfloat16 serving only where the C kernel reads them (an
    AVX2 CPU's kernel takes float32 calls only: bf16 slots were converted at every call);
    float32 otherwise (the torch path's small matmuls are faster there); CUDA slots take the
    serving dtype."""
    from tandem.server.adapters.slot_pool import slot_dtype

    monkeypatch.setattr(native_cpu, "_AVX512", avx512)
    cpu = torch.device("cpu")
    expected = torch.bfloat16 if avx512 and native_cpu.library() is not None else torch.float32
    assert slot_dtype(cpu, torch.bfloat16) == expected
    assert slot_dtype(cpu, torch.float32) == torch.float32
    assert slot_dtype(torch.device("cuda"), torch.float16) == torch.float16


@needs_native
def test_a_pool_whose_tensors_change_is_checked_again():
    """The kernel keeps a pool's arguments between calls; a pool given another b (here in the
    plain layout the kernel cannot read) must be declined, not read through stale pointers."""
    case = pool_layout(make_case("down", torch.float32, device="cpu"))
    y = case.y.clone()
    assert native_cpu.lora_delta(case.x, case.w, case.batch, y)
    case.w.b = case.w.b.contiguous()
    y = case.y.clone()
    assert not native_cpu.lora_delta(case.x, case.w, case.batch, y)
    assert torch.equal(y, case.y)


@needs_native
@pytest.mark.parametrize("floor", [1, 2], ids=["calls-do-nothing", "calls-only-read"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_floor_builds_change_nothing(monkeypatch, floor, dtype):
    """bench/lora_floor.py's builds of the kernel (native_cpu.library(floor)) are separate
    libraries whose calls succeed and leave y as it was, short segments and long alike: one
    does nothing, the other only reads the weights."""
    assert native_cpu.library(floor) is not native_cpu.library()
    slots = [0, 1] * 10 + [-1] * 3 + [2] * 40
    case = pool_layout(Case(3, len(slots), 576, (576, 192, 192), [16, 5, 9], 16, torch.float32, "cpu", slots=slots), dtype, dtype)
    monkeypatch.setattr(native_cpu, "library", lambda floor=floor, lib=native_cpu.library(floor): lib)
    y = case.y.clone()
    assert native_cpu.lora_delta(case.x, case.w, case.batch, y)
    assert torch.equal(y, case.y)


# malloc for a kernel built with -Dmalloc=tandem_test_malloc: allocations of at least
# tandem_test_big bytes succeed tandem_test_allowed times, then fail.
FAILING_MALLOC = r"""
#include <omp.h>
#include <stdlib.h>
size_t tandem_test_big = (size_t)-1;
int tandem_test_allowed;
void *tandem_test_malloc(size_t n) {
    if (n >= tandem_test_big && __atomic_fetch_sub(&tandem_test_allowed, 1, __ATOMIC_SEQ_CST) <= 0) return NULL;
    return malloc(n);
}
int tandem_test_threads(void) { return omp_get_max_threads(); }
"""


@needs_native
def test_a_call_without_memory_for_its_scratch_leaves_y_untouched(monkeypatch, tmp_path):
    """Each thread took its scratch at its first item: where one could not, it left its
    items out while the others had added theirs, and the MemoryError left y half updated."""
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    source = tmp_path / "failing_malloc.c"
    source.write_text(FAILING_MALLOC)
    shim = native_build.build(source, "TANDEM_NATIVE_TEST")
    assert shim is not None
    shim = ctypes.CDLL(shim._name, mode=ctypes.RTLD_GLOBAL)  # where the kernel's malloc resolves
    if shim.tandem_test_threads() < 2:
        pytest.skip("one OpenMP thread: a call's items share one scratch")
    build = native_build.build
    monkeypatch.setattr(native_build, "build", lambda source, switch, defines=(): build(source, switch, (*defines, "malloc=tandem_test_malloc")))
    lib = native_cpu.library.__wrapped__()
    monkeypatch.setattr(native_cpu, "library", lambda floor=0: lib)
    # float32: blocks of a few tokens, so each thread has items of both adapters.
    case = pool_layout(Case(5, 16, 576, (576,), [8, 8], 8, torch.float32, "cpu", slots=[0] * 8 + [1] * 8))
    ctypes.c_size_t.in_dll(shim, "tandem_test_big").value = 4 * 576  # the scratch, not the item list
    ctypes.c_int.in_dll(shim, "tandem_test_allowed").value = 1
    y = case.y.clone()
    with pytest.raises(MemoryError):
        native_cpu.lora_delta(case.x, case.w, case.batch, y)
    assert torch.equal(y, case.y)
    ctypes.c_int.in_dll(shim, "tandem_test_allowed").value = 1 << 30
    check_native(case, torch.float32)
