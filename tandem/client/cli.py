"""The client side of the `tandem` command: generate, chat, adapters, finetune, health, model, bench.

Flags are added by server/cli.py's `add_env_flag` (passed in), which gives each its
TANDEM_* environment twin; this module never reads the environment itself.
"""

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import grpc

from tandem.client.bench.cli import add_command as add_bench_command
from tandem.client.cli_connection import EXIT_RPC_BASE, AddFlag, add_connection_flags, connection_settings, rpc_failure
from tandem.client.errors import TandemRpcError
from tandem.client.flag_types import seconds, uint32, uint64
from tandem.client.job_display import ProgressDisplay, job_details, job_table, outcome
from tandem.client.live_line import LiveLine
from tandem.client.sync_client import TandemClient
from tandem.client.types import FinetuneJob, Hyperparameters, LoraOptions, SamplingOptions

EXIT_NOT_SERVING = 1
EXIT_JOB_FAILED = 1  # a watched fine-tuning job failed or was cancelled
# What a server that is starting, restarting or slow answers a health check: `health --wait` asks again.
HEALTH_NOT_YET = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
FlagSpec = tuple[str, Callable[[str], Any], str]  # (flag, type, help)


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


# `finetune create` flags with TANDEM_* twins; unset ones leave the server's default.
LORA_FLAGS: list[FlagSpec] = [
    ("--r", uint32, "LoRA rank (server default 16; at most its --max-lora-rank)"),
    ("--lora-alpha", float, "scale numerator (default 2 * r)"),
    ("--target-modules", _comma_list, "comma-separated, e.g. q_proj,v_proj (default: all seven projections)"),
    ("--lora-dropout", float, "dropout on each adapted linear's input, in [0, 1)"),
]
HYPERPARAMETER_FLAGS: list[FlagSpec] = [
    ("--learning-rate", float, "AdamW learning rate (default 2e-4)"),
    ("--lr-scheduler", str, "linear (default), cosine or constant, after the warm-up"),
    ("--warmup-steps", uint32, "linear warm-up steps"),
    ("--n-epochs", uint32, "passes over the data (default 1; ignored with --max-steps)"),
    ("--max-steps", uint32, "optimizer steps to run (default: n-epochs over the data)"),
    ("--tokens-per-step", uint32, "tokens per optimizer step (default 4096)"),
    ("--max-seq-length", uint32, "longest example in tokens; longer ones are refused (default: the context limit)"),
    ("--weight-decay", float, "AdamW weight decay"),
    ("--max-grad-norm", float, "gradient clipping by global norm (default 1.0, 0 = off)"),
    ("--eval-fraction", float, "share of the examples held out for eval loss, in [0, 0.5]"),
    ("--checkpoint-interval", uint32, "optimizer steps between checkpoints and eval points (default 50)"),
    ("--seed", uint64, "data order, initialisation and dropout"),
]


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _given(args: argparse.Namespace, flags: list[FlagSpec]) -> dict[str, Any]:
    return {_dest(flag): getattr(args, _dest(flag)) for flag, _, _ in flags if getattr(args, _dest(flag)) is not None}


def _finetune_create_flags(parser: argparse.ArgumentParser, add_flag: AddFlag) -> None:
    parser.add_argument("adapter", help="name of the adapter to publish (a new version if it exists)")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--training-file", help="a JSONL file inside the server's --data-dir")
    data.add_argument("--data", help="a local JSONL file, sent with the request")
    parser.add_argument("--base-adapter", default="", help="continue training this served adapter")
    lora = parser.add_argument_group("LoRA (unset: the server's defaults, or the base adapter's settings)")
    for flag, kind, text in LORA_FLAGS:
        add_flag(lora, flag, kind, text, None)
    lora.add_argument("--use-rslora", action="store_true", help="scale by lora_alpha / sqrt(r)")
    training = parser.add_argument_group("training (unset: the server's defaults)")
    for flag, kind, text in HYPERPARAMETER_FLAGS:
        add_flag(training, flag, kind, text, None)
    parser.add_argument("--watch", action="store_true", help="show progress until the job ends (Ctrl-C stops watching, not the job)")
    parser.add_argument("--json", action="store_true", help="print the job (with --watch: the ended job) as JSON")


def _sampling_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation")
    group.add_argument(
        "--adapter", default="", type=_adapter_arg,
        help="adapter name (default: the base model), or a mixture NAME=WEIGHT,NAME=WEIGHT served as one weighted sum",
    )
    group.add_argument("--max-new-tokens", type=uint32, help="tokens to generate at most (server default 256)")
    group.add_argument("--temperature", type=float, help="0 (default) = greedy")
    group.add_argument("--top-p", type=float, help="nucleus sampling mass in [0, 1] (0: the top token only)")
    group.add_argument("--top-k", type=uint32, help="sample among the k most likely tokens")
    group.add_argument("--repetition-penalty", type=float, help="> 1 discourages repeats")
    group.add_argument("--seed", type=uint64, help="reproducible sampling")
    group.add_argument("--stop", action="append", help="stop string (repeatable)")
    group.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence")


