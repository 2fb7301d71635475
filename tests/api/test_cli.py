"""The `tandem` command against a real server: output, exit codes, env twins, --help."""

import io
import json
import logging
import os
import time

import grpc
import pytest
import torch

from tandem.client.errors import TandemRpcError
from tandem.client.sync_client import TandemClient
from tandem.client.types import StreamChunk
from tandem.server.cli import ENGINE_FLAGS, SERVER_FLAGS, build_parser, env_name, main
from tandem.server.config import EngineConfig, ServerConfig


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_streams_and_reports(server, capsys):
    code, out, err = run(capsys, "generate", "Hello", "--max-new-tokens", "4", "--target", server.target)
    assert code == 0 and out.strip()
    assert "[length; " in err and "4 generated" in err


def test_a_generation_the_server_aborted_exits_as_unavailable(capsys, monkeypatch):
    """A draining server ends a generation with finish reason abort and status OK: a script
    took the cut-short text for an answer (exit 0)."""
    chunks = [
        StreamChunk(text="Par", token_ids=[1], finish_reason=None, prompt_tokens=3, generated_tokens=1, logprobs=[]),
        StreamChunk(text="", token_ids=[], finish_reason="abort", prompt_tokens=3, generated_tokens=1, logprobs=[]),
    ]
    monkeypatch.setattr(TandemClient, "stream", lambda self, **kwargs: iter(chunks))
    code, out, err = run(capsys, "generate", "hi", "--target", "127.0.0.1:1")
    assert code == 10 + 14 and out == "Par\n"
    assert "[abort; 3 prompt + 1 generated tokens]" in err and "the server aborted the generation" in err


def test_generate_json(server, capsys):
    code, out, _ = run(capsys, "generate", "Hello", "--max-new-tokens", "3", "--json", "--seed", "1", "--target", server.target)
    result = json.loads(out)
    assert code == 0 and result["generated_tokens"] == 3 and result["seed"] == 1


def test_generate_chat_renders_the_prompt_as_a_user_message(server, capsys):
    code, out, _ = run(capsys, "generate", "Hello", "--chat", "--max-new-tokens", "2", "--json", "--target", server.target)
    plain = json.loads(run(capsys, "generate", "Hello", "--max-new-tokens", "2", "--json", "--target", server.target)[1])
    # The chat template wraps "Hello" in role markers: many more prompt tokens than the bare word.
    assert code == 0 and json.loads(out)["prompt_tokens"] > plain["prompt_tokens"] + 5


def test_target_from_the_environment(server, capsys, monkeypatch):
    monkeypatch.setenv("TANDEM_TARGET", server.target)
    code, out, _ = run(capsys, "model", "--json")
    assert code == 0 and json.loads(out)["max_model_len"] == 512


def test_health_adapters_and_chat(server, capsys, monkeypatch):
    assert run(capsys, "health", "--service", "tandem.v1.GenerationService", "--target", server.target)[:2] == (0, "SERVING\n")
    code, out, _ = run(capsys, "adapters", "list", "--json", "--target", server.target)
    assert code == 0 and json.loads(out) == []
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi!\nAnd again?\n/exit\n"))
    code, out, _ = run(capsys, "chat", "--max-new-tokens", "3", "--target", server.target)
    assert code == 0 and len(out.strip().splitlines()) >= 1


def test_a_failed_chat_turn_is_reported_and_the_session_goes_on(server, capsys, monkeypatch):
    """A failed turn (a history past the context, a mistyped adapter) ended the session with
    its exit status: the conversation was lost and /reset could never be typed."""
    stream, sent = TandemClient.stream, []

    def first_turn_fails(self, **kwargs):
        sent.append([m["content"] for m in kwargs["messages"]])
        if len(sent) == 1:
            raise TandemRpcError(grpc.StatusCode.INVALID_ARGUMENT, "the prompt is longer than the context")
        return stream(self, **kwargs)

    monkeypatch.setattr(TandemClient, "stream", first_turn_fails)
    monkeypatch.setattr("sys.stdin", io.StringIO("too long\nHi!\n/exit\n"))
    code, out, err = run(capsys, "chat", "--max-new-tokens", "3", "--target", server.target)
    assert code == 0 and "INVALID_ARGUMENT: the prompt is longer than the context" in err
    assert sent == [["too long"], ["Hi!"]] and out.strip()


def test_a_chat_whose_credentials_fail_ends_with_their_status(server, capsys, monkeypatch):
    def refused(self, **kwargs):
        raise TandemRpcError(grpc.StatusCode.UNAUTHENTICATED, "missing bearer token")

    monkeypatch.setattr(TandemClient, "stream", refused)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi!\nAgain\n/exit\n"))
    code, _, err = run(capsys, "chat", "--target", server.target)
    assert code == 10 + grpc.StatusCode.UNAUTHENTICATED.value[0] and err.count("UNAUTHENTICATED") == 1


