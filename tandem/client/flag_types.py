"""Types for the client commands' numeric flags: argparse refuses a value out of range (exit
2, saying what it takes) before anything connects or is sent. float() alone takes nan, inf
and negatives: a NaN --wait polled forever, a burstiness of inf sent requests without end,
a timeout of 0 failed every call at once as DEADLINE_EXCEEDED."""

import argparse
import math
from collections.abc import Callable


def ranged(kind: type, low: float, *, strict: bool = False, high: float | None = None, infinite: bool = False) -> Callable[[str], float]:
    """A type for `kind` (int or float) values >= low (> low with strict), < high when given;
    inf only with `infinite`; never NaN."""
    bound = f"> {low:g}" if strict else f">= {low:g}"
    what = f"{'an integer' if kind is int else 'a number'} {bound}" + (f" and < {high:g}" if high is not None else "")
    what += " (inf: no limit)" if infinite else ""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if math.isnan(value) or (math.isinf(value) and not infinite) or value < low or (strict and value == low) or (high is not None and value >= high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what
    return parse


positive_seconds = ranged(float, 0, strict=True, infinite=True)
seconds = ranged(float, 0, infinite=True)
positive_int = ranged(int, 1)
count = ranged(int, 0)
# A proto's unsigned fields: protobuf's own refusal names no flag ("Value out of range: -1").
uint32 = ranged(int, 0, high=2**32)
uint64 = ranged(int, 0, high=2**64)
# gRPC's message size limit: a signed 32-bit length.
message_bytes = ranged(int, 1, high=2**31)