def _sampling_options(args: argparse.Namespace) -> SamplingOptions:
    names = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop")
    options: SamplingOptions = {n: getattr(args, n) for n in names if getattr(args, n) is not None}  # type: ignore[misc]
    if args.ignore_eos:
        options["ignore_eos"] = True
    return options


def _adapter_arg(value: str) -> str | dict[str, float]:
    """--adapter: a name, or "a=0.7,b=0.3" for a per-request mixture."""
    if "=" not in value:
        return value
    try:
        pairs = [(name, float(weight)) for name, weight in (part.split("=", 1) for part in value.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a mixture is NAME=WEIGHT,NAME=WEIGHT with numeric weights, got {value!r}") from None
    mixture = dict(pairs)
    if len(mixture) < len(pairs):  # the mapping kept the last weight of a name given twice
        raise argparse.ArgumentTypeError(f"a mixture names each adapter once, with its total weight, got {value!r}")
    return mixture


def _client(args: argparse.Namespace) -> TandemClient:
    return TandemClient(args.target, **connection_settings(args))


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _run_generate(args: argparse.Namespace, client: TandemClient) -> int:
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    request: dict[str, Any] = {"messages": [{"role": "user", "content": text}]} if args.chat else {"prompt": text}
    options = _sampling_options(args)
    if args.json:
        completion = client.generate(adapter=args.adapter, **request, **options)
        _print_json(asdict(completion))
        return _aborted_status(completion.finish_reason)
    last = None
    for chunk in client.stream(adapter=args.adapter, **request, **options):
        print(chunk.text, end="", flush=True)
        last = chunk
    print()
    if last is None:
        return 0
    print(f"[{last.finish_reason}; {last.prompt_tokens} prompt + {last.generated_tokens} generated tokens]", file=sys.stderr)
    return _aborted_status(last.finish_reason)


def _aborted_status(finish_reason: str | None) -> int:
    """A generation the server aborted (it was stopping) is cut short, though its call
    succeeded: exit as for UNAVAILABLE, which tells a script to try again."""
    if finish_reason != "abort":
        return 0
    print("tandem: the server aborted the generation (it was stopping): run it again", file=sys.stderr)
    return EXIT_RPC_BASE + grpc.StatusCode.UNAVAILABLE.value[0]


def _run_chat(args: argparse.Namespace, client: TandemClient) -> int:
    """A loop with history; /reset forgets it, /exit or end of input leaves. A failed turn is
    reported on stderr and left out of the history."""
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
        try:
            for chunk in client.stream(messages=history, adapter=args.adapter, **_sampling_options(args)):
                print(chunk.text, end="", flush=True)
                reply.append(chunk.text)
        except TandemRpcError as error:
            # A failed turn (a history past the context, a mistyped adapter, a server briefly
            # away) is forgotten and the session goes on: ended, it lost the conversation and
            # /reset could never be typed. Credentials that fail fail every turn: that ends it.
            if reply:
                print()
            del history[-1]
            if error.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                raise
            rpc_failure(error)
            continue
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
    """Prints the status; with --wait polls until SERVING or the time is up, showing on
    stderr what it waits for (a line redrawn on a terminal, a line per change elsewhere).
    Only a server not up yet is waited for: another failure (NOT_FOUND for a mistyped
    --service, UNAUTHENTICATED) will not pass by itself, so it fails at once as any call does."""
    started = time.monotonic()
    progress = LiveLine(sys.stderr)
    what = args.service or "the server"
    try:
        while True:
            status, error = _health_status(args, client)
            waited = time.monotonic() - started
            if status == "SERVING" or waited >= args.wait:
                break
            progress.show(f"waiting for {what}: {status}" + (f", {waited:.0f} s of {args.wait:.0f}" if progress.live else ""))
            time.sleep(0.5)
    finally:
        progress.close()
    if error is not None:
        print(f"tandem: {error}", file=sys.stderr)
    print(status)
    return 0 if status == "SERVING" else EXIT_NOT_SERVING


def _health_status(args: argparse.Namespace, client: TandemClient) -> tuple[str, TandemRpcError | None]:
    """The serving status, or the code of a server not up yet with its error; raises any other failure."""
    try:
        return client.health(args.service, timeout=min(5.0, args.timeout)), None
    except TandemRpcError as error:
        if error.code not in HEALTH_NOT_YET:
            raise
        return error.code.name, error


def _run_adapters(args: argparse.Namespace, client: TandemClient) -> int:
    if args.action == "list":
        adapters = [asdict(a) for a in client.list_adapters()]
        if args.json:
            _print_json(adapters)
            return 0
        for a in adapters:
            ratio = f"\tratio={a['compression_ratio']:.1f}" if a["format"] == "compeft" else ""
            print(f"{a['name']}\trank={a['rank']}\ttier={a['tier']}\tin_use={a['in_use']}\t{a['format']}{ratio}\t{a['content_hash'][:12]}")
    elif args.action == "load":
        _print_json(asdict(client.load_adapter(args.name, args.path)))
    elif args.action == "merge":
        if args.weights and len(args.weights) != len(args.adapters):
            print(f"tandem adapters merge: error: --weights gives {len(args.weights)} weights for {len(args.adapters)} adapters", file=sys.stderr)
            return 2
        twice = sorted({a for a in args.adapters if args.adapters.count(a) > 1})
        if twice:
            # The server refuses it too; with --weights, the name -> weight mapping kept only the last.
            print(f"tandem adapters merge: error: adapter {twice[0]!r} is named twice: give each adapter once, with its total weight", file=sys.stderr)
            return 2
        adapters = dict(zip(args.adapters, args.weights)) if args.weights else args.adapters
        result = client.merge_adapters(
            args.name, adapters, args.method, args.rank, density=args.density, gamma=args.gamma, seed=args.seed
        )
        _print_json(asdict(result))
    elif args.action == "compress":
        _print_json(asdict(client.compress_adapter(args.name, args.source, args.density)))
    else:
        client.unload_adapter(args.name)
    return 0


def _print_job(job: FinetuneJob, as_json: bool) -> None:
    if as_json:
        _print_json(asdict(job))
    else:
        print("\n".join(job_details(job)))


def _follow(client: TandemClient, job_id: str, as_json: bool, timeout: float | None = None) -> int:
    """Shows the job's progress on stderr until it ends, then its outcome; 0 only if it succeeded."""
    display = ProgressDisplay(sys.stderr)
    job = None
    try:
        for job in client.watch_finetune_job(job_id, timeout):
            display.show(job)
    finally:
        display.close()
    if job is None:
        raise ValueError(f"the server sent no state for job {job_id}")
    if as_json:
        _print_json(asdict(job))
    else:
        print(outcome(job))
    return 0 if job.status == "succeeded" else EXIT_JOB_FAILED


def _read_jsonl(path: Path) -> str:
    """A local training file's text; bytes that are not UTF-8 are refused naming their line,
    as the server names a bad JSON line (the codec's error gives a byte offset)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(f"{path}: line {line} is not UTF-8 ({error.reason} at byte {error.start}): save the file as UTF-8") from None


def _run_finetune_create(args: argparse.Namespace, client: TandemClient) -> int:
    lora = _given(args, LORA_FLAGS) | ({"use_rslora": True} if args.use_rslora else {})
    job = client.create_finetune_job(
        args.adapter,
        training_file=args.training_file,
        training_data=_read_jsonl(Path(args.data)) if args.data else None,
        base_adapter=args.base_adapter,
        lora=cast(LoraOptions, lora),
        hyperparameters=cast(Hyperparameters, _given(args, HYPERPARAMETER_FLAGS)),
    )
    if not args.watch:
        _print_job(job, args.json)
        return 0
    print(f"{job.id}: {job.status}, {job.num_examples} examples, {job.total_steps} steps", file=sys.stderr)
    return _follow(client, job.id, args.json)


def _run_finetune_list(args: argparse.Namespace, client: TandemClient) -> int:
    jobs = client.list_finetune_jobs()
    if args.json:
        _print_json([asdict(job) for job in jobs])
    else:
        print("\n".join(job_table(jobs)))
    return 0


def _run_finetune_get(args: argparse.Namespace, client: TandemClient) -> int:
    _print_job(client.get_finetune_job(args.id), args.json)
    return 0


def _run_finetune_cancel(args: argparse.Namespace, client: TandemClient) -> int:
    job = client.cancel_finetune_job(args.id)
    print(f"{job.id}: {job.status}")
    return 0


def _run_finetune_watch(args: argparse.Namespace, client: TandemClient) -> int:
    return _follow(client, args.id, args.json, args.timeout)


def _reader_gone() -> int:
    """Standard output's reader left early (`tandem generate ... | head -c 100`): it took what
    it wanted, so this is no failure: exit 0 without a word, not 1 with "Broken pipe" (nor
    141, SIGPIPE's, which fails a `set -o pipefail` script). stdout goes to devnull, so that
    the interpreter's last flush at exit finds no broken pipe either (Python's recipe)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _runner(action: Callable[[argparse.Namespace, TandemClient], int]) -> Callable[[argparse.Namespace], int]:
    """Connects, runs `action`, and turns failures into a message and an exit status."""

    def run(args: argparse.Namespace) -> int:
        try:
            with _client(args) as client:
                return action(args, client)
        except TandemRpcError as error:
            return rpc_failure(error)
        except BrokenPipeError:
            return _reader_gone()
        except (OSError, ValueError) as error:
            print(f"tandem: {error}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130

    return run


FINETUNE_EPILOG = """create --watch and watch exit 0 when the job succeeded, 1 when it failed or was
cancelled, 10+N when a call failed with gRPC status code N."""


def _add_finetune_command(commands: argparse._SubParsersAction, add_flag: AddFlag) -> None:
    finetune = commands.add_parser(
        "finetune", help="fine-tune LoRA adapters on the served model (admin)", epilog=FINETUNE_EPILOG
    )
    actions = finetune.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="validate a dataset and queue a job", epilog=FINETUNE_EPILOG)
    _finetune_create_flags(create, add_flag)
    listing = actions.add_parser("list", help="list jobs, newest first")
    get = actions.add_parser("get", help="show one job")
    cancel = actions.add_parser("cancel", help="stop a queued or running job; nothing is published")
    watch = actions.add_parser("watch", help="show a job's progress until it ends", epilog=FINETUNE_EPILOG)
    for parser in (get, cancel, watch):
        parser.add_argument("id", help="job id (ftjob-...)")
    for parser in (listing, get, watch):
        parser.add_argument("--json", action="store_true")
    runs = {create: _run_finetune_create, listing: _run_finetune_list, get: _run_finetune_get, cancel: _run_finetune_cancel}
    for parser, run in (runs | {watch: _run_finetune_watch}).items():
        # A job runs for hours: following one has no deadline unless watch's --timeout sets one.
        if parser is watch:
            add_connection_flags(parser, add_flag, "seconds the watch may last (inf: until the job ends)", math.inf)
        else:
            add_connection_flags(parser, add_flag, "seconds per call" + ("; following the job (--watch) has no limit" if parser is create else ""))
        parser.set_defaults(run=_runner(run))


def add_commands(commands: argparse._SubParsersAction, add_flag: AddFlag) -> None:
    """Adds generate, chat, model, health, adapters, finetune and bench to the `tandem` parser."""
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
    health.add_argument("--service", default="", help="'' = liveness; tandem.v1.GenerationService = readiness")
    health.add_argument("--wait", type=seconds, default=0.0, help="poll up to this many seconds for SERVING")
    health.set_defaults(run=_runner(_run_health))

    adapters = commands.add_parser("adapters", help="list, load, unload, merge or compress adapters")
    actions = adapters.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="list registered adapters")
    listing.add_argument("--json", action="store_true")
    load = actions.add_parser("load", help="register an adapter from the server's --adapters-dir (admin)")
    load.add_argument("name")
    load.add_argument("--path", default="", help="directory inside --adapters-dir (default: NAME)")
    unload = actions.add_parser("unload", help="unregister an adapter (admin)")
    unload.add_argument("name")
    merge = actions.add_parser("merge", help="merge adapters into a new adapter NAME (admin)")
    merge.add_argument("name")
    merge.add_argument("adapters", nargs="+", help="the adapters to merge")
    merge.add_argument("--method", required=True, choices=["linear", "ties", "dare_ties", "breadcrumbs"])
    merge.add_argument("--weights", type=float, nargs="+", help="one weight per adapter (default 1 each)")
    merge.add_argument("--rank", type=uint32, default=0, help="the merged rank (default: the inputs' largest)")
    merge.add_argument("--density", type=float, help="fraction of each delta kept (ties, dare_ties, breadcrumbs; default 0.5)")
    merge.add_argument("--gamma", type=float, help="breadcrumbs: fraction of largest magnitudes dropped (default 0.01)")
    merge.add_argument("--seed", type=uint64, help="dare_ties: the random drop's seed")
    compress = actions.add_parser("compress", help="publish a ComPEFT-compressed copy of adapter SOURCE as NAME (admin)")
    compress.add_argument("name")
    compress.add_argument("source")
    compress.add_argument("--density", type=float, help="fraction of each A and B (of its update, for an adapter trained here) kept (default 0.5)")

    for parser in (generate, chat, model, health, listing, load, unload, merge, compress):
        add_connection_flags(parser, add_flag)
    adapters.set_defaults(run=_runner(_run_adapters))
    _add_finetune_command(commands, add_flag)
    add_bench_command(commands, add_flag)
