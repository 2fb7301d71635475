"""How much work co-served fine-tuning may add to the next iteration: the latency guard.

With no inference running, fine-tuning takes the whole token budget. Without a target it
takes a fixed half of it. With an inter-token latency target (`--coserve-itl-p99`), every
iteration that decodes is one inter-token interval for its requests, so fine-tuning fills
each iteration up to the target and no further.

A cost model learned from measured iteration times says how much fits: seconds = fixed +
sum over kinds of (cost[kind] x units[kind] + overhead[kind] when the kind is present),
fitted by least squares over recent iterations. The kinds cost differently per unit and in
different proportions on each machine (a head row is a vocabulary-wide GEMM and its dX, a
backward unit a recompute and a backward), and carrying a kind at all costs its own ops
(on CPU, per-op overhead: a forward chunk adds attention calls, layer-input copies and the
trained adapter's LoRA to every layer), so each has its own; a kind not seen yet is priced
by its prior (cost relative to a forward token, from the model's shape) times the forward
token's, with no overhead. Units: inference and
forward tokens, head rows, backward token-layers / num_layers. A gain in (0, 1] absorbs the
model's error: an iteration over the target cuts it (multiplicatively), one under it lets
it recover (additively).
"""

from collections.abc import Mapping

import torch

KINDS = ("inference", "forward", "head", "backward")
TRAINING = KINDS[1:]
FIXED_SHARE = 0.5
# Until the cost model has seen this many iterations, co-served work stays small.
_WARMUP = 8
_COLD_SHARE = 0.1
# Recent iterations weigh in with this factor (an exponential moving window of ~50).
_DECAY = 0.98
_CUT, _RECOVER, _MIN_GAIN = 0.7, 0.02, 0.05
# Pull towards the prior, in iterations' worth of evidence per kind; and the least a fitted
# cost may be, as a fraction of its prior (a fit on few points can say anything).
_PRIOR_WEIGHT, _FLOOR = 0.1, 0.25


class FinetuneShare:
    def __init__(self, itl_p99_target: float | None, budget: int, prior: Mapping[str, float]):
        """prior: each kind's cost per unit relative to a forward token."""
        self.target = itl_p99_target
        self.budget = budget
        self.prior = {kind: float(prior[kind]) for kind in KINDS}
        self.gain = 1.0
        self.share = FIXED_SHARE if itl_p99_target is None else _COLD_SHARE
        self._seen = 0
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
        elif self._seen < _WARMUP:
            self.share = _COLD_SHARE
        else:
            cost = self.costs()
            left = self.gain * self.target - cost["fixed"] - cost["inference"] * inference_tokens - cost[kind + "_overhead"]
            units = max(0.0, left / cost[kind])
            self.share = units * self.prior[kind] / self.budget
            return min(room, units)
        return min(room, self.share * self.budget / self.prior[kind])

    def observe(self, seconds: float, work: Mapping[str, float], decoded: bool) -> None:
        """Learn from one finished iteration: its time, its units of each kind of work,
        whether it decoded (only those are inter-token intervals)."""
        if self.target is None:
            return
        units = [float(work.get(kind, 0.0)) for kind in KINDS]
        present = [float(work.get(kind, 0.0) > 0) for kind in TRAINING]
        x = torch.tensor([1.0, *units, *present], dtype=torch.float64)
        self._xx.mul_(_DECAY).add_(torch.outer(x, x))
        self._xy.mul_(_DECAY).add_(x * seconds)
        self._seen += 1
        if decoded:
            if seconds > self.target:
                self.gain = max(_MIN_GAIN, self.gain * _CUT)
            else:
                self.gain = min(1.0, self.gain + _RECOVER)

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
        # Ridge towards the prior, scaled to each feature's mean square (at least one unit).
        scale = torch.clamp(self._xx.diagonal() / n, min=1.0) * _PRIOR_WEIGHT
        theta = torch.linalg.solve(self._xx + torch.diag(scale), self._xy + scale * prior)
        fitted = {"fixed": max(0.0, theta[0].item())}
        for i, kind in enumerate(KINDS):
            fitted[kind] = max(theta[i + 1].item(), _FLOOR * prior[i + 1].item(), 1e-9)
        for i, kind in enumerate(TRAINING):
            fitted[kind + "_overhead"] = max(0.0, theta[1 + len(KINDS) + i].item())
        return fitted
