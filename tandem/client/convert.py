"""Client-side proto ⇄ dataclass conversion, shared by the sync and asyncio clients, and the
planned calls (`Call`) that both clients execute."""

import json
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from tandem.client.types import (
    AdapterInfo,
    Choice,
    Completion,
    FinetuneJob,
    FinetuneJobError,
    Hyperparameters,
    LoraOptions,
    MergeResult,
    ModelInfo,
    RouterTraining,
    SamplingOptions,
    StreamChunk,
    TokenLogprob,
)
from tandem.v1 import adapters_pb2, finetuning_pb2, finetuning_pb2_grpc, generation_pb2

T = TypeVar("T")

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


GenerationRequest = generation_pb2.GenerateRequest | generation_pb2.GenerateStreamRequest


def generate_request(
    prompt: str | None,
    messages: Messages | None,
    prompt_token_ids: Sequence[int] | None,
    adapter: str | Mapping[str, float],
    options: SamplingOptions,
    kind: type[GenerationRequest] = generation_pb2.GenerateRequest,
) -> GenerationRequest:
    """Generate's request, or GenerateStream's (kind): the two messages have the same fields.
    adapter: a name, or name -> weight for a per-request mixture."""
    if isinstance(adapter, Mapping) and not adapter:
        raise ValueError('an adapter mixture needs at least one adapter (adapter="" is the base model)')
    mixture = [generation_pb2.AdapterWeight(name=n, weight=w) for n, w in adapter.items()] if isinstance(adapter, Mapping) else []
    if isinstance(options.get("stop"), str):
        # One stop string, as OpenAI's API takes it: a str would otherwise be read as a list
        # of one-character stops (stop="END" stopped at the first E, N or D).
        options = {**options, "stop": [options["stop"]]}
    return kind(
        prompt=prompt or "",
        messages=_proto_messages(messages),
        prompt_token_ids=list(prompt_token_ids or ()),
        adapter="" if mixture else str(adapter),
        adapters=mixture,
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
        top_experts=list(response.top_experts),
        choices=[
            Choice(c.index, c.text, list(c.token_ids), _logprobs(c.logprobs), _FINISH.get(c.finish_reason, "unspecified"), c.generated_tokens)
            for c in response.completions
        ],
        prompt_logprobs=_logprobs(response.prompt_logprobs),
    )


def stream_chunk(response: generation_pb2.GenerateStreamResponse) -> StreamChunk:
    return StreamChunk(
        text=response.text,
        token_ids=list(response.token_ids),
        finish_reason=_FINISH.get(response.finish_reason),
        prompt_tokens=response.usage.prompt_tokens,
        generated_tokens=response.usage.generated_tokens,
        logprobs=_logprobs(response.logprobs),
        top_experts=list(response.top_experts),
        index=response.index,
        prompt_logprobs=_logprobs(response.prompt_logprobs),
        seed=response.seed if response.HasField("seed") else None,
    )


def model_info(info: generation_pb2.GetModelInfoResponse) -> ModelInfo:
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
        experts=list(info.experts),
        format=info.format,
        compression_ratio=_float32(info.compression_ratio),
    )


MERGE_METHODS = {
    "linear": adapters_pb2.MERGE_METHOD_LINEAR,
    "ties": adapters_pb2.MERGE_METHOD_TIES,
    "dare_ties": adapters_pb2.MERGE_METHOD_DARE_TIES,
    "breadcrumbs": adapters_pb2.MERGE_METHOD_BREADCRUMBS,
}


def merge_request(name: str, adapters: Mapping[str, float] | Sequence[str], method: str, rank: int, **params) -> adapters_pb2.MergeAdaptersRequest:
    """adapters: names (weight 1 each) or name -> weight; params: density, gamma, seed (unset = the server's defaults)."""
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}: choose one of {', '.join(sorted(MERGE_METHODS))}")
    weights = list(adapters.values()) if isinstance(adapters, Mapping) else []
    return adapters_pb2.MergeAdaptersRequest(
        name=name, adapters=list(adapters), weights=weights, method=MERGE_METHODS[method], rank=rank,
        **{k: v for k, v in params.items() if v is not None},
    )


def merge_result(response: adapters_pb2.MergeAdaptersResponse) -> MergeResult:
    return MergeResult(adapter_info(response.adapter), {e.module: _float32(e.relative_error) for e in response.errors})


@dataclass(frozen=True)
class Call(Generic[T]):
    """One RPC planned without I/O, so that the blocking and the asyncio client share all of a
    method but the waiting: the stub class of its service, the method's name on the stub, the
    request, and how each response becomes what the caller gets."""

    stub: type
    method: str
    request: Message
    result: Callable[[Any], T]
    # False for a call that creates or changes something: a retry could do it twice.
    idempotent: bool = True


TrainingData = str | Sequence[Mapping[str, Any]]


def _jsonl(data: TrainingData) -> str:
    """Lines given as dicts become JSONL; a str is sent as it is."""
    if isinstance(data, str):
        return data
    return "\n".join(json.dumps(line, ensure_ascii=False) for line in data) + "\n"


def _lora_config(lora: LoraOptions) -> finetuning_pb2.LoraConfig:
    fields: dict[str, Any] = dict(lora)
    if isinstance(fields.get("target_modules"), str):
        # A str would otherwise be read as a list of one-letter module names.
        fields["target_modules"] = [m.strip() for m in fields["target_modules"].split(",") if m.strip()]
    return finetuning_pb2.LoraConfig(**fields)


