"""Per-request mixtures: a request names several adapters with fixed weights and is served
y += sum_i w_i * B_i(A_i x) at every linear, exactly, with no merged adapter: each member
sits in its own slot (all pinned while the request runs) and every token of the request is
k weighted (slot, weight) pairs in the step's LoRAPairs, beside plain and routed tokens.
"""

import hashlib
import math
from dataclasses import dataclass

from tandem.server.adapters.peft_format import LoRAAdapter
from tandem.server.errors import InvalidRequest, excerpt

# More members than this is a merge's job (AdaptersService.MergeAdapters), not a request's.
MAX_MEMBERS = 8


@dataclass(frozen=True)
class Mixture:
    """The exact versions of a mixture's adapters (in request order) and their weights."""

    adapters: tuple[LoRAAdapter, ...]
    weights: tuple[float, ...]

    @property
    def name(self) -> str:
        """How logs and the call record show it, e.g. "sql*0.7+json*0.3"."""
        return "+".join(f"{a.name}*{w:g}" for a, w in zip(self.adapters, self.weights))

    @property
    def content_hash(self) -> str:
        """One identity per member versions and weights (the scheduler keys prefetch by it)."""
        h = hashlib.sha256()
        for adapter, weight in zip(self.adapters, self.weights):
            h.update(f"{adapter.content_hash}:{weight!r};".encode())
        return h.hexdigest()


def check_members(members: list[tuple[str, float]], num_slots: int) -> None:
    """Refuse a mixture that cannot be served, before any adapter is read (InvalidRequest)."""
    if not members:
        raise InvalidRequest("a mixture needs at least one adapter")
    limit = min(MAX_MEMBERS, num_slots)
    if len(members) > limit:
        raise InvalidRequest(
            f"a mixture names {len(members)} adapters; at most {limit} can be mixed per request on this server "
            "(merge them into one adapter with MergeAdapters)"
        )
    names = [name for name, _ in members]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InvalidRequest(f"a mixture names adapter {excerpt(twice[0])} twice: give each adapter once, with its total weight")
    for name, weight in members:
        if not math.isfinite(weight):
            raise InvalidRequest(f"mixture weight of adapter {excerpt(name)} must be a finite number, got {weight}")
