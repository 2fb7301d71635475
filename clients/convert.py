"""Client-side proto ⇄ dataclass conversion, shared by the sync and asyncio clients."""

from collections.abc import Sequence

from clients.types import AdapterInfo, Completion, ModelInfo, SamplingOptions, StreamChunk, TokenLogprob
from tandem.v1 import adapters_pb2, generation_pb2

_FINISH = {
    generation_pb2.FINISH_REASON_LENGTH: "length",
    generation_pb2.FINISH_REASON_EOS: "eos",
    generation_pb2.FINISH_REASON_STOP: "stop",
    generation_pb2.FINISH_REASON_ABORT: "abort",
}
_TIERS = {
    adapters_pb2.ADAPTER_TIER_DISK: "disk",
    adapters_pb2.ADAPTER_TIER_HOST: "host",
    adapters_pb2.ADAPTER_TIER_DEVICE: "device",
}

Messages = Sequence[dict[str, str]]


def _proto_messages(messages: Messages | None) -> list[generation_pb2.Message]:
    return [generation_pb2.Message(role=m["role"], content=m["content"]) for m in messages or ()]


def generate_request(
    prompt: str | None, messages: Messages | None, prompt_token_ids: Sequence[int] | None, adapter: str, options: SamplingOptions
) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        prompt=prompt or "",
        messages=_proto_messages(messages),
        prompt_token_ids=list(prompt_token_ids or ()),
        adapter=adapter,
        **options,
    )


def tokenize_request(text: str | None, messages: Messages | None) -> generation_pb2.TokenizeRequest:
    return generation_pb2.TokenizeRequest(text=text or "", messages=_proto_messages(messages))


def _logprobs(items) -> list[TokenLogprob]:
    return [TokenLogprob(lp.token_id, lp.logprob, [(t.token_id, t.logprob) for t in lp.top]) for lp in items]


def completion(response: generation_pb2.GenerateResponse, request_id: str) -> Completion:
    return Completion(
        text=response.text,
        finish_reason=_FINISH.get(response.finish_reason, "unspecified"),
        prompt_tokens=response.usage.prompt_tokens,
        generated_tokens=response.usage.generated_tokens,
        token_ids=list(response.token_ids),
        logprobs=_logprobs(response.logprobs),
        seed=response.seed if response.HasField("seed") else None,
        request_id=request_id,
    )


def stream_chunk(response: generation_pb2.GenerateStreamResponse) -> StreamChunk:
    return StreamChunk(
        text=response.text,
        token_ids=list(response.token_ids),
        finish_reason=_FINISH.get(response.finish_reason),
        prompt_tokens=response.usage.prompt_tokens,
        generated_tokens=response.usage.generated_tokens,
        logprobs=_logprobs(response.logprobs),
    )


def model_info(info: generation_pb2.ModelInfo) -> ModelInfo:
    return ModelInfo(
        model=info.model,
        architecture=info.architecture,
        dtype=info.dtype,
        device=info.device,
        max_model_len=info.max_model_len,
        vocab_size=info.vocab_size,
        eos_token_ids=list(info.eos_token_ids),
        max_lora_rank=info.max_lora_rank,
        version=info.version,
    )


def adapter_info(info: adapters_pb2.AdapterInfo) -> AdapterInfo:
    return AdapterInfo(
        name=info.name,
        rank=info.rank,
        target_modules=list(info.target_modules),
        tier=_TIERS.get(info.tier, "unspecified"),
        content_hash=info.content_hash,
        in_use=info.in_use,
        path=info.path,
    )
