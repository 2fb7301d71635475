"""What the engine streams back for each request."""

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import Enum

from tandem.server.engine.token_histogram import TokenHistogram


class FinishReason(str, Enum):
    LENGTH = "length"  # max_new_tokens or the context limit reached
    EOS = "eos"  # the model's end-of-sequence token
    STOP = "stop"  # a stop string or stop token id
    ABORT = "abort"  # cancelled by the caller or the server


@dataclass
class TokenLogprob:
    """Log-probability of one generated token and, if asked, the top alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """One increment of a request's stream.

    text and token_ids hold only what is new since the previous output; text may lag the
    tokens while a multi-byte character or a possible stop string is incomplete.
    index: which of the request's n completions this is. prompt_logprobs: in the first
    output of completion 0 when asked for, one per prompt token after the first.
    """

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None
    prompt_tokens: int
    generated_tokens: int
    logprobs: list[TokenLogprob] | None = None
    # A router's request: per new token, the name of the expert its gates weighted most.
    top_experts: list[str] | None = None
    # time.monotonic() when the engine first scheduled the request (None: still queued).
    first_scheduled_at: float | None = None
    index: int = 0
    prompt_logprobs: list[TokenLogprob] | None = None

    def followed_by(self, later: "RequestOutput") -> "RequestOutput":
        """This increment and a later one of the same completion as one increment: what a
        reader that fell behind receives."""
        return RequestOutput.joined([self, later])

    @staticmethod
    def joined(increments: Sequence["RequestOutput"]) -> "RequestOutput":
        """Consecutive increments of one completion as one, in one pass (joining them pair by
        pair copied the growing lists at every step: 0.2 s for 8000 tokens with logprobs)."""
        def first_of(name: str) -> object:
            return next((value for o in increments if (value := getattr(o, name)) is not None), None)

        return replace(
            increments[-1],
            text="".join(o.text for o in increments),
            token_ids=[t for o in increments for t in o.token_ids],
            logprobs=_joined([o.logprobs for o in increments]),
            top_experts=_joined([o.top_experts for o in increments]),
            first_scheduled_at=first_of("first_scheduled_at"),
            prompt_logprobs=first_of("prompt_logprobs"),
        )


def _joined(parts: list[list | None]) -> list | None:
    return None if all(p is None for p in parts) else [x for p in parts if p for x in p]


@dataclass
class ModelInfo:
    """What a client may ask about the served model."""

    name: str
    architecture: str
    dtype: str
    device: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]


@dataclass
class EngineStats:
    """A snapshot of the engine's load, read by metrics and tests (free blocks find leaks)."""

    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    kv_usage: float
    num_preemptions: int
    iteration_tokens: dict[str, float] = field(default_factory=dict)
    finetune_share: float = 0.0
    # Bytes the running co-served micro-batch keeps for its backward (0 when none runs).
    finetune_activation_bytes: int = 0
    # (router, expert) -> routed tokens whose top expert it was, since start.
    router_expert_tokens: dict[tuple[str, str], int] = field(default_factory=dict)
    # Inference tokens (decode + prefill) per iteration since start.
    iteration_token_histogram: TokenHistogram | None = None
    # The KV cache's settings under vLLM's cache_config_info label names.
    cache_config: dict[str, str] = field(default_factory=dict)
