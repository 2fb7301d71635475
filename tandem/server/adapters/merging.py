"""Merging adapters into a new one (AdaptersService.MergeAdapters): per projection, each
adapter's full delta dW = scale * B A, combined by a method of merge_methods.py, then
re-factorised to the requested rank by truncated SVD and written as a PEFT adapter whose
scale is 1 (lora_alpha = r), with the relative reconstruction error of every projection.
A linear merge never forms the full deltas: its sum is a product of the stacked factors,
re-factorised from those (merge_methods.refactor_product).

Every adapter must adapt the same projections (a merge over a projection that only some of
them adapt is refused rather than silently treating the others' delta as zero).
"""

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tandem.server.adapters import merge_methods
from tandem.server.adapters.compeft_format import dense_slices
from tandem.server.adapters.peft_format import LoRAAdapter, peft_config
from tandem.server.errors import FailedPrecondition, InvalidRequest, excerpt
from tandem.server.model.lora_targets import TARGETS, module_path, target_of

METHODS = ("linear", "ties", "dare_ties", "breadcrumbs")
DEFAULT_DENSITY = 0.5
DEFAULT_GAMMA = 0.01
# Every adapter's dense factors are held in host memory at once; and a request under the 4 MiB
# message limit names a million adapters, which checking took hours in a thread no deadline stops.
MAX_ADAPTERS = 64


@dataclass(frozen=True)
class MergeSpec:
    """What to merge and how. weights: one per adapter (empty = 1 each); rank 0 = the largest
    of the adapters' ranks; density / gamma None = the method's default."""

    adapters: tuple[str, ...]
    weights: tuple[float, ...]
    method: str
    rank: int = 0
    density: float | None = None
    gamma: float | None = None
    seed: int = 0

    def check(self, max_rank: int) -> None:
        """Refuse a malformed merge before any adapter is read (InvalidRequest)."""
        if self.method not in METHODS:
            raise InvalidRequest(f"merge method must be one of {', '.join(METHODS)}, got {excerpt(self.method)}")
        if not self.adapters:
            raise InvalidRequest("a merge needs at least one adapter")
        if len(self.adapters) > MAX_ADAPTERS:
            raise InvalidRequest(
                f"a merge names {len(self.adapters)} adapters; at most {MAX_ADAPTERS} can be merged in one call: merge fewer"
            )
        twice = sorted(a for a, n in Counter(self.adapters).items() if n > 1)
        if twice:
            raise InvalidRequest(f"adapter {excerpt(twice[0])} is named twice: give each adapter once, with its total weight")
        if self.weights and len(self.weights) != len(self.adapters):
            raise InvalidRequest(f"{len(self.weights)} weights for {len(self.adapters)} adapters: give one weight per adapter (or none)")
        if not all(math.isfinite(w) for w in self.weights):
            raise InvalidRequest("merge weights must be finite numbers")
        if not 0 <= self.rank <= max_rank:
            raise InvalidRequest(f"rank {self.rank} is above the server's maximum LoRA rank {max_rank} (--max-lora-rank)")
        if self.method == "linear" and self.density is not None:
            raise InvalidRequest("density applies to ties, dare_ties and breadcrumbs, not to linear")
        if self.method != "breadcrumbs" and self.gamma is not None:
            raise InvalidRequest("gamma applies to breadcrumbs only")
        if self.method != "dare_ties" and self.seed:
            raise InvalidRequest("seed applies to dare_ties only (its random drops); the other methods draw nothing")
        density = self.density_or_default
        if not 0 < density <= 1:
            raise InvalidRequest(f"density must lie in (0, 1], got {density}")
        # gRPC carries both as float32: gamma 0.4 with density 0.6 arrives 3e-8 past 1 - density.
        if self.method == "breadcrumbs" and not 0 <= self.gamma_or_default <= 1 - density + 1e-6:
            raise InvalidRequest(f"gamma must lie in [0, 1 - density] = [0, {1 - density:g}], got {self.gamma_or_default}")

    @property
    def density_or_default(self) -> float:
        return (1.0 if self.method == "linear" else DEFAULT_DENSITY) if self.density is None else self.density

    @property
    def gamma_or_default(self) -> float:
        """Unset, DEFAULT_GAMMA where the density leaves room for it (density 0.995 leaves 0.005)."""
        return min(DEFAULT_GAMMA, 1 - self.density_or_default) if self.gamma is None else self.gamma