def create_finetune_job(
    adapter: str,
    training_file: str | None,
    training_data: TrainingData | None,
    base_adapter: str,
    lora: LoraOptions | None,
    hyperparameters: Hyperparameters | None,
    router: RouterTraining | None = None,
) -> Call[FinetuneJob]:
    """Raises ValueError for both training_file and training_data (proto keeps only one of
    them) or an unknown lora / hyperparameters key; the server judges everything else."""
    if training_file is not None and training_data is not None:
        raise ValueError("give exactly one of training_file and training_data")
    request = finetuning_pb2.CreateJobRequest(
        adapter=adapter,
        base_adapter=base_adapter,
        training_file=training_file,
        training_data=None if training_data is None else _jsonl(training_data),
        # An empty dict means the defaults, as None does (a set lora must agree with a base adapter).
        lora=_lora_config(lora) if lora else None,
        hyperparameters=finetuning_pb2.Hyperparameters(**hyperparameters) if hyperparameters else None,
        router=finetuning_pb2.RouterTraining(**router) if router else None,
    )
    return Call(finetuning_pb2_grpc.FineTuningServiceStub, "CreateJob", request, _job_of, idempotent=False)


def get_finetune_job(job_id: str) -> Call[FinetuneJob]:
    return Call(finetuning_pb2_grpc.FineTuningServiceStub, "GetJob", finetuning_pb2.GetJobRequest(id=job_id), _job_of)


# Jobs per ListJobs reply (~1 KB each): every job in one reply passed the 4 MB message limit
# at ~10,000 jobs.
LIST_PAGE_SIZE = 500


def list_finetune_jobs(page_token: str) -> Call[tuple[list[FinetuneJob], str]]:
    """One page of jobs, newest first, and the next page's token ("" after the last)."""
    return Call(
        finetuning_pb2_grpc.FineTuningServiceStub,
        "ListJobs",
        finetuning_pb2.ListJobsRequest(page_size=LIST_PAGE_SIZE, page_token=page_token),
        lambda response: ([finetune_job(job) for job in response.jobs], response.next_page_token),
    )


def cancel_finetune_job(job_id: str) -> Call[FinetuneJob]:
    return Call(finetuning_pb2_grpc.FineTuningServiceStub, "CancelJob", finetuning_pb2.CancelJobRequest(id=job_id), _job_of, idempotent=False)


def watch_finetune_job(job_id: str) -> Call[FinetuneJob]:
    """A server stream: the job now, then after every change until it ends."""
    return Call(
        finetuning_pb2_grpc.FineTuningServiceStub,
        "WatchJob",
        finetuning_pb2.WatchJobRequest(id=job_id),
        _job_of,
    )


def _float32(value: float) -> float:
    """The shortest decimal that is the same float32 as value: a float32 field's 0.1 arrives
    as 0.10000000149011612, which is not what was sent or what the server meant."""
    for digits in range(1, 10):
        shortest = float(f"{value:.{digits}g}")
        if struct.unpack("f", struct.pack("f", shortest))[0] == value:
            return shortest
    return value


def _value(message: Message, field) -> Any:
    if field.is_repeated:
        values = list(getattr(message, field.name))
        return [_float32(v) for v in values] if field.type == FieldDescriptor.TYPE_FLOAT else values
    if field.has_presence and not message.HasField(field.name):
        return None
    value = getattr(message, field.name)
    return _float32(value) if field.type == FieldDescriptor.TYPE_FLOAT else value


def _fields(message: Message) -> dict[str, Any]:
    """A settings message as a plain dict of every field by its proto name (unset optional: None)."""
    return {field.name: _value(message, field) for field in message.DESCRIPTOR.fields}


def _status(status: int) -> str:
    return finetuning_pb2.JobStatus.Name(status).removeprefix("JOB_STATUS_").lower()


def _job_of(response: finetuning_pb2.CreateJobResponse | finetuning_pb2.GetJobResponse | finetuning_pb2.CancelJobResponse | finetuning_pb2.WatchJobResponse) -> FinetuneJob:
    """Every job RPC answers with its own message wrapping one Job."""
    return finetune_job(response.job)


def finetune_job(job: finetuning_pb2.Job) -> FinetuneJob:
    error = job.error
    return FinetuneJob(
        id=job.id,
        adapter=job.adapter,
        base_adapter=job.base_adapter,
        status=_status(job.status),
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        estimated_finish=job.estimated_finish,
        step=job.step,
        total_steps=job.total_steps,
        num_examples=job.num_examples,
        num_eval_examples=job.num_eval_examples,
        trained_tokens=job.trained_tokens,
        train_loss=_float32(job.train_loss) if job.HasField("train_loss") else None,
        eval_loss=_float32(job.eval_loss) if job.HasField("eval_loss") else None,
        tokens_per_second=_float32(job.tokens_per_second),
        error=FinetuneJobError(error.code, error.message, error.param) if job.HasField("error") else None,
        content_hash=job.content_hash,
        lora=_fields(job.lora),
        hyperparameters=_fields(job.hyperparameters),
        mode=job.mode,
        finetune_share=_float32(job.finetune_share),
        step_iteration_tokens=dict(job.step_iteration_tokens),
    )
