"""Proto messages ⇄ engine types. Structural checks live here (which of the prompt fields
is set, roles); value ranges are checked by SamplingParams.validate inside the engine."""

import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tandem import __version__
from tandem.server.adapters.merging import MergeSpec
from tandem.server.adapters.registry import AdapterInfo, AdapterTier
from tandem.server.engine.outputs import FinishReason, RequestOutput, TokenLogprob
from tandem.server.engine.sampling_params import SamplingParams
from tandem.server.errors import InvalidRequest
from tandem.v1 import adapters_pb2, generation_pb2

if TYPE_CHECKING:
    from tandem.server.engine.outputs import ModelInfo

DEFAULT_MAX_NEW_TOKENS = SamplingParams.max_new_tokens
DEFAULT_COMPRESS_DENSITY = 0.5  # the best of 0.3, 0.5 and 1 on the task adapters (README)
_MERGE_METHODS = {
    adapters_pb2.MERGE_METHOD_LINEAR: "linear",
    adapters_pb2.MERGE_METHOD_TIES: "ties",
    adapters_pb2.MERGE_METHOD_DARE_TIES: "dare_ties",
    adapters_pb2.MERGE_METHOD_BREADCRUMBS: "breadcrumbs",
}
# Generate's and GenerateStream's requests: the same fields under two names (buf STANDARD).
GenerationRequest = generation_pb2.GenerateRequest | generation_pb2.GenerateStreamRequest

_FINISH_REASONS = {
    FinishReason.LENGTH: generation_pb2.FINISH_REASON_LENGTH,
    FinishReason.EOS: generation_pb2.FINISH_REASON_EOS,
    FinishReason.STOP: generation_pb2.FINISH_REASON_STOP,
    FinishReason.ABORT: generation_pb2.FINISH_REASON_ABORT,
}
_TIERS = {
    AdapterTier.DISK: adapters_pb2.ADAPTER_TIER_DISK,
    AdapterTier.HOST: adapters_pb2.ADAPTER_TIER_HOST,
    AdapterTier.DEVICE: adapters_pb2.ADAPTER_TIER_DEVICE,
}


def _messages(messages) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def prompt_of(request: GenerationRequest) -> str | Sequence[int] | list[dict[str, str]]:
    """The engine prompt: text, chat messages, or the given token ids (as the message holds
    them: the engine checks their count before it copies them)."""
    given = [name for name in ("prompt", "messages", "prompt_token_ids") if getattr(request, name)]
    if len(given) != 1:
        raise InvalidRequest(
            f"set exactly one of prompt, messages and prompt_token_ids (got {', '.join(given) or 'none'})"
        )
    if request.messages:
        return _messages(request.messages)
    if request.prompt_token_ids:
        return request.prompt_token_ids
    return request.prompt


def mixture_of(request: GenerationRequest) -> list[tuple[str, float]] | None:
    """The request's per-request mixture as (adapter, weight) pairs; None when it names none.
    An unset weight is 1: read as 0 it served the base model, silently, in an adapter's slot."""
    return [(a.name, a.weight if a.HasField("weight") else 1.0) for a in request.adapters] or None


def text_of(request: generation_pb2.TokenizeRequest) -> str | list[dict[str, str]]:
    """What to tokenize: text or chat messages."""
    if bool(request.text) == bool(request.messages):
        raise InvalidRequest("set exactly one of text and messages")
    return _messages(request.messages) if request.messages else request.text


def sampling_params_of(request: GenerationRequest) -> SamplingParams:
    """Proto defaults mean "unset": temperature 0 is greedy, max_new_tokens 0 is the default.
    The float fields are float32: each is read as the decimal it was sent as."""
    return SamplingParams(
        max_new_tokens=request.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        default_max_new_tokens=not request.max_new_tokens,
        temperature=float32_as_sent(request.temperature),
        top_k=request.top_k,
        top_p=float32_as_sent(request.top_p) if request.HasField("top_p") else 1.0,
        repetition_penalty=float32_as_sent(request.repetition_penalty) if request.HasField("repetition_penalty") else 1.0,
        seed=request.seed if request.HasField("seed") else None,
        stop=list(request.stop),
        stop_token_ids=list(request.stop_token_ids),
        ignore_eos=request.ignore_eos,
        logprobs=request.logprobs if request.HasField("logprobs") else None,
        presence_penalty=float32_as_sent(request.presence_penalty),
        frequency_penalty=float32_as_sent(request.frequency_penalty),
        min_p=float32_as_sent(request.min_p),
        n=request.n or 1,
        prompt_logprobs=request.prompt_logprobs if request.HasField("prompt_logprobs") else None,
    )


def float32_as_sent(value: float) -> float:
    """The shortest decimal that is the same float32 as value: what a caller typed into a
    float32 field (1e-5 arrives as 9.99999975e-06, which fell below the greedy threshold that
    the OpenAI front, reading float64, compares 1e-5 against)."""
    for digits in range(1, 10):
        shortest = float(f"{value:.{digits}g}")
        if struct.unpack("f", struct.pack("f", shortest))[0] == value:
            return shortest
    return value


