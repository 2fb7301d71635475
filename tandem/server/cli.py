"""The `tandem` command. Every `serve` flag has a TANDEM_* environment twin; this module is
the only place that reads the environment."""

import argparse
import asyncio
import contextlib
import importlib.util
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from tandem.client import cli as client_cli

EPILOG = """exit status: 0 success; 1 not serving, or a local failure (model load, bad file);
2 bad command line; 10+N a call failed with gRPC status code N (e.g. 15 NOT_FOUND,
13 INVALID_ARGUMENT, 24 UNAVAILABLE)."""


def port_or_off(text: str) -> int | None:
    """A port number, or "off" (None)."""
    return None if text.strip().lower() == "off" else int(text)


def boolean(text: str) -> bool:
    """true/false, yes/no, on/off or 1/0, in any case."""
    value = text.strip().lower()
    if value in ("true", "yes", "on", "1"):
        return True
    if value in ("false", "no", "off", "0"):
        return False
    raise ValueError(text)


# (flag, type, help); the default comes from the config dataclass, the env twin from the flag.
ENGINE_FLAGS: list[tuple[str, Callable[[str], Any], str]] = [
    ("--model", str, "Hugging Face model directory or .gguf file; unset = the embedded SmolLM2-135M-Instruct"),
    ("--dtype", str, "weights and activations: auto (bfloat16 where the hardware has it), float32, bfloat16, float16"),
    ("--device", str, "auto, cpu, cuda or cuda:N"),
    ("--block-size", int, "tokens per KV-cache block"),
    ("--kv-cache-bytes", int, "memory for the paged KV cache, all layers"),
    ("--max-num-batched-tokens", int, "token budget of one engine iteration (decode + prefill chunks)"),
    ("--max-num-seqs", int, "sequences running at once"),
    ("--max-waiting", int, "queued requests; beyond it new requests get RESOURCE_EXHAUSTED at once"),
    ("--max-model-len", int, "context limit, prompt + generated; unset = the model's own"),
    ("--num-threads", int, "CPU threads for torch; unset = torch's choice"),
    ("--adapters-dir", str, "directory of PEFT adapters, one folder per name; unset = no adapters"),
    ("--max-lora-rank", int, "largest adapter rank accepted (slot storage is padded to it)"),
    ("--max-loras", int, "device adapter slots: distinct adapters in one iteration"),
    ("--lora-pool-bytes", int, "memory cap for the device adapter slots (may lower --max-loras)"),
    ("--adapter-cache-bytes", int, "host memory for parsed adapters, LRU; in-use adapters are pinned"),
    ("--adapter-cache-prefault", boolean, "touch the adapter cache's whole budget at start (true), so reads while serving fault no pages; false grows it on demand"),
    ("--adapter-refresh-seconds", float, "how often a cached adapter's files are checked for a new version (shared adapters directory); 0 = every request"),
    ("--data-dir", str, "fine-tuning: training files and job state (needs --adapters-dir); unset = no fine-tuning"),
    ("--max-training-file-bytes", int, "largest dataset a fine-tuning job accepts"),
    ("--max-active-jobs", int, "fine-tuning jobs queued or running at once; beyond it CreateJob gets RESOURCE_EXHAUSTED"),
    ("--finetune-mode", str, "coserve (training tokens inside inference iterations) or timeslice (between them)"),
    ("--finetune-micro-batch-tokens", int, "training tokens per gradient computation (bounds training memory; time-sliced, inference's wait)"),
    ("--finetune-activation-bytes", int, "co-serve mode: memory cap for a training micro-batch's kept activations, and its graphs when it starts with no inference running (cuts micro-batches; longer examples are refused)"),
    ("--timeslice-share", float, "timeslice mode: the most of the engine's time training takes while inference has work (0-1]"),
    ("--stream-interval", int, "tokens per streamed message after a completion's first (1 = every token; more = fewer messages, less CPU per token)"),
    ("--cuda-graphs", boolean, "on CUDA, replay decode steps from CUDA graphs captured per batch-size bucket (false: launch every op)"),
    ("--coserve-itl-p99", float, "inter-token latency target in seconds that steers co-served fine-tuning's share; unset = a fixed half"),
]
SERVER_FLAGS: list[tuple[str, Callable[[str], Any], str]] = [
    ("--host", str, "address to listen on"),
    ("--port", int, "gRPC port (0 picks a free one)"),
    ("--metrics-port", int, "Prometheus /metrics HTTP port (0 picks a free one)"),
    ("--http-port", port_or_off, "OpenAI-compatible HTTP API port (/v1/completions, /v1/chat/completions, /v1/models); 0 picks a free one, off turns it off"),
    ("--auth-tokens-file", str, "file of '<inference|admin> <token>' lines; unset = no auth"),
    ("--tls-cert", str, "PEM certificate chain; with --tls-key turns TLS on"),
    ("--tls-key", str, "PEM private key of --tls-cert"),
    ("--tls-client-ca", str, "PEM CA bundle; requires client certificates signed by it (mutual TLS)"),
    ("--max-message-bytes", int, "largest request or response message; bigger ones are refused"),
    ("--drain-grace-seconds", float, "after SIGTERM, how long in-flight requests may run"),
    ("--log-format", str, "json (one object per line) or text"),
    ("--log-level", str, "DEBUG, INFO, WARNING or ERROR"),
]


