"""What the client returns: plain dataclasses, so callers never touch the generated stubs."""

from dataclasses import dataclass, field
from typing import TypedDict


class SamplingOptions(TypedDict, total=False):
    """Sampling keywords accepted by generate() and stream(); unset = the server default.

    temperature 0 (the default) is greedy; max_new_tokens 0 means 256.
    """

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    seed: int
    stop: list[str]
    stop_token_ids: list[int]
    ignore_eos: bool
    logprobs: int


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Completion:
    """A whole answer. finish_reason is "length", "eos", "stop" or "abort"."""

    text: str
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    seed: int | None
    request_id: str


@dataclass
class StreamChunk:
    """One streamed increment; finish_reason is None until the last chunk."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    generated_tokens: int
    logprobs: list[TokenLogprob]


@dataclass
class ModelInfo:
    model: str
    architecture: str
    dtype: str
    device: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    max_lora_rank: int
    version: str


@dataclass
class AdapterInfo:
    """tier is "disk", "host" or "device"."""

    name: str
    rank: int
    target_modules: list[str]
    tier: str
    content_hash: str
    in_use: int
    path: str
