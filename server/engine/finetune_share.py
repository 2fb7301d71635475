"""How much of an iteration co-served fine-tuning may take: the latency guard.

With no inference running, fine-tuning takes the whole token budget. Otherwise it takes a
share of it, steered by the inter-token latency target (`--coserve-itl-p99`): every
iteration that decodes is one inter-token interval for its requests, so an iteration
longer than the target cuts the share (multiplicatively), and one well under it grows the
share (additively) — AIMD, as TCP steers a window. Without a target the share is fixed.
"""

# An iteration this far under the target leaves room to grow into.
_ROOM = 0.6
_DECREASE = 0.7
_INCREASE = 0.02
MIN_SHARE = 0.01
FIXED_SHARE = 0.5


class FinetuneShare:
    def __init__(self, itl_p99_target: float | None):
        self.target = itl_p99_target
        self.share = FIXED_SHARE if itl_p99_target is None else 0.25

    def current(self, inference_running: bool) -> float:
        """The share of the next iteration's token budget fine-tuning may use."""
        return self.share if inference_running else 1.0

    def observe(self, seconds: float, decoded: bool) -> None:
        """Steer by one finished iteration: how long it took, and whether it decoded."""
        if self.target is None or not decoded:
            return
        if seconds > self.target:
            self.share = max(MIN_SHARE, self.share * _DECREASE)
        elif seconds < _ROOM * self.target:
            self.share = min(1.0, self.share + _INCREASE)
