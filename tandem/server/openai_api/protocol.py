"""The request bodies of OpenAI's Completions and Chat Completions APIs, as far as Tandem
serves them. Fields Tandem does not support are refused by name (400), never ignored in
silence, and so are vLLM's own fields that would change the output (VLLM_UNSERVED, kept in
model_extra); other unknown fields are ignored, as OpenAI's SDKs send some.

Tandem's own sampling options ride along as extra fields, named as in vLLM: top_k, min_p,
repetition_penalty, ignore_eos, stop_token_ids, prompt_logprobs.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


# vLLM's request fields that change what is generated, with the value that changes nothing
# (None: also null, an empty list or object): clients written for vLLM send them through
# the SDK's extra_body, and a 200 that ignored them (a guided_json schema, min_tokens) gave
# output that broke the caller's contract without a word.
VLLM_UNSERVED: dict[str, object] = {
    "guided_json": None, "guided_regex": None, "guided_choice": None, "guided_grammar": None,
    "structured_outputs": None, "min_tokens": 0, "include_stop_str_in_output": False,
    "skip_special_tokens": True, "spaces_between_special_tokens": True, "chat_template": None,
    "chat_template_kwargs": None, "add_generation_prompt": True, "continue_final_message": False,
    "truncate_prompt_tokens": None, "allowed_token_ids": None, "bad_words": None, "use_beam_search": False,
    "length_penalty": 1.0, "logits_processors": None, "documents": None,
    "return_tokens_as_token_ids": False,  # tokens named "token_id:N": a format not served
    "reasoning_effort": None,  # any value: the model has no reasoning mode
}


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingFields(BaseModel):
    """What both APIs share. Defaults are OpenAI's (temperature 1: sampling)."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: object) -> object:
        """OpenAI's nullable fields (n, stream, echo, chat logprobs...): null means the default,
        as in OpenAI's and vLLM's servers (it was a 400 here)."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items() if not (v is None and k in fields and fields[k].default is not None)}

    model: str = ""
    n: int = 1
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None
    response_format: dict | None = None


class CompletionRequest(SamplingFields):
    """POST /v1/completions. prompt: one text or list of token ids, or a list of them."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool = True  # vLLM's; the default is what the prompt's tokenization does


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None  # passed to the chat template, as vLLM passes it
    tool_calls: list[dict] | None = None


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions. max_completion_tokens is the newer name of max_tokens."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    functions: list[dict] | None = None
    function_call: str | dict | None = None
    modalities: list[str] | None = None
    audio: dict | None = None
    echo: bool = False  # vLLM's: the reply prefixed with the last message
    add_special_tokens: bool = False  # vLLM's; the template writes the special tokens
