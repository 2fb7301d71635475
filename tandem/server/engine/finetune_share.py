"""How much work co-served fine-tuning may add to the next iteration: the latency guard.

With no inference running, fine-tuning takes the whole token budget. Without a target it
takes a fixed half of it. With an inter-token latency target (`--coserve-itl-p99`), every
iteration that decodes is one inter-token interval for its requests, so fine-tuning fills
each iteration up to the target and no further.

A cost model learned from measured iteration times says how much fits: seconds = fixed +
sum over kinds of (cost[kind] x units[kind] + overhead[kind] when the kind is present),
fitted by least squares over recent iterations. The kinds cost differently per unit and in
different proportions on each machine (a head row is a vocabulary-wide GEMM and its dX, a
backward unit a replay and a backward), and carrying a kind at all costs its own ops
(on CPU, per-op overhead: a forward chunk adds attention calls, layer-input copies and the
trained adapter's LoRA to every layer), so each has its own; a kind not seen yet is priced
by its prior (cost relative to a forward token, from the model's shape) times the forward
token's, with no overhead. Units: inference and
forward tokens, head rows, backward token-layers / num_layers.

A gain in (0, 1.25] scales the target the model fills to, by what the model misses: its
error, the machine's speed drifting (a shared host runs the same work 30% slower for tens of
iterations, then faster again), and what runs between iterations (the trainer's optimizer
step, handing tokens to their streams). What a request sees is the interval between two of
its tokens, from one decoding iteration's end to the next's. The log of measured / predicted
time has a level, tracked by a fast moving average (the drift), and a spread around that
level (its root mean square over the last iterations, intervals where they decoded): gain = exp(-(level + Z x
spread)), so that about 0.5% of the intervals exceed the target (Z for a normal's 99.5%:
half of a p99's 1%). A margin from measurement, not a controller that cuts on every miss:
that one settles where misses are as frequent as its cut and recovery steps make them (~8%
of intervals for a cut of 0.7 and a recovery of 0.02), far above 1%.

That margin is for work that cannot stop once started (a forward, a head block). A backward
slice can, between layers, and a head between blocks: beside decodes they run unit after
unit until the next would end past fill x target from the interval's start (`deadline`), so
on a host whose speed swings they fill the interval by the clock instead of by a prediction
shrunk for the worst case. On the 2-core EPYC the margin's gain sat at 0.64-0.75: slices
planned by it ended near two thirds of the target, and a slow spell still carried one past it.
The fill has a margin of its own, from measurement too: an interval a deadline cut ends past
it by its overshoot (a unit that ran slower than the one before, what the step does after
its training work, handing tokens to their streams; less the part of a unit left unrun), so
fill = 1 - (mean + Z x spread) of the last cut intervals' overshoots, in targets. A fixed
fill cannot be right for every target: a layer is a larger part of a small one. At a 394 ms
target on the 2-core EPYC (50% load) a fixed 0.85 ended co-served intervals at ITL p99 0.88x
the target, the room left above it unused.
"""

import math
from collections import Counter, deque
from collections.abc import Mapping

import torch

KINDS = ("inference", "forward", "head", "backward")
TRAINING = KINDS[1:]
FIXED_SHARE = 0.5
MIN_PROMPT_TOKENS = 16
# Until the cost model has this much recent evidence of iterations that carry inference
# (iterations, decayed by _DECAY), co-served work beside inference stays small.
_WARMUP = 8
_COLD_SHARE = 0.1
# Recent iterations weigh in with this factor (an exponential moving window of ~50).
_DECAY = 0.98
# The margin: Z; the level's moving-average weight; the spread over the last _RATIOS
# iterations, once _MIN_RATIOS are in (until then _COLD_GAIN, the margin of a spread of
# 0.14, as measured on a shared 2-core host); within [_MIN_GAIN, _MAX_GAIN].
Z = 2.58
_LEVEL_WEIGHT = 0.5
_RATIOS, _MIN_RATIOS, _COLD_GAIN = 100, 10, 0.7
_MIN_GAIN, _MAX_GAIN = 0.05, 1.25
# Pull towards the prior, in iterations' worth of evidence per kind; and the least a fitted
# cost may be, as a fraction of its prior (a fit on few points can say anything).
_PRIOR_WEIGHT, _FLOOR = 0.1, 0.25
_OVERHEAD_PRIOR_WEIGHT = 1.0
# A mix of work (which training kinds an iteration carries, or none) moves the margin once
# the cost model has seen this many iterations of it.
_MIX_WARMUP = 4
# The share of the target work beside decodes may fill by the clock until _MIN_RATIOS
# intervals a deadline cut are in; the rest is room for one layer running slower than the
# one before it, and for the iteration's end. At a 68 ms target (Poisson 4.2 requests/s,
# SmolLM2 bf16, the 2-core Xeon, three rounds of 40 s windows alternated in one process) 0.9
# gave ITL p99s of 73, 66 and 72 ms and 0.85 gave 66, 65 and 67. Measured, within
# [_MIN_FILL, _MAX_FILL].
FILL = 0.85
_MIN_FILL, _MAX_FILL = 0.5, 1.0


