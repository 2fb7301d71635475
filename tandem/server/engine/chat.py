"""Chat messages: the roles a template knows, the checks a request's messages pass, and
rendering with the model's chat template (the one rendering requests and training share)."""

from typing import Any

from jinja2 import TemplateError

from tandem.server.errors import InvalidRequest, excerpt

CHAT_ROLES = ("system", "user", "assistant")


def check_messages(messages: list[dict[str, str]]) -> None:
    """Chat messages the template can render: a role it knows and text content each."""
    if not messages:
        raise InvalidRequest("messages is empty: send at least one message")
    for i, m in enumerate(messages):
        if m.get("role") not in CHAT_ROLES:
            raise InvalidRequest(f"messages[{i}].role is {m.get('role')!r}; use one of {', '.join(CHAT_ROLES)}")
        if not isinstance(m.get("content"), str):
            raise InvalidRequest(f"messages[{i}].content must be text")


def render_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The conversation as the model's template writes it; with add_generation_prompt, ready
    for the assistant's turn (what a request sends the model). A template that refuses the
    messages (Mistral's: roles must alternate user/assistant, no system role) raises its
    reason as InvalidRequest: it was an INTERNAL error with a traceback."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest("this model has no chat template: send a plain prompt instead of messages")
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    except TemplateError as e:
        raise TemplateRefused(str(e)) from None


class TemplateRefused(InvalidRequest):
    """The chat template raised on these messages (its raise_exception): the caller's to change."""

    def __init__(self, reason: str):
        super().__init__(f"the model's chat template refused the messages: {excerpt(reason, 200)}")
        self.reason = reason
