"""What the client returns: plain dataclasses, so callers never touch the generated stubs."""

from dataclasses import dataclass, field
from typing import TypedDict


class SamplingOptions(TypedDict, total=False):
    """Sampling keywords accepted by generate() and stream(); unset = the server default.

    temperature 0 (the default) is greedy; max_new_tokens 0 means 256. n > 1 asks for n
    completions of the prompt (Completion.choices; streamed chunks say their index).
    prompt_logprobs N: each prompt token's log-probability and the N most likely.
    """

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    seed: int
    stop: str | list[str]  # a str is one stop string, as in OpenAI's API
    stop_token_ids: list[int]
    ignore_eos: bool
    logprobs: int
    return_top_experts: bool
    presence_penalty: float
    frequency_penalty: float
    min_p: float
    n: int
    prompt_logprobs: int


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Choice:
    """One of the n completions of a request that asked for n > 1."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str
    generated_tokens: int


@dataclass
class Completion:
    """A whole answer. finish_reason is "length", "eos", "stop" or "abort". With n > 1 the
    fields are completion 0's, choices holds all n and generated_tokens counts them all."""

    text: str
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    seed: int | None
    request_id: str
    # With return_top_experts and a router: per generated token, the expert its gates weighted most.
    top_experts: list[str] = field(default_factory=list)
    choices: list[Choice] = field(default_factory=list)
    # With prompt_logprobs: one per prompt token after the first.
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class StreamChunk:
    """One streamed increment of completion `index`; finish_reason is None until that
    completion's last chunk."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    generated_tokens: int
    logprobs: list[TokenLogprob]
    top_experts: list[str] = field(default_factory=list)
    index: int = 0
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    seed: int | None = None  # the request's, when it set one


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
    """tier is "disk", "host" or "device"; path is relative to the server's adapters directory,
    empty in a listing for a caller without the admin role. experts: a router's experts, in
    gate order (empty for a plain adapter)."""

    name: str
    rank: int
    target_modules: list[str]
    tier: str
    content_hash: str
    in_use: int
    path: str
    experts: list[str] = field(default_factory=list)
    format: str = "peft"  # "peft", "compeft" (compressed) or "router"
    compression_ratio: float = 1.0  # float32 PEFT bytes / bytes in the server's host cache


@dataclass
class MergeResult:
    """A merged adapter, and per projection (PEFT module path) the relative error of its
    rank-r factors: ||dW - B A||_F / ||dW||_F."""

    adapter: AdapterInfo
    errors: dict[str, float]


class RouterTraining(TypedDict, total=False):
    """A gate-training job: the router's experts (adapter names, in gate order), top_k (2),
    temperature (1) and the routing loss's weight (1)."""

    experts: list[str]
    top_k: int
    temperature: float
    routing_loss_weight: float


class LoraOptions(TypedDict, total=False):
    """PEFT's LoRA settings for a fine-tuning job (peft.LoraConfig names); unset = the server's
    defaults, or the base adapter's settings when training continues one.

    r 16; lora_alpha 2 * r; target_modules: any of q_proj, k_proj, v_proj, o_proj, gate_proj,
    up_proj, down_proj (all seven by default; a str is read as comma-separated names).
    """

    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: list[str] | str
    lora_dropout: float


class Hyperparameters(TypedDict, total=False):
    """How a fine-tuning job trains (OpenAI's names where it has them); unset = the server default.

    learning_rate 2e-4 (AdamW); lr_scheduler "linear", "cosine" or "constant"; n_epochs 1;
    max_steps 0 = n_epochs over the data; tokens_per_step 4096; max_seq_length 0 = the
    context limit; max_grad_norm 1.0 (0 = off); eval_fraction in [0, 0.5];
    checkpoint_interval 50 steps.
    """

    learning_rate: float
    lr_scheduler: str
    warmup_steps: int
    n_epochs: int
    max_steps: int
    tokens_per_step: int
    max_seq_length: int
    weight_decay: float
    max_grad_norm: float
    eval_fraction: float
    checkpoint_interval: int
    seed: int


@dataclass
class FinetuneJobError:
    """Why a job failed. code: training_diverged, publish_failed, validation_failed or
    internal_error; param: the request field it concerns, or ""."""

    code: str
    message: str
    param: str


FINETUNE_TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass
class FinetuneJob:
    """A snapshot of one fine-tuning job.

    status: "validating_files", "queued", "running", then "succeeded", "failed" or
    "cancelled". Times are Unix seconds, 0 = not yet (estimated_finish: 0 = unknown or
    ended). train_loss / eval_loss: mean token loss of the last step / the last eval point,
    None before there is one. content_hash: the adapter version a succeeded job published.
    lora and hyperparameters: the settings the job actually uses, defaults filled in.
    mode: "coserve" or "timeslice"; finetune_share: a co-served job's share of each
    iteration's token budget now. step_iteration_tokens: what the server's engine ran over
    the job's last step, by kind: "decode" and "prefill" (inference served beside it),
    "train_forward" and "train_head" (tokens), "train_backward" (token-layers / layers).
    """

    id: str
    adapter: str
    base_adapter: str
    status: str
    created_at: int
    started_at: int
    finished_at: int
    estimated_finish: int
    step: int
    total_steps: int
    num_examples: int
    num_eval_examples: int
    trained_tokens: int
    train_loss: float | None
    eval_loss: float | None
    tokens_per_second: float
    error: FinetuneJobError | None
    content_hash: str
    lora: dict
    hyperparameters: dict
    mode: str = ""
    finetune_share: float = 0.0
    step_iteration_tokens: dict[str, float] = field(default_factory=dict)

    @property
    def ended(self) -> bool:
        return self.status in FINETUNE_TERMINAL
