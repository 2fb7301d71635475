"""When requests are sent: Poisson or gamma arrivals at a rate, or a fixed concurrency.

Gamma inter-arrival gaps use vLLM's burstiness convention: shape = burstiness, mean gap
1/rate, so burstiness 1 is Poisson and smaller values are burstier (coefficient of variation
1/sqrt(burstiness)), as in S-LoRA's workloads.
"""

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LoadPoint:
    """One point of a sweep: an open-loop rate (requests/s, inf = all at once) or a
    closed-loop concurrency (that many requests always in flight)."""

    rate: float | None = None
    concurrency: int | None = None

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("a load point is either a rate or a concurrency")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"a request rate must be > 0, got {self.rate}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"a concurrency must be >= 1, got {self.concurrency}")

    @property
    def label(self) -> str:
        if self.concurrency is not None:
            return f"concurrency {self.concurrency}"
        return "rate inf" if math.isinf(self.rate) else f"rate {self.rate:g}/s"


def inter_arrival_gaps(rate: float, count: int, rng: np.random.Generator, burstiness: float = 1.0) -> np.ndarray:
    """`count` gaps in seconds between consecutive sends, mean 1/rate (zeros at rate inf)."""
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise ValueError(f"burstiness must be a finite number > 0, got {burstiness}")
    if math.isinf(rate):
        return np.zeros(count)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=count)


def send_times(rate: float, count: int, rng: np.random.Generator, burstiness: float = 1.0) -> np.ndarray:
    """Send offsets from the start of a run; the first request goes at once."""
    gaps = inter_arrival_gaps(rate, count, rng, burstiness)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])]) if count else gaps


def parse_rates(text: str) -> list[float]:
    """"1,2,4,inf" -> [1.0, 2.0, 4.0, inf]."""
    return [float(item) for item in text.split(",") if item.strip()]


def parse_concurrencies(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item.strip()]
