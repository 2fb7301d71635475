"""A histogram the engine thread fills and metrics read at scrape time: plain counts, so the
engine needs no metrics library and a scrape never blocks an iteration."""

from dataclasses import dataclass, field

# vLLM's edges for iteration_tokens_total (CUDA-graph sizes up to the largest token budgets).
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass
class TokenHistogram:
    """counts[i]: observations <= edges[i] and > edges[i - 1]; counts[-1]: above every edge."""

    edges: tuple[int, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.edges) + 1)

    def observe(self, value: float) -> None:
        index = next((i for i, edge in enumerate(self.edges) if value <= edge), len(self.edges))
        self.counts[index] += 1
        self.total += value

    def snapshot(self) -> "TokenHistogram":
        return TokenHistogram(self.edges, list(self.counts), self.total)

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus buckets: (upper bound, observations at or below it), +Inf last."""
        out, running = [], 0
        for edge, count in zip([*(str(float(e)) for e in self.edges), "+Inf"], self.counts):
            running += count
            out.append((edge, running))
        return out
