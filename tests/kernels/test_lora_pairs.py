"""Weighted (slot, weight) pairs per token, as routed steps use them: the reference against a
naive loop over tokens and pairs, the Triton kernels (interpreted on CPU, float32) against
the reference, for k = 1, 2, 4 with plain-adapter and base tokens in the same step."""

import pytest
import torch

from tandem.kernels.lora import LoRABatch, LoRAPairs, lora_delta, lora_delta_pairs, plain_pairs
from tandem.kernels.lora.mixture import lora_delta_mixture, uniform_rank
from tests.kernels.test_lora_kernels import DEVICE, KERNEL_DTYPES, Case, assert_close, needs_triton, triton_sgmv

# (num_tokens, in_features, out_slices, ranks, max_rank): mixed ranks, NaN past each rank.
PAIR_SHAPES = {
    "qkv_gqa": (13, 72, (88, 24, 24), [1, 5, 16, 32, 17, 8], 32),
    "down": (9, 150, (200,), [8, 1, 2, 4], 8),
    "rank_zero": (11, 40, (24, 8, 8), [0, 6, 0, 3, 5], 8),
}


def random_pairs(seed: int, num_tokens: int, num_slots: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, k] slots and weights: a third of the tokens routed (k distinct slots, softmax
    weights), a third plain (one slot, weight 1), the rest base (no pair)."""
    gen = torch.Generator().manual_seed(seed)
    slots = torch.full((num_tokens, k), -1, dtype=torch.int32)
    weights = torch.zeros(num_tokens, k)
    for t in range(num_tokens):
        kind = t % 3
        if kind == 0:
            slots[t] = torch.randperm(num_slots, generator=gen)[:k].to(torch.int32)
            weights[t] = torch.softmax(torch.randn(k, generator=gen), 0)
        elif kind == 1:
            slots[t, 0] = int(torch.randint(num_slots, (1,), generator=gen))
            weights[t, 0] = 1.0
    return slots, weights


def naive(case: Case, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """float64 y + sum over each token's pairs of weight * B(A x), token by token."""
    y = case.y.double().cpu()
    x, a, b = case.x.double().cpu(), case.a_clean.to(case.w.a.dtype).double(), case.b_clean.to(case.w.b.dtype).double()
    for t in range(slots.shape[0]):
        for slot, weight in zip(slots[t].tolist(), weights[t].tolist()):
            if slot < 0:
                continue
            rank, start = case.ranks[slot], 0
            for s, width in enumerate(case.out_slices):
                a_s = a[slot, s * case.max_rank : s * case.max_rank + rank]
                y[t, start : start + width] += weight * (b[slot, start : start + width, :rank] @ (a_s @ x[t]))
                start += width
    return y


def make(name: str, k: int, dtype=torch.float32, device="cpu", seed=0):
    num_tokens, in_features, out_slices, ranks, max_rank = PAIR_SHAPES[name]
    case = Case(seed, num_tokens, in_features, out_slices, ranks, max_rank, dtype, device, slots=[-1] * num_tokens)
    k = min(k, len(ranks))
    slots, weights = random_pairs(seed, num_tokens, len(ranks), k)
    return case, slots, weights, LoRAPairs.build(slots.to(device), weights.to(device), len(ranks))


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("name", list(PAIR_SHAPES))
def test_reference_matches_a_loop_over_tokens_and_pairs(name, k):
    case, slots, weights, pairs = make(name, k, torch.float64)
    y = case.y.clone()
    lora_delta_pairs(case.x, case.w, pairs, y, backend="torch")
    assert_close(y, naive(case, slots, weights), torch.float64)


@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("name", list(PAIR_SHAPES))
def test_triton_matches_reference(name, k, fused, dtype, monkeypatch):
    case, slots, weights, pairs = make(name, k, dtype, DEVICE)
    # Both Triton paths: the fused kernel, and shrink then expand through v per entry.
    monkeypatch.setattr(triton_sgmv, "FUSED_MAX_TOKENS", 10**6 if fused else 0)
    y = case.y.clone()
    lora_delta_pairs(case.x, case.w, pairs, y, backend="triton")
    y_ref = case.y.cpu().clone()
    cpu_pairs = LoRAPairs.build(slots, weights, case.num_slots)
    lora_delta_pairs(case.x.cpu(), _on_cpu(case.w), cpu_pairs, y_ref, backend="torch")
    assert_close(y, y_ref, dtype)
    base = (slots < 0).all(1).to(y.device)
    assert torch.equal(y[base], case.y[base]), "rows without a pair must stay bit-identical"


