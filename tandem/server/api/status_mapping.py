"""The one place where exceptions become gRPC status codes.

Domain errors carry messages written for the user; anything else is a bug and becomes
INTERNAL with a pointer to the server log instead of its details.
"""

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
