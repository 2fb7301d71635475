"""The merge methods over task deltas, as their papers define them (and peft implements them
in peft.utils.merge_utils, whose conventions these follow), plus the truncated-SVD
re-factorisation of a merged delta into LoRA factors.

Every method takes the adapters' full deltas of one projection (dW_i = scale_i * B_i A_i,
[out, in] each) as a Deltas sequence and their weights [N], and returns the merged [out, in]:
- linear: sum_i w_i dW_i (merging.py re-factorises it from the factors: refactor_product).
- TIES (Yadav et al. 2023): trim each dW_i to its `density` largest magnitudes, elect each
  parameter's sign as the sign of the trimmed deltas' sum, and take the disjoint mean: the
  weighted deltas that agree with the elected sign, summed, over how many agree.
- DARE-TIES (Yu et al. 2024): DARE's drop (each parameter kept with probability density,
  independently, from the merge's seeded generator, the kept rescaled by 1 / density)
  instead of TIES' trim.
- Breadcrumbs (Davari & Belilovsky 2024): per delta, drop the `gamma` fraction of largest
  magnitudes (outliers) and keep only the next `density` fraction (dropping the tiny ones),
  then sum weighted.

They run through the deltas one at a time (TIES twice: the vote, then the mean), holding a
few out x in buffers whatever N is: stacked, TIES held about six copies of all N at once
(3.7 GB per Llama-8B down_proj for N = 2, 28 GB for N = 16), enough to take the serving
process down. Deltas may be a stacked tensor or a sequence that computes each on demand.
"""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Deltas = Tensor | Sequence[Tensor]


def ties(deltas: Deltas, weights: Tensor, density: float) -> Tensor:
    return _elect_and_merge(deltas, weights, lambda d: magnitude_trim(d, density))


def dare_ties(deltas: Deltas, weights: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """generator: the merge's one stream of draws, on through its projections: a fresh one
    seeded per projection dropped the same entries in every projection of a shape. The
    mean's pass draws the vote's drops again, from the same state."""
    start = generator.get_state()
    return _elect_and_merge(
        deltas, weights, lambda d: _dare_drop(d, density, generator), rewind=lambda: generator.set_state(start)
    )


def breadcrumbs(deltas: Deltas, weights: Tensor, density: float, gamma: float) -> Tensor:
    return _weighted_sum(deltas, weights, lambda d: breadcrumb_mask(d, density, gamma) * d)


def magnitude_trim(delta: Tensor, density: float) -> Tensor:
    """delta with all but its int(density * numel) largest magnitudes set to zero."""
    return delta * _rank_band(delta, 0, int(density * delta.numel()))


def breadcrumb_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """1 on the magnitudes ranked (from the largest) past the top int(gamma * numel) and
    within the next int(density * numel); 0 elsewhere."""
    top = int(gamma * delta.numel())
    return _rank_band(delta, top, top + int(density * delta.numel()))


def _rank_band(delta: Tensor, first: int, stop: int) -> Tensor:
    """A 0/1 mask of the entries whose magnitude ranks in [first, stop) (0 = the largest)."""
    order = delta.abs().flatten().argsort(descending=True, stable=True)
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    mask[order[first:stop]] = 1
    return mask.view_as(delta)


def _dare_drop(delta: Tensor, density: float, generator: torch.Generator) -> Tensor:
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float64) < density
    return delta * keep / density


def _weighted_sum(deltas: Deltas, weights: Tensor, kept: Callable[[Tensor], Tensor]) -> Tensor:
    """sum_i w_i kept(dW_i), one delta at a time (kept returns a new tensor)."""
    total = None
    for i, w in enumerate(weights.tolist()):
        term = kept(deltas[i]).mul_(w)
        total = term if total is None else total.add_(term)
    return total


def _elect_and_merge(
    deltas: Deltas, weights: Tensor, kept: Callable[[Tensor], Tensor], rewind: Callable[[], None] | None = None
) -> Tensor:
    """TIES' sign election (sign of the kept deltas' sum, + on ties) and disjoint mean, in two
    passes over the deltas (kept, which returns a new tensor, computes each again; rewind, if
    given, runs between them, so that a random keep draws the same again)."""
    vote = None
    for i in range(len(weights)):
        k = kept(deltas[i])
        vote = k if vote is None else vote.add_(k)
    elected = torch.where(vote >= 0, 1.0, -1.0).to(vote.dtype)
    del vote
    if rewind is not None:
        rewind()
    merged = torch.zeros_like(elected)
    agreeing = torch.zeros_like(elected)
    for i, w in enumerate(weights.tolist()):
        k = kept(deltas[i])
        agree = (k.sign() == elected).to(k.dtype)
        agreeing.add_(agree)
        merged.add_(k.mul_(agree).mul_(w))
    return merged.div_(agreeing.clamp_(min=1))


def refactor_product(b: Tensor, a: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """refactor(b @ a) without forming it: b [out, R], a [R, in] with R small (a linear merge's
    stacked factors, R = the sum of the ranks). Thin QRs of b and a^T leave an R x R core whose
    SVD is the product's (b a = Qb (Rb Ra^T) Qa^T), so the memory is the factors', not
    out x in (470 MB of float64 per delta for a Llama-8B down_proj). The error is the SVD
    tail's, ||s[rank:]|| / ||s||: the float64 factors'; the float32 ones written add rounding
    of about 1e-7 relative."""
    qb, rb = torch.linalg.qr(b.to(torch.float64))
    qa, ra = torch.linalg.qr(a.to(torch.float64).T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    k = min(rank, s.shape[0])
    root = s[:k].sqrt()
    out_b = torch.zeros(b.shape[0], rank, dtype=torch.float32)
    out_a = torch.zeros(rank, a.shape[1], dtype=torch.float32)
    out_b[:, :k] = (qb @ (u[:, :k] * root)).float()
    out_a[:k] = ((root[:, None] * vh[:k]) @ qa.T).float()
    norm = float(s.norm())
    return out_b, out_a, float(s[k:].norm()) / norm if norm else 0.0


def refactor(delta: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """The rank-`rank` truncated SVD of delta [out, in] as LoRA factors (b [out, rank],
    a [rank, in], float32, the singular values split evenly between them) and the relative
    error ||delta - b a||_F / ||delta||_F of those float32 factors (0 for a zero delta).
    Past the delta's own rank the factors are zero."""
    u, s, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    k = min(rank, s.shape[0])
    root = s[:k].sqrt()
    b = torch.zeros(delta.shape[0], rank, dtype=torch.float32)
    a = torch.zeros(rank, delta.shape[1], dtype=torch.float32)
    b[:, :k] = (u[:, :k] * root).float()
    a[:k] = (root[:, None] * vh[:k]).float()
    norm = float(torch.linalg.matrix_norm(delta.to(torch.float64)))
    error = float(torch.linalg.matrix_norm(delta.to(torch.float64) - b.double() @ a.double())) / norm if norm else 0.0
    return b, a, error
