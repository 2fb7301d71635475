"""How much work co-served fine-tuning may add to the next iteration: the latency guard.

With no inference running, fine-tuning takes the whole token budget. Without a target it
takes a fixed half of it. With an inter-token latency target (`--coserve-itl-p99`), every
iteration that decodes is one inter-token interval for its requests, so fine-tuning fills
each iteration up to the target and no further: a cost model learned from measured
iteration times (seconds = fixed + per_token x work, least squares over recent
iterations) says how much training work fits beside the iteration's inference tokens.
A gain in (0, 1] absorbs the model's error: an iteration over the target cuts it
(multiplicatively), one under it lets it recover (additively).

Work is counted in forward-token equivalents: a token of forward pass is 1, a token-layer
of backward slice (recompute, dX, dW) BACKWARD_COST / num_layers.
"""

FIXED_SHARE = 0.5
# Until the cost model has seen this many iterations, co-served work stays small.
_WARMUP = 8
_COLD_SHARE = 0.1
# Recent iterations weigh in with this factor (an exponential moving window of ~50).
_DECAY = 0.98
_CUT, _RECOVER, _MIN_GAIN = 0.7, 0.02, 0.05


class FinetuneShare:
    def __init__(self, itl_p99_target: float | None, budget: int):
        self.target = itl_p99_target
        self.budget = budget
        self.gain = 1.0
        self.share = FIXED_SHARE if itl_p99_target is None else _COLD_SHARE
        self._seen = 0
        # Decayed sums for the least-squares fit of seconds against work.
        self._n = self._x = self._y = self._xx = self._xy = 0.0

    def allowance(self, inference_tokens: int, inference_running: bool) -> int:
        """Forward-token equivalents of training work the next iteration may carry."""
        room = self.budget - inference_tokens
        if not inference_running:
            self.share = 1.0
        elif self.target is None:
            self.share = FIXED_SHARE
        elif self._seen < _WARMUP:
            self.share = _COLD_SHARE
        else:
            fixed, per_token = self._fit()
            fits = (self.target - fixed) / per_token - inference_tokens
            self.share = max(0.0, self.gain * fits / self.budget)
        return max(0, min(room, int(self.share * self.budget)))

    def observe(self, seconds: float, work: float, decoded: bool) -> None:
        """Learn from one finished iteration: its time, its work (forward-token equivalents,
        inference and training), whether it decoded (only those are inter-token intervals)."""
        if self.target is None:
            return
        for name, value in (("_n", 1.0), ("_x", work), ("_y", seconds), ("_xx", work * work), ("_xy", work * seconds)):
            setattr(self, name, getattr(self, name) * _DECAY + value)
        self._seen += 1
        if decoded:
            if seconds > self.target:
                self.gain = max(_MIN_GAIN, self.gain * _CUT)
            else:
                self.gain = min(1.0, self.gain + _RECOVER)

    def _fit(self) -> tuple[float, float]:
        """(fixed seconds, seconds per token) of the recent iterations; a proportional model
        when the work has not varied enough to tell the two apart."""
        mean_x, mean_y = self._x / self._n, self._y / self._n
        var = self._xx / self._n - mean_x * mean_x
        per_token = (self._xy / self._n - mean_x * mean_y) / var if var > 1e-9 else 0.0
        if per_token <= 0:
            return 0.0, mean_y / max(mean_x, 1.0)
        return max(0.0, mean_y - per_token * mean_x), per_token
