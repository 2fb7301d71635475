"""The client side of the `tandem` command: generate, chat, adapters, health, model.

Flags are added by server/cli.py's `add_env_flag` (passed in), which gives each its
TANDEM_* environment twin; this module never reads the environment itself.
"""

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from clients.errors import TandemRpcError
from clients.sync_client import TandemClient
from clients.types import SamplingOptions

EXIT_NOT_SERVING = 1
EXIT_RPC_BASE = 10  # exit status 10 + gRPC status code

AddFlag = Callable[[argparse.ArgumentParser, str, Callable[[str], Any], str, Any], None]


def _connection_flags(parser: argparse.ArgumentParser, add_flag: AddFlag) -> None:
    group = parser.add_argument_group("connection")
    add_flag(group, "--target", str, "server address host:port", "localhost:50051")
    add_flag(group, "--token-file", str, "file holding the bearer token (or set TANDEM_TOKEN)", None)
    add_flag(group, "--token", str, "bearer token; prefer the environment or --token-file (flags show in ps)", None)
    group.add_argument("--tls", action="store_true", help="connect with TLS (implied by --ca-cert)")
    add_flag(group, "--ca-cert", str, "PEM CA to trust (default: system roots)", None)
    add_flag(group, "--client-cert", str, "PEM client certificate (mutual TLS)", None)
    add_flag(group, "--client-key", str, "PEM key of --client-cert", None)
    add_flag(group, "--timeout", float, "seconds per call, retries included", 300.0)


def _sampling_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation")
    group.add_argument("--adapter", default="", help="adapter name (default: the base model)")
    group.add_argument("--max-new-tokens", type=int, help="tokens to generate at most (server default 256)")
    group.add_argument("--temperature", type=float, help="0 (default) = greedy")
    group.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1]")
    group.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    group.add_argument("--repetition-penalty", type=float, help="> 1 discourages repeats")
    group.add_argument("--seed", type=int, help="reproducible sampling")
    group.add_argument("--stop", action="append", help="stop string (repeatable)")
    group.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence")


def _sampling_options(args: argparse.Namespace) -> SamplingOptions:
    names = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop")
    options: SamplingOptions = {n: getattr(args, n) for n in names if getattr(args, n) is not None}  # type: ignore[misc]
    if args.ignore_eos:
        options["ignore_eos"] = True
    return options


def _client(args: argparse.Namespace) -> TandemClient:
    token = Path(args.token_file).read_text().strip() if args.token_file else args.token
    return TandemClient(
        args.target,
        token=token,
        tls=args.tls,
        ca_cert=args.ca_cert,
        client_cert=args.client_cert,
        client_key=args.client_key,
        timeout=args.timeout,
    )


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _run_generate(args: argparse.Namespace, client: TandemClient) -> int:
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    request: dict[str, Any] = {"messages": [{"role": "user", "content": text}]} if args.chat else {"prompt": text}
    options = _sampling_options(args)
    if args.json:
        _print_json(asdict(client.generate(adapter=args.adapter, **request, **options)))
        return 0
    last = None
    for chunk in client.stream(adapter=args.adapter, **request, **options):
        print(chunk.text, end="", flush=True)
        last = chunk
    print()
    if last is not None:
        print(f"[{last.finish_reason}; {last.prompt_tokens} prompt + {last.generated_tokens} generated tokens]", file=sys.stderr)
    return 0


def _run_chat(args: argparse.Namespace, client: TandemClient) -> int:
    """A loop with history; /reset forgets it, /exit or end of input leaves."""
    history = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            del history[1 if args.system else 0 :]
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.strip()})
        reply = []
        for chunk in client.stream(messages=history, adapter=args.adapter, **_sampling_options(args)):
            print(chunk.text, end="", flush=True)
            reply.append(chunk.text)
        print()
        history.append({"role": "assistant", "content": "".join(reply)})