# Flags whose values --help must not print.
SECRET_FLAGS = {"--token"}


def env_name(flag: str) -> str:
    return "TANDEM_" + flag.lstrip("-").replace("-", "_").upper()


def add_env_flag(parser: argparse.ArgumentParser, flag: str, kind: Callable[[str], Any], help: str, default: Any) -> None:
    """Adds `flag` whose default is its TANDEM_* environment variable, else `default`."""
    env = env_name(flag)
    if env in os.environ:
        try:
            default = kind(os.environ[env])
        except (ValueError, argparse.ArgumentTypeError) as error:
            # parser may be an argument group, which has no error(): exit as argparse would.
            why = f"is not valid: {error}" if isinstance(error, argparse.ArgumentTypeError) else f"is not a valid {kind.__name__}"
            print(f"tandem: error: {env}={os.environ[env]!r} {why}", file=sys.stderr)
            raise SystemExit(2) from None
    # A secret's value never shows in --help (a CI log); argparse %-formats help text.
    shown = "unset" if default is None else "set, not shown" if flag in SECRET_FLAGS else str(default).replace("%", "%%")
    parser.add_argument(flag, type=kind, default=default, help=f"{help} [env {env}; default {shown}]")


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


# What `pip install 'tandem[server]'` adds that `tandem serve` imports (a client install
# beside torch, as ML users have, lacked the rest and failed with a traceback).
SERVER_MODULES = ("torch", "transformers", "safetensors", "gguf", "grpc_reflection", "prometheus_client", "fastapi", "uvicorn")


def server_installed() -> bool:
    """Whether `tandem serve` can run here: the base install is the client alone."""
    return all(importlib.util.find_spec(module) is not None for module in SERVER_MODULES)


def add_serve_command(commands: argparse._SubParsersAction, with_flags: bool = True) -> None:
    """with_flags False leaves serve's flags out: their defaults come from the config, which
    imports torch, and client commands (bench on a load-generator machine) need none of it."""
    parser = commands.add_parser("serve", help="run the gRPC server", description="Run the Tandem gRPC server.", epilog=EPILOG)
    parser.set_defaults(run=_run_serve)
    if not with_flags or not server_installed():
        return
    from tandem.server.config import EngineConfig, ServerConfig  # imports torch: only for serve

    engine_defaults, server_defaults = EngineConfig(), ServerConfig()
    engine = parser.add_argument_group("model and engine")
    for flag, kind, text in ENGINE_FLAGS:
        add_env_flag(engine, flag, kind, text, getattr(engine_defaults, _dest(flag)))
    server = parser.add_argument_group("server")
    for flag, kind, text in SERVER_FLAGS:
        add_env_flag(server, flag, kind, text, getattr(server_defaults, _dest(flag)))


def _run_serve(args: argparse.Namespace) -> int:
    from tandem.server.config import EngineConfig, ServerConfig
    from tandem.server.logging_setup import configure_logging
    from tandem.server.serve import serve

    try:
        engine_config = EngineConfig(**{_dest(f): getattr(args, _dest(f)) for f, _, _ in ENGINE_FLAGS})
        server_config = ServerConfig(**{_dest(f): getattr(args, _dest(f)) for f, _, _ in SERVER_FLAGS})
    except ValueError as exc:
        print(f"tandem serve: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(server_config.log_format, server_config.log_level)
    try:
        return asyncio.run(serve(engine_config, server_config))
    except (OSError, ValueError) as exc:
        # Logged, not printed: with --log-format json a plain line broke the stream's parsers.
        logging.getLogger("tandem.serve").error("cannot start: %s", exc)
        return 1


def build_parser(command: str | None = "serve") -> argparse.ArgumentParser:
    """command: the subcommand about to run; serve's flags are built only for serve (or None: help)."""
    parser = argparse.ArgumentParser(prog="tandem", description="Tandem: one base model, many LoRA adapters, over gRPC.", epilog=EPILOG)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_command(commands, with_flags=command in (None, "serve"))
    client_cli.add_commands(commands, add_env_flag)
    return parser


def _exit_during_start_up(signum: int, frame: object) -> NoReturn:
    os.write(2, b"tandem serve: SIGTERM during start-up: exiting\n")
    os._exit(0)


@contextlib.contextmanager
def _sigterm_ends_start_up() -> Iterator[None]:
    """SIGTERM ends `tandem serve` at once (exit status 0) until serve() installs its drain,
    which replaces this handler. In its container the server is PID 1, to which the kernel
    delivers no signal it has no handler for: a pod deleted while torch and the server's
    modules imported dropped its SIGTERM and waited out its grace period for SIGKILL. A
    handler rather than an init (tini) in the image: it holds wherever `tandem serve` runs as
    PID 1, whatever the image, and a test sees it. Restored afterwards for callers in-process."""
    if threading.current_thread() is not threading.main_thread():  # signal.signal would refuse
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_during_start_up)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is _exit_during_start_up:
            signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    with _sigterm_ends_start_up() if command == "serve" else contextlib.nullcontext():
        # Before parsing: without the server, serve has no flags, and one given read as "unrecognized arguments".
        if command == "serve" and not server_installed():
            print("tandem serve: error: this install has the client only; install the server with: pip install 'tandem[server]'", file=sys.stderr)
            return 1
        args = build_parser(command).parse_args(argv)
        return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