def test_errors_have_readable_messages_and_scriptable_exit_codes(server, capsys):
    code, _, err = run(capsys, "generate", "hi", "--adapter", "nope", "--target", server.target)
    assert code == 10 + 5 and "NOT_FOUND" in err and "nope" in err and "request id" in err
    code, _, err = run(capsys, "generate", "hi", "--temperature", "-1", "--target", server.target)
    assert code == 10 + 3 and "temperature" in err
    code, out, _ = run(capsys, "health", "--target", "127.0.0.1:1", "--timeout", "1")
    assert code == 1 and out.strip() != "SERVING"


def test_health_waits_only_for_a_server_not_up_yet(server, capsys):
    """A mistyped --service (NOT_FOUND), like a missing token, will not pass by waiting: --wait
    polled until it ran out, then printed only the code name, exit 1."""
    started = time.monotonic()
    code, out, err = run(capsys, "health", "--service", "tandem.v1.Mistyped", "--wait", "5", "--target", server.target)
    assert code == 10 + 5 and out == "" and "NOT_FOUND" in err and time.monotonic() - started < 4
    code, out, err = run(capsys, "health", "--service", "tandem.v1.GenerationService", "--wait", "5", "--target", server.target)
    assert (code, out) == (0, "SERVING\n")
    # Not up yet when the wait ran out: the status on stdout, exit 1, and gRPC's words on stderr.
    code, out, err = run(capsys, "health", "--wait", "0.5", "--timeout", "1", "--target", "127.0.0.1:1")
    assert (code, out) == (1, "UNAVAILABLE\n") and "tandem: UNAVAILABLE: " in err


def test_adapters_merge_refuses_an_adapter_named_twice(capsys):
    """--weights 1 2 for `a a` became {"a": 2}: a merge of one adapter at the last weight."""
    for weights in (["--weights", "1", "2"], []):
        code, _, err = run(capsys, "adapters", "merge", "out", "a", "a", "--method", "linear", *weights, "--target", "127.0.0.1:1")
        assert code == 2 and "adapter 'a' is named twice" in err


def test_generate_refuses_a_mixture_that_names_an_adapter_twice(capsys):
    """--adapter a=0.5,a=0.5 became {"a": 0.5}: half the weight the caller gave, sent without a word."""
    with pytest.raises(SystemExit) as info:
        main(["generate", "hi", "--adapter", "a=0.5,a=0.5", "--target", "127.0.0.1:1"])
    assert info.value.code == 2 and "names each adapter once" in capsys.readouterr().err


def test_a_reader_that_leaves_early_ends_the_command_quietly(capsys, monkeypatch):
    """`tandem generate ... | head -c 100`: "[Errno 32] Broken pipe" on stderr and exit 1."""
    chunk = StreamChunk(text="Paris", token_ids=[1], finish_reason=None, prompt_tokens=3, generated_tokens=1, logprobs=[])
    monkeypatch.setattr(TandemClient, "stream", lambda self, **kwargs: iter([chunk]))
    read, write = os.pipe()
    os.close(read)
    with open(write, "w") as stdout:
        monkeypatch.setattr("sys.stdout", stdout)
        code, _, err = run(capsys, "generate", "hi", "--target", "127.0.0.1:1")
        assert (code, err) == (0, "")
        print("after", file=stdout, flush=True)  # stdout now goes nowhere: the exit's flush cannot fail


def test_serve_help_documents_every_flag_and_its_env_twin(capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag, _, _ in ENGINE_FLAGS + SERVER_FLAGS:
        assert flag in text and env_name(flag) in text.replace("- ", "-"), flag


@pytest.mark.parametrize(
    ("command", "variable", "value", "why"),
    [
        ("model", "TANDEM_TIMEOUT", "soon", "is not valid: expected a number > 0 (inf: no limit), got 'soon'"),
        ("model", "TANDEM_TIMEOUT", "0", "is not valid: expected a number > 0 (inf: no limit), got '0'"),
        ("serve", "TANDEM_ADAPTER_CACHE_PREFAULT", "maybe", "is not a valid boolean"),
    ],
)
def test_a_bad_environment_value_exits_2_with_its_name(capsys, monkeypatch, command, variable, value, why):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as info:
        main([command])
    assert info.value.code == 2
    assert f"tandem: error: {variable}={value!r} {why}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [([], None, True), (["--adapter-cache-prefault", "false"], None, False), ([], "No", False), (["--adapter-cache-prefault", "on"], "0", True)],
)
def test_the_adapter_cache_prefault_switch_reads_words_from_the_flag_or_its_twin(monkeypatch, argv, env, expected):
    if env is not None:
        monkeypatch.setenv("TANDEM_ADAPTER_CACHE_PREFAULT", env)
    assert build_parser().parse_args(["serve", *argv]).adapter_cache_prefault is expected



