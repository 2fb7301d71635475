"""The one exception the client raises for a failed call."""

import grpc


class TandemRpcError(Exception):
    """A call failed with a gRPC status; `code` is a grpc.StatusCode, `message` the server's words."""

    def __init__(self, code: grpc.StatusCode, message: str, request_id: str | None = None):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id

    @classmethod
    def wrap(cls, error: grpc.RpcError, request_id: str | None) -> "TandemRpcError":
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "", request_id)