@dataclass
class MergeResult:
    """The merged adapter's PEFT config and tensors, and per PEFT module path the relative
    reconstruction error of its rank-r factors."""

    config: dict
    tensors: dict[str, torch.Tensor]
    errors: dict[str, float]


def module_weights(adapter: LoRAAdapter) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """PEFT module path -> (A, B dense float32 on the host, PEFT scale) of an adapter."""
    out = {}
    dense = dense_slices(adapter)
    for (layer, group), g in sorted(adapter.groups.items()):
        for s, (_, _, scale) in sorted(g.slices.items()):
            a, b = dense[((layer, group), s)]
            out[module_path(layer, target_of(layer, group, s))] = (a.float(), b.float(), scale)
    return out


def merge_adapters(adapters: list[LoRAAdapter], spec: MergeSpec, base_model: str) -> MergeResult:
    """Merge checked adapters as spec says (spec.check passed)."""
    weights = torch.tensor(spec.weights or [1.0] * len(adapters), dtype=torch.float64)
    per_adapter = [module_weights(a) for a in adapters]
    modules = list(per_adapter[0])
    for adapter, found in zip(adapters[1:], per_adapter[1:]):
        if set(found) != set(modules):
            differ = sorted(set(found) ^ set(modules))[0]
            raise FailedPrecondition(
                f"adapters {adapters[0].name!r} and {adapter.name!r} adapt different projections "
                f"({differ} is in one only): merge adapters that adapt the same modules"
            )
    rank = spec.rank or max(a.rank for a in adapters)
    tensors, errors = {}, {}
    generator = torch.Generator().manual_seed(spec.seed)  # dare_ties: one stream, on through the modules in order
    for module in modules:
        factors = [m[module] for m in per_adapter]
        if spec.method == "linear":  # sum_i w_i s_i B_i A_i = [w_i s_i B_i] [A_i]: re-factorised without the full deltas
            stacked_b = torch.cat([float(w) * scale * b.double() for w, (_, b, scale) in zip(weights, factors)], dim=1)
            b, a, errors[module] = merge_methods.refactor_product(stacked_b, torch.cat([a.double() for a, _, _ in factors]), rank)
        else:  # per-entry methods: the full deltas, one at a time
            b, a, errors[module] = merge_methods.refactor(_combine(_Deltas(factors), weights, spec, generator), rank)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
    targets = [t for t in TARGETS if any(m.endswith(f".{t}") for m in modules)]
    config = peft_config(rank, rank, targets, use_rslora=False, lora_dropout=0.0, base_model=base_model)
    return MergeResult(config, tensors, errors)


class _Deltas(Sequence[torch.Tensor]):
    """The adapters' full deltas of one projection, dW_i = scale_i B_i A_i in float64, each
    computed when asked for: the merge methods hold one or two at a time."""

    def __init__(self, factors: list[tuple[torch.Tensor, torch.Tensor, float]]):
        self._factors = factors

    def __len__(self) -> int:
        return len(self._factors)

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]  (no slices here)
        a, b, scale = self._factors[i]
        return scale * (b.double() @ a.double())


def _combine(deltas: Sequence[torch.Tensor], weights: torch.Tensor, spec: MergeSpec, generator: torch.Generator) -> torch.Tensor:
    density = spec.density_or_default
    if spec.method == "ties":
        return merge_methods.ties(deltas, weights, density)
    if spec.method == "dare_ties":
        return merge_methods.dare_ties(deltas, weights, density, generator)
    return merge_methods.breadcrumbs(deltas, weights, density, spec.gamma_or_default)
