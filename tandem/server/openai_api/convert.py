"""OpenAI request bodies -> what the engine takes: the prompt, SamplingParams, the adapter.

Value ranges are checked where the gRPC front's are (SamplingParams.validate, chat checks in
AsyncEngine.encode); here only what is OpenAI's own: which fields Tandem does not serve,
the `model` name, OpenAI's defaults, and text that JSON can carry
and protobuf cannot (half a surrogate pair).
"""

from tandem.server.engine.sampling_params import MAX_LOGPROBS, SamplingParams
from tandem.server.adapters.registry import check_adapter_name
from tandem.server.errors import InvalidRequest, NotFound, excerpt
from tandem.server.openai_api.protocol import VLLM_UNSERVED, ChatCompletionRequest, CompletionRequest, SamplingFields

# OpenAI's default for /v1/completions; chat has none: it runs to the context's end, as
# OpenAI's and vLLM's do (the SDK and LangChain send no max_tokens by default).
DEFAULT_COMPLETION_TOKENS = 16
UNTIL_THE_CONTEXT_ENDS = 2**31 - 1
# OpenAI's newer name for the system role.
_ROLE_ALIASES = {"developer": "system"}


class FieldError(InvalidRequest):
    """A request refused for one field of its body, which OpenAI's error names as `param`
    (as the caller sent it: "temperature", "messages[1].tool_calls")."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def adapter_of(model: str, base_model: str) -> str:
    """The adapter a request's `model` names: "" (the base model) for the base model's name
    or an empty one, else the adapter of that name. A name no adapter can have (a Hugging
    Face id such as "org/model") is a model this server does not serve: 404, which clients
    fall back on, not 400 about adapter names."""
    _check_unicode(model, "model")
    if model in ("", base_model):
        return ""
    try:
        check_adapter_name(model)
    except InvalidRequest:
        raise NotFound(f"no model or adapter {excerpt(model)} is served here: GET /v1/models lists them") from None
    return model


def completion_prompts(body: CompletionRequest) -> list[str | list[int]]:
    """The prompts: one text or list of token ids, or a list of them (a batch, which
    LangChain's legacy LLM and vLLM's clients send)."""
    prompt = body.prompt
    batch = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], (str, list))
    prompts = list(prompt) if batch else [prompt]
    for i, each in enumerate(prompts):
        field = f"prompt[{i}]" if batch else "prompt"
        if not each:
            raise FieldError(f"{field} is empty: send at least one token", field)
        if isinstance(each, str):
            _check_unicode(each, field)
    return prompts


def chat_messages(body: ChatCompletionRequest) -> list[dict[str, str]]:
    """Messages as the chat template takes them: a role and text (parts joined by a newline,
    as vLLM joins them: joined by nothing, "Hello" and "world" read "Helloworld"), and the
    message's `name` where it has one, which the template may write (vLLM passes it too)."""
    messages = []
    for i, m in enumerate(body.messages):
        content = m.content if isinstance(m.content, str) else "\n".join(p.text for p in m.content or [])
        _check_unicode(content, f"messages[{i}].content")
        message = {"role": _ROLE_ALIASES.get(m.role, m.role), "content": content}
        if m.name is not None:
            _check_unicode(m.name, f"messages[{i}].name")
            message["name"] = m.name
        messages.append(message)
    return messages


def completion_params(body: CompletionRequest) -> SamplingParams:
    _refuse(body.echo, "echo")
    _refuse(body.suffix, "suffix")
    _refuse(not body.add_special_tokens, "add_special_tokens")  # false: a prompt without them
    if body.best_of is not None and body.best_of != body.n:
        raise FieldError("best_of is not supported (only best_of = n): drop it, or use n", "best_of")
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS:
        raise FieldError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {body.logprobs}", "logprobs")
    return _params(body, "max_tokens", body.max_tokens, DEFAULT_COMPLETION_TOKENS, body.logprobs)


def chat_params(body: ChatCompletionRequest) -> SamplingParams:
    _refuse(body.tools, "tools")
    _refuse(None if body.tool_choice == "none" else body.tool_choice, "tool_choice")
    _refuse(body.functions, "functions")  # the older form of tools
    _refuse(None if body.function_call == "none" else body.function_call, "function_call")  # "none": no function, as tool_choice's
    _refuse(body.audio, "audio")
    _refuse(None if body.modalities == ["text"] else body.modalities, 'modalities other than ["text"]', "modalities")
    _refuse(body.echo, "echo")  # vLLM's: the reply prefixed with the last message
    _refuse(body.add_special_tokens, "add_special_tokens")  # true: the template's and the tokenizer's both
    for i, message in enumerate(body.messages):
        _refuse(message.tool_calls, f"messages[{i}].tool_calls")
    if body.top_logprobs is not None and not body.logprobs:
        raise FieldError("top_logprobs needs logprobs: true", "top_logprobs")
    if body.stream and body.prompt_logprobs is not None:
        raise FieldError("prompt_logprobs is not served on streamed chat completions: set stream to false", "prompt_logprobs")
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_LOGPROBS:
        raise FieldError(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {body.top_logprobs}", "top_logprobs")
    name, given = "max_tokens", body.max_tokens
    if body.max_completion_tokens is not None:
        name, given = "max_completion_tokens", body.max_completion_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return _params(body, name, given, UNTIL_THE_CONTEXT_ENDS, logprobs)


def _check_unicode(text: str, name: str) -> None:
    """JSON may escape half of a surrogate pair ("\\ud800"), which is no character and which
    the tokenizer cannot take; protobuf strings cannot hold one, so only this front checks."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise FieldError(
            f"{name} is not valid Unicode: an unpaired surrogate (\\u{ord(text[e.start]):04x}) at character {e.start}", name
        ) from None


def _refuse(value: object, name: str, param: str | None = None) -> None:
    """Refuses a field sent with a value Tandem does not serve; param: the field, where name
    says more than its name."""
    if value:
        raise FieldError(f"{name} is not supported by this server: drop it from the request", param or name)


def _params(body: SamplingFields, field: str, max_tokens: int | None, default_max_tokens: int, logprobs: int | None) -> SamplingParams:
    """max_tokens None: default_max_tokens, or to the context's end where that comes first;
    field: the name the caller gave it, which the engine's errors use."""
    _refuse(body.logit_bias, "logit_bias")
    if body.response_format is not None and body.response_format.get("type") != "text":
        raise FieldError("response_format other than {\"type\": \"text\"} is not supported", "response_format")
    for name, value in (body.model_extra or {}).items():
        if name in VLLM_UNSERVED and value not in (None, [], {}, VLLM_UNSERVED[name]):
            _refuse(True, name)
    if body.stream_options is not None and not body.stream:
        raise FieldError("stream_options is only allowed with stream: true", "stream_options")
    _refuse(body.stream_options and body.stream_options.continuous_usage_stats, "stream_options.continuous_usage_stats")
    return SamplingParams(
        max_new_tokens=default_max_tokens if max_tokens is None else max_tokens,
        default_max_new_tokens=max_tokens is None,
        max_new_tokens_field=field,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if body.top_k in (None, -1) else body.top_k,  # vLLM's -1: no top-k, as 0
        min_p=body.min_p or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        n=body.n,
        seed=body.seed,
        stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=body.prompt_logprobs,
    )
