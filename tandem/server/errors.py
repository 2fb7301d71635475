"""Domain errors raised by the engine and the model loader.

Each class corresponds to one gRPC status code; the server maps them in one place.
Messages are written for the user: they say what was wrong and what to change.
"""


def excerpt(value: object, limit: int = 64) -> str:
    """How a message quotes what a caller or a file gave: repr'd, cut to limit characters (a
    message travels in gRPC trailers, and must not carry a file's contents)."""
    text = repr(value[:limit]) if isinstance(value, str) else repr(value)[:limit]
    long = len(value) > limit if isinstance(value, str) else len(repr(value)) > limit
    return text + "…" if long else text


class TandemError(Exception):
    """Base class for errors a user can act on."""


class InvalidRequest(TandemError):
    """The request itself is malformed (maps to INVALID_ARGUMENT)."""


class ContextLengthExceeded(InvalidRequest):
    """The prompt, or the prompt and the tokens asked for, do not fit the model's context
    (INVALID_ARGUMENT; OpenAI's `context_length_exceeded`, which clients fall back on)."""


class NotFound(TandemError):
    """An adapter, router or job named in the request does not exist (NOT_FOUND)."""


class FailedPrecondition(TandemError):
    """The request is valid but the thing it acts on is not in a state that allows it, e.g.
    cancelling a finished job (FAILED_PRECONDITION)."""


class IncompatibleAdapter(FailedPrecondition):
    """An adapter exists but cannot be served on this base model (FAILED_PRECONDITION)."""


class AlreadyExists(TandemError):
    """What the request would create is already there or under way, e.g. a second job
    training the same adapter name (ALREADY_EXISTS)."""


class ResourceExhausted(TandemError):
    """The queue, the KV cache or the adapter slots are full (RESOURCE_EXHAUSTED)."""


class Unavailable(TandemError):
    """The engine is not ready or is draining (UNAVAILABLE)."""


class ModelLoadError(TandemError):
    """The model path is missing, corrupt or of an unsupported architecture."""
