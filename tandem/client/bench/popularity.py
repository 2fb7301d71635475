"""Which adapter each request names: none (the base model), uniform over N adapters, Zipf
with exponent alpha over N (rank i drawn with weight 1/i^alpha, the power law S-LoRA
measured), or explicit weights from a JSON file {"adapter": weight, ...}."""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

POPULARITIES = ("none", "uniform", "zipf", "weights")


@dataclass(frozen=True)
class AdapterPopularity:
    """names[i] is drawn with probability probabilities[i]; no names = the base model only."""

    names: tuple[str, ...]
    probabilities: tuple[float, ...]

    def draw(self, count: int, rng: np.random.Generator) -> list[str]:
        if not self.names:
            return [""] * count
        picks = rng.choice(len(self.names), size=count, p=np.asarray(self.probabilities))
        return [self.names[i] for i in picks]


def zipf_probabilities(n: int, alpha: float) -> np.ndarray:
    """P(rank i) proportional to 1 / i^alpha for i = 1..n (alpha 0 = uniform)."""
    if n < 1:
        raise ValueError("Zipf popularity needs at least one adapter")
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"the Zipf exponent must be a finite number >= 0, got {alpha}")
    weights = 1.0 / np.arange(1, n + 1, dtype=float) ** alpha
    return weights / weights.sum()


def read_weights(path: str | Path) -> dict[str, float]:
    """A JSON object of adapter name -> non-negative weight ("" = the base model)."""
    weights = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(weights, dict) or not weights:
        raise ValueError(f"{path}: expected a JSON object of adapter name -> weight")
    for name, weight in weights.items():
        if not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(f"{path}: the weight of {name!r} must be a number >= 0, got {weight!r}")
    if sum(weights.values()) <= 0:
        raise ValueError(f"{path}: the weights add up to 0")
    return {str(name): float(weight) for name, weight in weights.items()}


def check_popularity_flags(
    kind: str, names_flags: dict[str, object], zipf_alpha: float | None, weights_file: str | None
) -> None:
    """Refuse an adapter flag the chosen popularity does not read: under the default `none`
    every request went to the base model while `--adapters a,b,c` looked accepted.
    names_flags: the flags that name adapters (--adapters, --num-adapters) and their values,
    None where not given."""
    given = [flag for flag, value in names_flags.items() if value is not None]
    if kind == "none" and given:
        raise ValueError(f"{given[0]} has no effect under --popularity none (every request goes to the base model): "
                         "add --popularity uniform or zipf")
    if kind == "weights" and given:
        raise ValueError(f"{given[0]} has no effect under --popularity weights: the adapters are the names in --adapter-weights")
    if zipf_alpha is not None and kind != "zipf":
        raise ValueError(f"--zipf-alpha has no effect under --popularity {kind}: add --popularity zipf")
    if weights_file is not None and kind != "weights":
        raise ValueError(f"--adapter-weights has no effect under --popularity {kind}: add --popularity weights")


def build_popularity(kind: str, names: list[str], num_adapters: int | None = None, zipf_alpha: float = 1.0,
                     weights_file: str | None = None) -> AdapterPopularity:
    """names: the adapters in popularity order (the first is Zipf's rank 1); num_adapters
    keeps the first N of them."""
    if kind == "none":
        return AdapterPopularity((), ())
    if kind == "weights":
        if not weights_file:
            raise ValueError("--popularity weights needs --adapter-weights FILE")
        weights = read_weights(weights_file)
        total = sum(weights.values())
        return AdapterPopularity(tuple(weights), tuple(w / total for w in weights.values()))
    if kind not in POPULARITIES:
        raise ValueError(f"unknown popularity {kind!r}: choose one of {', '.join(POPULARITIES)}")
    if num_adapters is not None and num_adapters < 1:
        raise ValueError(f"--num-adapters must be >= 1, got {num_adapters}")
    chosen = names[:num_adapters] if num_adapters is not None else names
    if not chosen:
        raise ValueError(f"--popularity {kind} needs adapter names: give --adapters, or load adapters on the server")
    if num_adapters is not None and len(chosen) < num_adapters:
        raise ValueError(f"--num-adapters {num_adapters} but only {len(chosen)} adapter names are known")
    probabilities = zipf_probabilities(len(chosen), zipf_alpha if kind == "zipf" else 0.0)
    return AdapterPopularity(tuple(chosen), tuple(float(p) for p in probabilities))
