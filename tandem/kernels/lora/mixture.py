"""One router's tokens against all of its experts at once: the CPU path of routed tokens.

Dense over the experts: one shrink over their stacked A, each token's mixture weights
(zero outside its top-k) on v, and per output slice one matmul whose contraction runs over
every expert's rank at once, accumulated into the output in place. On CPU a step's tokens
spread over every expert anyway, so each expert's weights are read either way; at SmolLM2
decode shapes (32 tokens, k = 2 of 8, rank 16) these few large matmuls cost less than
grouping the pairs by expert (a padded [E, L] grid of bmm: about as many FLOPs, less
efficient) and a third less than a bmm per slice over the experts summed afterwards, whose
[E, tokens, N] intermediate is larger than the weights.

The expand needs the experts' B as one [E * rank, N] matrix, which the slot pool's layout
([slot, N, max_rank]) cannot view, so it is stacked once per version of the pool's weights
and kept (an extra copy of the routed experts' B) while the pool lives.
"""

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from .batch import LoRAWeights
from .reference import _compute_dtype

# LoRAWeights -> {(slots, rank, dtype): ((a's version, b's version), a [E * S * rank, in],
# b [E * rank, N])}; an entry goes stale when a slot of w is written, which must bump the
# versions: torch's copies do, a write behind torch's back must call
# torch.autograd.graph.increment_version (native_cpu.load_slot's C copy does; so does the
# trainer after fused AdamW's step, which writes in place without bumping), or the stale
# stack goes on serving the old weights.
_stacked = WeakIdKeyDictionary()


def lora_delta_mixture(
    xs: Tensor, w: LoRAWeights, slots: tuple[int, ...], rank: int, mix: Tensor, out: Tensor | None = None
) -> Tensor | None:
    """sum_e mix[:, e] * LoRA_slots[e](xs), added into out in place ([n, N], e.g. the output's
    rows of these tokens) or, without out, returned as a new tensor; None when rank is 0.

    xs: [n, in], the router's tokens; every slot in slots has `rank` at w (the caller checks:
    see uniform_rank); mix: [n, E] float32. Differentiable in xs and mix (how gates train);
    the experts' weights are constants here (served slots, frozen experts). Products
    accumulate in the compute dtype: in place when out has it, else through a temporary.
    """
    if rank == 0:
        return None
    cdt = _compute_dtype(xs.dtype)
    a, b = stacked_weights(w, slots, rank, cdt)
    n, num_experts, num_slices = xs.shape[0], len(slots), w.num_slices
    v = torch.mm(xs.to(cdt), a.t()).view(n, num_experts, num_slices, rank) * mix.to(cdt)[:, :, None, None]
    # [n, S, E * rank]: a slice's columns (expert, j) match b's rows (a copy only when S > 1).
    v = v.transpose(1, 2).reshape(n, num_slices, num_experts * rank)
    acc = out if out is not None and out.dtype == cdt else xs.new_zeros((n, w.out_features), dtype=cdt)
    start = 0
    for s, width in enumerate(w.out_slices):
        acc[:, start : start + width].addmm_(v[:, s], b[:, start : start + width])
        start += width
    if out is None:
        return acc
    if acc is not out:
        out += acc.to(out.dtype)
    return out


def stacked_weights(w: LoRAWeights, slots: tuple[int, ...], rank: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(a [E * S * rank, in] with rows (expert, slice, j), b [E * rank, N] with rows (expert, j))
    of these slots in dtype, made once per version of w's weights (see _stacked: a write
    that does not bump the version is not seen); a is a view of the pool when the slots are
    consecutive at its full rank and dtype."""
    entries = _stacked.setdefault(w, {})
    versions = (w.a._version, w.b._version)
    key = (slots, rank, dtype)
    cached = entries.get(key)
    if cached is None or cached[0] != versions:
        for stale in [k for k, entry in entries.items() if entry[0] != versions]:
            del entries[stale]
        with torch.no_grad():
            cached = entries[key] = (versions, *_stack(w, slots, rank, dtype))
    return cached[1], cached[2]


def _stack(w: LoRAWeights, slots: tuple[int, ...], rank: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    num_experts, first = len(slots), slots[0]
    if slots == tuple(range(first, first + num_experts)):
        a, b = w.a[first : first + num_experts], w.b[first : first + num_experts]
    else:
        index = torch.tensor(slots, device=w.a.device)
        a, b = w.a.index_select(0, index), w.b.index_select(0, index)
    a = a.view(num_experts, w.num_slices, w.max_rank, w.in_features)[:, :, :rank].to(dtype)
    b = b[:, :, :rank].to(dtype).transpose(1, 2)
    return a.reshape(-1, w.in_features), b.reshape(num_experts * rank, w.out_features)


def uniform_rank(w: LoRAWeights, slots: tuple[int, ...]) -> int | None:
    """The rank every one of these slots has at w, None when they differ."""
    ranks = {w.host_ranks[s] for s in slots}
    return ranks.pop() if len(ranks) == 1 else None