def _run_model(args: argparse.Namespace, client: TandemClient) -> int:
    info = asdict(client.model_info())
    if args.json:
        _print_json(info)
    else:
        for key, value in info.items():
            print(f"{key:14} {value}")
    return 0


def _run_health(args: argparse.Namespace, client: TandemClient) -> int:
    """Prints the status; with --wait polls until SERVING or the time is up."""
    end = time.monotonic() + args.wait
    while True:
        try:
            status = client.health(args.service, timeout=min(5.0, args.timeout))
        except TandemRpcError as error:
            status = error.code.name
        if status == "SERVING" or time.monotonic() >= end:
            print(status)
            return 0 if status == "SERVING" else EXIT_NOT_SERVING
        time.sleep(0.5)


def _run_adapters(args: argparse.Namespace, client: TandemClient) -> int:
    if args.action == "list":
        adapters = [asdict(a) for a in client.list_adapters()]
        if args.json:
            _print_json(adapters)
            return 0
        for a in adapters:
            print(f"{a['name']}\trank={a['rank']}\ttier={a['tier']}\tin_use={a['in_use']}\t{a['content_hash'][:12]}")
    elif args.action == "load":
        _print_json(asdict(client.load_adapter(args.name, args.path)))
    else:
        client.unload_adapter(args.name)
    return 0


def _runner(action: Callable[[argparse.Namespace, TandemClient], int]) -> Callable[[argparse.Namespace], int]:
    """Connects, runs `action`, and turns failures into a message and an exit status."""

    def run(args: argparse.Namespace) -> int:
        try:
            with _client(args) as client:
                return action(args, client)
        except TandemRpcError as error:
            suffix = f" (request id {error.request_id})" if error.request_id else ""
            print(f"tandem: {error}{suffix}", file=sys.stderr)
            return EXIT_RPC_BASE + error.code.value[0]
        except (OSError, ValueError) as error:
            print(f"tandem: {error}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130

    return run


def add_commands(commands: argparse._SubParsersAction, add_flag: AddFlag) -> None:
    """Adds generate, chat, model, health and adapters to the `tandem` parser."""
    generate = commands.add_parser("generate", help="generate text (streams to the terminal)")
    generate.add_argument("prompt", help="the prompt; - reads it from standard input")
    generate.add_argument("--json", action="store_true", help="wait for the whole answer and print it as JSON")
    generate.add_argument(
        "--chat", action="store_true", help="send the prompt as one user message through the model's chat template"
    )
    _sampling_flags(generate)
    generate.set_defaults(run=_runner(_run_generate))

    chat = commands.add_parser("chat", help="chat interactively (keeps the conversation)")
    chat.add_argument("--system", default="", help="system message")
    _sampling_flags(chat)
    chat.set_defaults(run=_runner(_run_chat))

    model = commands.add_parser("model", help="show the served model")
    model.add_argument("--json", action="store_true")
    model.set_defaults(run=_runner(_run_model))

    health = commands.add_parser("health", help="check liveness, or readiness of a service")
    health.add_argument("--service", default="", help="'' = liveness; tandem.v1.Generation = readiness")
    health.add_argument("--wait", type=float, default=0.0, help="poll up to this many seconds for SERVING")
    health.set_defaults(run=_runner(_run_health))

    adapters = commands.add_parser("adapters", help="list, load or unload adapters")
    actions = adapters.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="list registered adapters")
    listing.add_argument("--json", action="store_true")
    load = actions.add_parser("load", help="register an adapter from the server's --adapters-dir (admin)")
    load.add_argument("name")
    load.add_argument("--path", default="", help="directory inside --adapters-dir (default: NAME)")
    unload = actions.add_parser("unload", help="unregister an adapter (admin)")
    unload.add_argument("name")

    for parser in (generate, chat, model, health, listing, load, unload):
        _connection_flags(parser, add_flag)
    adapters.set_defaults(run=_runner(_run_adapters))
