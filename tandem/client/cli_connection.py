"""What every client subcommand of `tandem` shares: the connection flags, the client settings
they make, and the exit status of a failed call (10 + its gRPC status code)."""

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from tandem.client.errors import TandemRpcError
from tandem.client.flag_types import message_bytes, positive_seconds

EXIT_RPC_BASE = 10  # exit status 10 + gRPC status code

AddFlag = Callable[[argparse.ArgumentParser, str, Callable[[str], Any], str, Any], None]


def add_connection_flags(
    parser: argparse.ArgumentParser, add_flag: AddFlag, timeout_help: str = "seconds per call, retries included", timeout: float = 300.0
) -> None:
    group = parser.add_argument_group("connection")
    add_flag(group, "--target", str, "server address host:port", "localhost:50051")
    add_flag(group, "--token-file", str, "file holding the bearer token (or set TANDEM_TOKEN)", None)
    add_flag(group, "--token", str, "bearer token; prefer the environment or --token-file (flags show in ps)", None)
    group.add_argument("--tls", action="store_true", help="connect with TLS (implied by --ca-cert)")
    add_flag(group, "--ca-cert", str, "PEM CA to trust (default: system roots)", None)
    add_flag(group, "--client-cert", str, "PEM client certificate (mutual TLS)", None)
    add_flag(group, "--client-key", str, "PEM key of --client-cert", None)
    add_flag(group, "--timeout", positive_seconds, timeout_help, timeout)
    # The server's flag has the same name and environment variable: one setting for both ends.
    add_flag(group, "--max-message-bytes", message_bytes, "largest message sent or received (the server's --max-message-bytes)", 4 << 20)


def connection_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for TandemClient / AsyncTandemClient (after the target)."""
    token = Path(args.token_file).read_text().strip() if args.token_file else args.token
    return dict(token=token, tls=args.tls, ca_cert=args.ca_cert, client_cert=args.client_cert,
                client_key=args.client_key, timeout=args.timeout, max_message_bytes=args.max_message_bytes)


def rpc_failure(error: TandemRpcError, prefix: str = "tandem") -> int:
    """Prints the failed call's status and message; returns the exit status for it."""
    suffix = f" (request id {error.request_id})" if error.request_id else ""
    if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "message larger than max" in error.message:  # gRPC's words
        suffix += ": raise --max-message-bytes, here and on the server"
    print(f"{prefix}: {error}{suffix}", file=sys.stderr)
    return EXIT_RPC_BASE + error.code.value[0]
