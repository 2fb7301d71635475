"""What every client subcommand of `tandem` shares: the connection flags, the client settings
they make, and the exit status of a failed call (10 + its gRPC status code)."""

import argparse
import os
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
    """Keyword arguments for TandemClient / AsyncTandemClient (after the target). A file
    flag set empty (often an environment variable left blank) and half a client certificate
    are usage errors (exit 2): an empty TANDEM_TOKEN_FILE had sent no token, an empty
    TANDEM_CA_CERT turned TLS on."""
    for flag in ("token_file", "ca_cert", "client_cert", "client_key"):
        if getattr(args, flag) == "":
            _usage_error(f"--{flag.replace('_', '-')} is empty (TANDEM_{flag.upper()} set blank?): unset it or name a file")
    if (args.client_cert is None) != (args.client_key is None):
        _usage_error("--client-cert and --client-key go together (mutual TLS): give both")
    return dict(token=_token(args), tls=args.tls, ca_cert=args.ca_cert, client_cert=args.client_cert,
                client_key=args.client_key, timeout=args.timeout, max_message_bytes=args.max_message_bytes)


def _token(args: argparse.Namespace) -> str | None:
    """The bearer token: a flag on the command line beats the environment (an admin's
    --token beat TANDEM_TOKEN_FILE set by CI before); from the same source the file wins."""
    typed = {flag: getattr(args, flag) is not None and getattr(args, flag) != os.environ.get(f"TANDEM_{flag.upper()}")
             for flag in ("token_file", "token")}
    if typed["token"] and not typed["token_file"]:
        return args.token
    return Path(args.token_file).read_text() if args.token_file else args.token


def _usage_error(message: str) -> None:
    print(f"tandem: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def rpc_failure(error: TandemRpcError, prefix: str = "tandem") -> int:
    """Prints the failed call's status and message; returns the exit status for it."""
    suffix = f" (request id {error.request_id})" if error.request_id else ""
    if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "message larger than max" in error.message:  # gRPC's words
        suffix += ": raise --max-message-bytes, here and on the server"
    print(f"{prefix}: {error}{suffix}", file=sys.stderr)
    return EXIT_RPC_BASE + error.code.value[0]