@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--num-threads", "-1", "num_threads must be positive, got -1"),
        ("--num-threads", "0", "num_threads must be positive, got 0"),
        ("--log-level", "verbose", "log_level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'verbose'"),
        ("--max-message-bytes", "3000000000", "max_message_bytes must be in [1, 2147483647] (gRPC's limit), got 3000000000"),
        ("--drain-grace-seconds", "nan", "drain_grace_seconds must be >= 0, got nan"),
        # Empty was "unset" to the server: authentication off, every call admin.
        ("--auth-tokens-file", "", "auth_tokens_file is empty (--auth-tokens-file '' or TANDEM_AUTH_TOKENS_FILE= set to nothing)"),
        ("--tls-client-ca", "", "tls_client_ca is empty"),
        ("--adapters-dir", "", "adapters_dir is empty"),
        # It failed at start saying "is another process using it?" of its own other listener.
        ("--metrics-port", "50051", "port 50051, metrics_port 50051 and http_port 8000 must differ"),
    ],
)
def test_a_serve_value_that_cannot_work_exits_2_before_anything_starts(capsys, flag, value, message):
    """Each was accepted and then crashed with a traceback after "listening", or (a NaN
    grace) aborted every generation in flight at the first SIGTERM."""
    assert main(["serve", flag, value]) == 2
    assert capsys.readouterr().err.startswith(f"tandem serve: error: {message}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a host without CUDA")
def test_cuda_asked_for_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="device cuda asked for, but this torch has no CUDA or sees no GPU: use --device cpu or auto"):
        EngineConfig(device="cuda").resolve_device()


@pytest.mark.parametrize("device", ["cuda:abc", "cuda:", "cuda:-1", "cuda:1x", "cuda:0:1"])
def test_a_malformed_cuda_device_is_refused_before_anything_starts(device):
    """cuda:abc passed and failed in torch after the server was listening, with a traceback."""
    with pytest.raises(ValueError, match=rf"^device must be auto, cpu or cuda\[:N\], got '{device}'$"):
        EngineConfig(device=device)


def test_a_gpu_index_the_host_lacks_names_the_flag_and_the_gpu_count(monkeypatch):
    """cuda:1 on a one-GPU host failed at the first allocation ("invalid device ordinal")."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"^--device cuda:1: this host sees 1 GPU\(s\), so N in cuda:N must be below 1$"):
        EngineConfig(device="cuda:1").resolve_device()
    assert EngineConfig(device="cuda:0").resolve_device() == torch.device("cuda:0")
    assert EngineConfig(device="cuda").resolve_device() == torch.device("cuda")


def test_mutual_tls_beside_an_http_front_without_tokens_is_refused(capsys):
    """Client certificates guard the gRPC port only: the plaintext HTTP front served anyone."""
    tls = dict(tls_cert="server.pem", tls_key="server.key", tls_client_ca="ca.pem")
    with pytest.raises(ValueError, match="^--tls-client-ca .* would serve anyone; turn it off with --http-port off, or require tokens with --auth-tokens-file$"):
        ServerConfig(**tls)
    ServerConfig(**tls, http_port=None)
    ServerConfig(**tls, auth_tokens_file="tokens")
    ServerConfig(tls_cert="server.pem", tls_key="server.key")  # no client certificates: no access control to bypass
    assert main(["serve", *(f"--{k.replace('_', '-')}={v}" for k, v in tls.items())]) == 2
    assert "--http-port 8000) would serve anyone" in capsys.readouterr().err


def test_an_adapters_dir_that_is_a_file_is_refused_and_a_missing_one_is_not(tmp_path):
    """A file served nothing, every request NOT_FOUND; a missing directory may be a volume still being filled."""
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=f"^--adapters-dir {tmp_path / 'file'} is not a directory"):
        EngineConfig(adapters_dir=str(tmp_path / "file"))
    EngineConfig(adapters_dir=str(tmp_path / "not-yet"))


def test_a_data_dir_that_is_a_file_is_refused_before_the_model_loads(tmp_path):
    """It failed after the whole load, a bare OSError naming no flag."""
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=f"^--data-dir {tmp_path / 'file'} is not a directory"):
        EngineConfig(data_dir=str(tmp_path / "file"), adapters_dir=str(tmp_path))


def test_a_start_up_failure_is_a_json_log_line_with_json_logs(capsys, tmp_path):
    """It was a plain print in the JSON stream, which log collectors failed to parse."""
    missing = str(tmp_path / "absent.pem")
    argv = ["serve", "--log-format", "json", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--http-port", "off",
            "--tls-cert", missing, "--tls-key", missing]
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        assert main(argv) == 1
    finally:  # serve configured the process's logging: pytest's handlers back
        root.handlers[:] = handlers
        root.setLevel(level)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert any(
        line["level"] == "error" and line["msg"] == f"cannot start: --tls-cert {missing} cannot be read: No such file or directory" for line in lines
    ), lines


def test_a_message_over_the_clients_limit_names_the_flag_that_raises_it(server, capsys):
    """The client's limit was gRPC's fixed 4 MiB: a server started with a larger
    --max-message-bytes still could not be sent a larger dataset or prompt."""
    prompt = "x" * (5 << 20)
    code, _, err = run(capsys, "generate", prompt, "--target", server.target)
    assert code == 10 + 8 and "Sent message larger than max" in err and "raise --max-message-bytes" in err
    code, _, err = run(capsys, "generate", prompt, "--target", server.target, "--max-message-bytes", str(8 << 20))
    assert code == 10 + 8 and "Sent message larger than max" not in err  # sent: this server's own limit is 4 MiB


def test_an_empty_auth_tokens_file_in_the_environment_is_refused(capsys, monkeypatch):
    """An env file's `TANDEM_AUTH_TOKENS_FILE=` served every call as admin."""
    monkeypatch.setenv("TANDEM_AUTH_TOKENS_FILE", "")
    assert main(["serve"]) == 2
    assert "auth_tokens_file is empty" in capsys.readouterr().err