class FinetuneShare:
    def __init__(self, itl_p99_target: float | None, budget: int, prior: Mapping[str, float]):
        """prior: each kind's cost per unit relative to a forward token."""
        self.target = itl_p99_target
        self.budget = budget
        self.prior = {kind: float(prior[kind]) for kind in KINDS}
        self.gain = _COLD_GAIN
        self._level = 0.0
        self._misses: deque[float] = deque(maxlen=_RATIOS)
        self.fill = FILL
        self._overshoots: deque[float] = deque(maxlen=_RATIOS)
        self.share = FIXED_SHARE if itl_p99_target is None else _COLD_SHARE
        self._inference_evidence = 0.0
        self._mix_seen: Counter[tuple[str, ...]] = Counter()
        n = 1 + len(KINDS) + len(TRAINING)
        # Decayed normal equations of seconds against [1, units per kind, training kind present].
        self._xx = torch.zeros(n, n, dtype=torch.float64)
        self._xy = torch.zeros(n, dtype=torch.float64)

    def allowance(self, inference_tokens: int, inference_running: bool, kind: str) -> float:
        """Units of `kind` of training work the next iteration may carry."""
        room = max(0, self.budget - inference_tokens) / self.prior[kind]
        if not inference_running:
            self.share = 1.0
        elif self.target is None:
            self.share = FIXED_SHARE
        elif not self.warm:
            self.share = _COLD_SHARE
        else:
            cost = self.costs()
            left = self.gain * self.target - cost["fixed"] - cost["inference"] * inference_tokens - cost[kind + "_overhead"]
            units = max(0.0, left / cost[kind])
            self.share = units * self.prior[kind] / self.budget
            return min(room, units)
        return min(room, self.share * self.budget / self.prior[kind])

    def inference_budget(self, running: int) -> int:
        """Inference tokens the next iteration may schedule. With a target, as many as fit in
        it by the cost model and margin: at 50% load a burst of arrivals would otherwise put
        two or three whole prompts into one iteration and stretch every running request's
        interval far past the target, fine-tuning or not. At least one per running sequence
        (every decode goes on) plus MIN_PROMPT_TOKENS (prompts move); the whole budget without
        a target or before the model has learned."""
        if self.target is None or not self.warm:
            return self.budget
        cost = self.costs()
        fits = int((self.gain * self.target - cost["fixed"]) / cost["inference"])
        return min(self.budget, max(fits, running + MIN_PROMPT_TOKENS))

    def deadline(self, interval_start: float) -> float | None:
        """When a backward slice or head in an interval that began at interval_start
        (perf_counter) must stop adding layers or blocks; None without a target."""
        return None if self.target is None else interval_start + self.fill * self.target

    @property
    def warm(self) -> bool:
        """Whether the cost model has recently seen enough iterations that carry inference to
        be trusted beside it. A job that ran alone for a while leaves a model fitted to
        training-only iterations, which cannot tell an iteration's fixed cost from its
        training work: it priced the first decodes after it at a quarter of their time, and
        those misses cut the margin's gain to ~0.1 for the next hundred iterations."""
        return self._inference_evidence >= _WARMUP

    def observe(self, seconds: float, work: Mapping[str, float], interval: float | None, cut: bool = False) -> None:
        """Learn from one finished iteration: its time, its units of each kind of work, and,
        when it decoded, the interval its requests saw since their previous token (None when
        it decoded nothing: only decoding iterations end an inter-token interval); cut: a
        deadline stopped its training work before its end (the fill learns from those,
        once the cost model is warm: before, prompts are not capped to the target, and the
        first burst of them overran it by up to 0.64x the target on the 2-core EPYC, not the
        deadline's unit; two such overshoots held the fill at its floor, 0.5, for a hundred
        cut intervals, 40 s of a 90 s window).

        Only iterations that carry inference move the margin (they are the ones the target
        is for), and only once the model has seen a few of their mix: a mix it has never seen
        (the first decodes with no training work, between two micro-batches, after a run of
        iterations that all carried some) it cannot price, whatever its fit elsewhere. On the
        2-core EPYC such first decodes ran at 2-7x their prediction, and those few misses
        held the gain near 0.1 for the next hundred iterations."""
        if self.target is None:
            return
        units = [float(work.get(kind, 0.0)) for kind in KINDS]
        present = [float(work.get(kind, 0.0) > 0) for kind in TRAINING]
        inference = work.get("inference", 0.0) > 0
        mix = tuple(kind for kind in TRAINING if work.get(kind, 0.0) > 0)
        if inference and self.warm and self._mix_seen[mix] >= _MIX_WARMUP:
            self._update_gain(math.log((interval or seconds) / self.predict(work)))
        if cut and interval is not None and self.warm:
            self._update_fill(interval / self.target - self.fill)
        x = torch.tensor([1.0, *units, *present], dtype=torch.float64)
        self._xx.mul_(_DECAY).add_(torch.outer(x, x))
        self._xy.mul_(_DECAY).add_(x * seconds)
        self._inference_evidence = _DECAY * self._inference_evidence + inference
        self._mix_seen[mix] += 1

    def _update_gain(self, log_ratio: float) -> None:
        """log_ratio: log(measured / predicted) of an iteration (its interval if it decoded)."""
        self._misses.append(log_ratio - self._level)
        self._level += _LEVEL_WEIGHT * (log_ratio - self._level)
        if len(self._misses) >= _MIN_RATIOS:
            spread = math.sqrt(sum(m * m for m in self._misses) / len(self._misses))
            self.gain = min(_MAX_GAIN, max(_MIN_GAIN, math.exp(-(self._level + Z * spread))))

    def _update_fill(self, overshoot: float) -> None:
        """overshoot: how far past the deadline a cut interval ended, in targets."""
        self._overshoots.append(overshoot)
        if len(self._overshoots) >= _MIN_RATIOS:
            n = len(self._overshoots)
            mean = sum(self._overshoots) / n
            spread = math.sqrt(sum((o - mean) ** 2 for o in self._overshoots) / n)
            self.fill = min(_MAX_FILL, max(_MIN_FILL, 1.0 - (mean + Z * spread)))

    def predict(self, work: Mapping[str, float]) -> float:
        """Seconds the cost model expects an iteration with this work to take."""
        cost = self.costs()
        seconds = cost["fixed"] + sum(cost[kind] * work.get(kind, 0.0) for kind in KINDS)
        return seconds + sum(cost[kind + "_overhead"] for kind in TRAINING if work.get(kind, 0.0) > 0)

    def seconds(self, kind: str, units: float) -> float:
        """What the cost model expects `units` of one training kind to add to an iteration
        beside inference; until it is warm there, more than any interval (nothing fits)."""
        if not self.warm:
            return math.inf
        cost = self.costs()
        return cost[kind] * units + cost[kind + "_overhead"]

    def costs(self) -> dict[str, float]:
        """Seconds of the fixed part, per unit of each kind, and of each training kind's
        presence (`<kind>_overhead`), from recent iterations."""
        n = self._xx[0, 0].item()
        # The prior: no fixed part; a forward token costs what the recent work averaged.
        mean_work = sum(self._xx[0, i + 1].item() * self.prior[kind] for i, kind in enumerate(KINDS)) / n
        per_token = (self._xy[0].item() / n) / max(mean_work, 1.0)
        prior = torch.tensor(
            [0.0, *(per_token * self.prior[kind] for kind in KINDS), *(0.0 for _ in TRAINING)], dtype=torch.float64
        )
        # Ridge towards the prior, scaled to each feature's mean square (at least one unit);
        # the overheads held harder to none: where a kind ran in every recent iteration, its
        # overhead and the fixed part cannot be told apart, and the fixed part must take the
        # shared cost, or the first iteration without that kind (a decode between micro-batches)
        # is priced far below its time.
        scale = torch.clamp(self._xx.diagonal() / n, min=1.0) * _PRIOR_WEIGHT
        scale[1 + len(KINDS) :] = _OVERHEAD_PRIOR_WEIGHT
        theta = torch.linalg.solve(self._xx + torch.diag(scale), self._xy + scale * prior)
        fitted = {"fixed": max(0.0, theta[0].item())}
        for i, kind in enumerate(KINDS):
            fitted[kind] = max(theta[i + 1].item(), _FLOOR * prior[i + 1].item(), 1e-9)
        for i, kind in enumerate(TRAINING):
            fitted[kind + "_overhead"] = max(0.0, theta[1 + len(KINDS) + i].item())
        return fitted
