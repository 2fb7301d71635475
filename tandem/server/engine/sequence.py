"""A request's state while the engine works on it."""

from dataclasses import dataclass, field
from enum import Enum

import torch

from tandem.server.adapters.mixture import Mixture
from tandem.server.adapters.peft_format import LoRAAdapter
from tandem.server.adapters.router_format import Router
from tandem.server.engine.outputs import FinishReason, TokenLogprob
from tandem.server.engine.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request's tokens and progress.

    token_ids holds the prompt followed by every generated token. num_computed counts the
    tokens whose keys/values are in the KV cache; when it reaches len(token_ids) the next
    token is sampled. Preemption frees the blocks and sets num_computed to 0: the whole
    sequence is recomputed later, and sampling resumes where it stopped.
    adapter is the exact adapter version the request started with; slot is its device
    slot while the sequence runs (pinned), None while it waits. A router's slot is the
    tuple of its experts' slots, in gate order, and top_experts holds, per generated token,
    the index of the expert its gates weighted most. A per-request mixture's slot is the
    tuple of its adapters' slots, in the request's order.
    A request for n completions is n sequences of one group (group_id, the request's id),
    completion `index` each. fork_of is the sibling whose KV blocks it copies instead of
    computing the prompt again: the group's first sequence, which computes the prompt, or,
    once that one finished, a sibling still running (Scheduler.finish hands it over).
    prompt_logprobs[p] is the log-probability of prompt token p + 1 (when asked for).
    """

    request_id: str
    prompt_len: int
    token_ids: list[int]
    params: SamplingParams
    arrival: int
    generator: torch.Generator | None = None
    adapter: LoRAAdapter | Router | Mixture | None = None
    slot: int | tuple[int, ...] | None = None
    group_id: str = ""
    index: int = 0
    fork_of: "Sequence | None" = None
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    first_scheduled_at: float | None = None  # time.monotonic() of its first scheduled chunk
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    top_experts: list[int] = field(default_factory=list)
    # Tokens of a router's sequence counted in router_expert_tokens: those a preemption makes
    # it compute again are not counted again.
    routed_counted: int = 0
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def group(self) -> str:
        return self.group_id or self.request_id

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]