def test_help_hides_the_token_and_takes_a_percent_sign(capsys, monkeypatch):
    """The token from the environment was printed in --help (into CI logs), and a % in any
    environment value made --help a traceback."""
    monkeypatch.setenv("TANDEM_TOKEN", "s3cret%token")
    monkeypatch.setenv("TANDEM_TARGET", "host:1%2")
    with pytest.raises(SystemExit) as info:
        main(["generate", "--help"])
    out = capsys.readouterr().out
    out = " ".join(out.split())
    assert info.value.code == 0 and "s3cret" not in out and "set, not shown" in out and "host:1%2" in out, out


@pytest.mark.parametrize(("variable", "flag"), [("TANDEM_TOKEN_FILE", "--token-file"), ("TANDEM_CA_CERT", "--ca-cert")])
def test_a_blank_file_variable_is_a_usage_error(capsys, monkeypatch, variable, flag):
    """TANDEM_TOKEN_FILE= sent no token, TANDEM_CA_CERT= turned TLS on, without a word."""
    monkeypatch.setenv(variable, "")
    with pytest.raises(SystemExit) as info:
        main(["model", "--target", "127.0.0.1:1"])
    assert info.value.code == 2 and f"{flag} is empty ({variable} set blank?)" in capsys.readouterr().err


def test_half_a_client_certificate_is_a_usage_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["model", "--target", "127.0.0.1:1", "--client-cert", str(tmp_path / "c.pem")])
    assert info.value.code == 2 and "--client-cert and --client-key go together" in capsys.readouterr().err


def test_a_token_on_the_command_line_beats_a_token_file_from_the_environment(monkeypatch, tmp_path):
    from tandem.client.cli_connection import connection_settings
    from tandem.client.connection import ConnectionSettings

    (tmp_path / "ci-token").write_text("from-ci\n")
    monkeypatch.setenv("TANDEM_TOKEN_FILE", str(tmp_path / "ci-token"))
    token = lambda *argv: ConnectionSettings(**connection_settings(build_parser("model").parse_args(["model", *argv]))).token  # noqa: E731
    assert token() == "from-ci"
    assert token("--token", "admin") == "admin"
    (tmp_path / "mine").write_text("mine")
    assert token("--token", "admin", "--token-file", str(tmp_path / "mine")) == "mine"  # both typed: the file, as before


@pytest.mark.parametrize("flags", [[], ["--port", "1"]])
def test_serve_on_a_client_install_beside_torch_prints_the_install_hint(capsys, monkeypatch, flags):
    """With a flag, argparse said "unrecognized arguments": without the server serve has none."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else find_spec(name, *a))
    assert main(["serve", *flags]) == 1
    assert "install the server with: pip install 'tandem[server]'" in capsys.readouterr().err