def _logprobs(logprobs: list[TokenLogprob] | None) -> list[generation_pb2.TokenLogprob]:
    return [
        generation_pb2.TokenLogprob(
            token_id=lp.token_id,
            logprob=lp.logprob,
            top=[generation_pb2.TopLogprob(token_id=t, logprob=p) for t, p in lp.top],
        )
        for lp in logprobs or []
    ]


def _usage(out: RequestOutput) -> generation_pb2.Usage:
    return generation_pb2.Usage(prompt_tokens=out.prompt_tokens, generated_tokens=out.generated_tokens)


def _finish_reason(out: RequestOutput) -> int:
    return _FINISH_REASONS[out.finish_reason] if out.finished and out.finish_reason else 0


def stream_response(out: RequestOutput, request: GenerationRequest) -> generation_pb2.GenerateStreamResponse:
    response = generation_pb2.GenerateStreamResponse(
        text=out.text,
        token_ids=out.token_ids,
        logprobs=_logprobs(out.logprobs),
        finish_reason=_finish_reason(out),
        usage=_usage(out),
        top_experts=(out.top_experts or []) if request.return_top_experts else [],
        index=out.index,
        prompt_logprobs=_logprobs(out.prompt_logprobs),
    )
    if request.HasField("seed"):
        response.seed = request.seed
    return response


def generate_response(
    outputs: list[RequestOutput], request: generation_pb2.GenerateRequest
) -> generation_pb2.GenerateResponse:
    """Joins the increments of one finished request into the unary answer: completion 0 in
    the top-level fields, and with n > 1 every completion in `completions`."""
    joined = [RequestOutput.joined([o for o in outputs if o.index == i]) for i in range(request.n or 1)]
    completions = [_completion(out) for out in joined]
    first = joined[0]
    response = generation_pb2.GenerateResponse(
        text=first.text,
        token_ids=first.token_ids,
        logprobs=_logprobs(first.logprobs),
        finish_reason=_finish_reason(first),
        usage=generation_pb2.Usage(prompt_tokens=first.prompt_tokens, generated_tokens=sum(o.generated_tokens for o in joined)),
        top_experts=(first.top_experts or []) if request.return_top_experts else [],
        completions=completions if len(completions) > 1 else [],
        prompt_logprobs=_logprobs(first.prompt_logprobs),
    )
    if request.HasField("seed"):
        response.seed = request.seed
    return response


def _completion(out: RequestOutput) -> generation_pb2.Completion:
    return generation_pb2.Completion(
        index=out.index,
        text=out.text,
        token_ids=out.token_ids,
        logprobs=_logprobs(out.logprobs),
        finish_reason=_finish_reason(out),
        generated_tokens=out.generated_tokens,
    )


def model_info(info: "ModelInfo", max_lora_rank: int) -> generation_pb2.GetModelInfoResponse:
    return generation_pb2.GetModelInfoResponse(
        model=info.name,
        architecture=info.architecture,
        dtype=info.dtype,
        device=info.device,
        max_model_len=info.max_model_len,
        vocab_size=info.vocab_size,
        eos_token_ids=info.eos_token_ids,
        max_lora_rank=max_lora_rank,
        version=__version__,
    )


def adapter_info(info: AdapterInfo, show_path: bool = True) -> adapters_pb2.AdapterInfo:
    """show_path False leaves `path` empty: where adapters live on the server is for admins."""
    return adapters_pb2.AdapterInfo(
        name=info.name,
        rank=info.rank,
        target_modules=info.target_modules,
        tier=_TIERS[info.tier],
        content_hash=info.content_hash,
        in_use=info.in_use,
        path=info.path if show_path else "",
        experts=info.experts,
        format=info.format,
        compression_ratio=info.compression_ratio,
    )


def merge_spec_of(request: adapters_pb2.MergeAdaptersRequest) -> MergeSpec:
    """Unset optional fields mean the method's defaults (MergeSpec checks the values)."""
    if request.method not in _MERGE_METHODS:
        raise InvalidRequest("set method to MERGE_METHOD_LINEAR, _TIES, _DARE_TIES or _BREADCRUMBS")
    return MergeSpec(
        adapters=tuple(request.adapters),
        weights=tuple(request.weights),
        method=_MERGE_METHODS[request.method],
        rank=request.rank,
        density=request.density if request.HasField("density") else None,
        gamma=request.gamma if request.HasField("gamma") else None,
        seed=request.seed,
    )


def merge_response(info: AdapterInfo, errors: dict[str, float]) -> adapters_pb2.MergeAdaptersResponse:
    return adapters_pb2.MergeAdaptersResponse(
        adapter=adapter_info(info),
        errors=[adapters_pb2.ProjectionError(module=m, relative_error=e) for m, e in errors.items()],
    )