def _on_cpu(w):
    from tandem.kernels.lora import LoRAWeights

    return LoRAWeights(w.a.cpu(), w.b.cpu(), w.slot_ranks.cpu(), w.out_slices)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_plain_pairs_equal_the_plain_path(backend):
    """A plain step as pairs (k = 2, the second pair empty) computes what lora_delta does."""
    num_tokens, in_features, out_slices, ranks, max_rank = PAIR_SHAPES["qkv_gqa"]
    case = Case(3, num_tokens, in_features, out_slices, ranks, max_rank, device=DEVICE)
    slots, weights = plain_pairs(case.batch, 2)
    pairs = LoRAPairs.build(slots, weights, case.num_slots)
    y_pairs, y_plain = case.y.clone(), case.y.clone()
    lora_delta_pairs(case.x, case.w, pairs, y_pairs, backend=backend)
    lora_delta(case.x, case.w, case.batch, y_plain, backend="torch")
    assert_close(y_pairs, y_plain, torch.float32)


def test_pairs_group_entries_by_slot():
    slots = torch.tensor([[2, 0], [-1, -1], [0, -1], [2, 1]], dtype=torch.int32)
    weights = torch.tensor([[0.7, 0.3], [0.0, 0.0], [1.0, 0.0], [0.6, 0.4]])
    pairs = LoRAPairs.build(slots, weights, num_slots=4)
    assert pairs.num_tokens == 4 and pairs.num_entries == 8
    assert pairs.seg_slots.tolist() == [0, 1, 2, -1]
    assert pairs.seg_lens.tolist() == [2, 1, 2, 0]
    assert pairs.seg_starts.tolist() == [0, 2, 3, 5]
    assert pairs.sorted_tokens[:5].tolist() == [0, 2, 3, 0, 3]
    assert pairs.weights[:5].tolist() == pytest.approx([0.3, 1.0, 0.4, 0.7, 0.6])


def test_plain_pairs_puts_each_token_slot_first_with_weight_one():
    batch = LoRABatch.build([1, -1, 0], num_slots=2)
    slots, weights = plain_pairs(batch, 3)
    assert slots.tolist() == [[1, -1, -1], [-1, -1, -1], [0, -1, -1]]
    assert weights.tolist() == [[1, 0, 0], [1, 0, 0], [1, 0, 0]]


@pytest.mark.parametrize("slots", [(1, 2, 3), (4, 1, 3)], ids=["consecutive", "scattered"])
def test_dense_mixture_equals_the_pairs_it_mixes(slots):
    """The CPU path of a router's tokens (dense over its experts, all of one rank) adds what
    the same top-2 pairs add."""
    case = Case(5, 9, 40, (24, 8, 8), [3, 6, 6, 6, 6], 8, torch.float64, slots=[-1] * 9)
    gen = torch.Generator().manual_seed(1)
    rows = torch.tensor([0, 2, 3, 7])
    experts = torch.stack([torch.randperm(3, generator=gen)[:2] for _ in rows])
    weights = torch.softmax(torch.randn(len(rows), 2, generator=gen, dtype=torch.float64), 1)
    mix = torch.zeros(len(rows), 3, dtype=torch.float64).scatter_(1, experts, weights)
    pair_slots = torch.full((9, 2), -1, dtype=torch.int32)
    pair_slots[rows] = torch.tensor(slots, dtype=torch.int32)[experts]
    pair_weights = torch.zeros(9, 2, dtype=torch.float64)
    pair_weights[rows] = weights
    assert uniform_rank(case.w, slots) == 6 and uniform_rank(case.w, (0, 1)) is None
    y = case.y.clone()
    y.index_add_(0, rows, lora_delta_mixture(case.x[rows], case.w, slots, 6, mix))
    assert_close(y, naive(case, pair_slots, pair_weights), torch.float64)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["in-place", "through-a-temporary"])
def test_dense_mixture_adds_into_out_and_follows_a_rewritten_slot(out_dtype):
    """Added into rows of y in place (or through a float32 temporary for a bfloat16 y) it adds
    what it returns; after a slot is written, the experts' stacked weights are made again."""
    case = Case(2, 6, 40, (24, 8, 8), [6, 6, 6, 6], 8, slots=[-1] * 6)
    slots, mix = (1, 2, 3), torch.softmax(torch.randn(4, 3, generator=torch.Generator().manual_seed(2)), 1)
    x = case.x[1:5]
    delta = lora_delta_mixture(x, case.w, slots, 6, mix)
    y = case.y.to(out_dtype)
    expected = y[1:5].float() + delta
    assert lora_delta_mixture(x, case.w, slots, 6, mix, out=y[1:5]) is not None
    assert_close(y[1:5].float(), expected.to(out_dtype).float(), out_dtype)
    assert torch.equal(y[[0, 5]], case.y[[0, 5]].to(out_dtype))
    case.w.b[2, :, :6] *= 2  # the pool writes a slot in place
    torch.testing.assert_close(lora_delta_mixture(x, case.w, slots, 6, mix) - delta, lora_delta_mixture(x, case.w, (2,), 6, mix[:, 1:2]) / 2)
