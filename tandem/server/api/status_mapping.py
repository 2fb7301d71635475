"""The one place where exceptions become gRPC status codes, and (for the OpenAI-compatible
HTTP front) HTTP statuses with OpenAI's error type.

Domain errors carry messages written for the user; anything else is a bug and becomes
INTERNAL with a pointer to the server log instead of its details.
"""

from dataclasses import dataclass

import grpc

from tandem.server import errors
from tandem.server.api.auth import PermissionDenied, Unauthenticated

MAX_MESSAGE_CHARS = 1000  # details travel in HTTP/2 trailers: keep them short

_CODES: dict[type[BaseException], grpc.StatusCode] = {
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.ModelLoadError: grpc.StatusCode.UNAVAILABLE,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}


def status_for(exc: BaseException, request_id: str) -> tuple[grpc.StatusCode, str]:
    """The status code and message the caller sees for `exc`."""
    for cls in type(exc).__mro__:
        if cls in _CODES:
            return _CODES[cls], str(exc)[:MAX_MESSAGE_CHARS]
    return grpc.StatusCode.INTERNAL, f"internal error (request id {request_id}); see the server log"


@dataclass(frozen=True)
class HttpError:
    """What an HTTP caller sees: status, OpenAI's error `type`, a stable `code` (the gRPC
    status name, lower case) and the message."""

    status: int
    type: str
    code: str
    message: str


_HTTP: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.INTERNAL: (500, "server_error"),
}


def http_error_for(exc: BaseException, request_id: str) -> HttpError:
    """The HTTP status and OpenAI error fields for `exc`, from the same codes gRPC uses."""
    code, message = status_for(exc, request_id)
    status, kind = _HTTP[code]
    return HttpError(status, kind, code.name.lower(), message)
