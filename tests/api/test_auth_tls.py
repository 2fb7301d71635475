"""Bearer-token roles, and TLS / mutual TLS, against real servers."""

import asyncio
import logging
from collections.abc import Iterator

import grpc
import pytest

from tandem.client import TandemClient, TandemRpcError
from tandem.server.cli import main
from tests.api.conftest import loopback
from tests.api.harness import ServerThread

INFERENCE_TOKEN = "inference-token-4f1c9e"
ADMIN_TOKEN = "admin-token-8d2b7a"


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(TandemRpcError) as info:
        call()
    return info.value.code


@pytest.fixture(scope="module")
def auth_server(tiny_engine, tmp_path_factory) -> Iterator[ServerThread]:
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text(f"inference {INFERENCE_TOKEN}\nadmin {ADMIN_TOKEN}\n")
    thread = ServerThread(loopback(auth_tokens_file=str(tokens)), tiny_engine)
    yield thread
    thread.stop()


def test_calls_without_a_valid_token_are_unauthenticated(auth_server):
    with TandemClient(auth_server.target) as anonymous:
        assert code_of(lambda: anonymous.generate("hi", max_new_tokens=1)) == grpc.StatusCode.UNAUTHENTICATED
        assert anonymous.health() == "SERVING"  # probes send no token
        assert anonymous.health("tandem.v1.GenerationService") == "SERVING"
    with TandemClient(auth_server.target, token="wrong") as stranger:
        assert code_of(lambda: stranger.list_adapters()) == grpc.StatusCode.UNAUTHENTICATED


def test_roles(auth_server):
    with TandemClient(auth_server.target, token=INFERENCE_TOKEN) as user:
        assert user.generate("hi", max_new_tokens=2).generated_tokens == 2
        assert user.list_adapters() == []
        assert code_of(lambda: user.load_adapter("x")) == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(lambda: user.unload_adapter("x")) == grpc.StatusCode.PERMISSION_DENIED
    with TandemClient(auth_server.target, token=ADMIN_TOKEN) as admin:
        assert admin.generate("hi", max_new_tokens=1).generated_tokens == 1
        assert code_of(lambda: admin.unload_adapter("x")) == grpc.StatusCode.NOT_FOUND  # past auth


def test_a_token_with_a_trailing_newline_is_sent_without_it(auth_server, capsys, monkeypatch):
    """A token that came with its file's newline (TANDEM_TOKEN, --token, the library's token=)
    failed every call with INTERNAL "Invalid metadata": only --token-file's was stripped."""
    with TandemClient(auth_server.target, token=f" {INFERENCE_TOKEN}\n") as user:
        assert user.list_adapters() == []
    monkeypatch.setenv("TANDEM_TOKEN", f"{INFERENCE_TOKEN}\n")
    assert main(["adapters", "list", "--target", auth_server.target]) == 0, capsys.readouterr().err
    with pytest.raises(ValueError, match="whitespace inside"):
        TandemClient(auth_server.target, token=f"{INFERENCE_TOKEN} {ADMIN_TOKEN}")


def test_tokens_never_reach_the_logs(auth_server, caplog):
    caplog.set_level(logging.DEBUG)
    for token in (INFERENCE_TOKEN, ADMIN_TOKEN, "wrong-token-123"):
        with TandemClient(auth_server.target, token=token) as client:
            try:
                client.generate("hi", max_new_tokens=1)
            except TandemRpcError:
                pass
    logged = " ".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records)
    assert "Generate" in logged
    assert not any(t in logged for t in (INFERENCE_TOKEN, ADMIN_TOKEN, "wrong-token-123"))


def test_tls(tiny_engine, certs):
    thread = ServerThread(loopback(tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key")), tiny_engine)
    try:
        with TandemClient(thread.target, ca_cert=str(certs / "ca.pem")) as client:
            assert client.generate("hi", max_new_tokens=2).generated_tokens == 2
        with TandemClient(thread.target, max_retries=0, timeout=5) as plaintext:
            assert code_of(lambda: plaintext.model_info()) == grpc.StatusCode.UNAVAILABLE
    finally:
        thread.stop()


def test_mutual_tls(tiny_engine, certs):
    config = loopback(
        tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key"), tls_client_ca=str(certs / "ca.pem"), http_port=None
    )
    thread = ServerThread(config, tiny_engine)
    try:
        ca = str(certs / "ca.pem")
        with TandemClient(thread.target, ca_cert=ca, client_cert=str(certs / "client.pem"), client_key=str(certs / "client.key")) as client:
            assert client.generate("hi", max_new_tokens=2).generated_tokens == 2
        with TandemClient(thread.target, ca_cert=ca, max_retries=0, timeout=5) as no_cert:
            assert code_of(lambda: no_cert.model_info()) == grpc.StatusCode.UNAVAILABLE
        # The TLS component's probes present the server's own certificate (they had none:
        # with mutual TLS every probe failed and no pod got ready).
        own = dict(ca_cert=ca, client_cert=str(certs / "server.pem"), client_key=str(certs / "server.key"))
        with TandemClient(thread.target, **own) as probe:
            assert probe.health("tandem.v1.GenerationService") == "SERVING"
    finally:
        thread.stop()


@pytest.mark.parametrize("broken", ["swapped", "garbled", "client-ca"])
def test_bad_tls_files_are_named_not_read_as_a_busy_port(certs, tmp_path, broken):
    """gRPC refuses them only by failing to bind: the server said another process used the port."""
    files = dict(tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key"))
    if broken == "swapped":
        files = dict(tls_cert=str(certs / "server.key"), tls_key=str(certs / "server.pem"))
    elif broken == "garbled":
        (tmp_path / "cert.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
        files["tls_cert"] = str(tmp_path / "cert.pem")
    else:
        (tmp_path / "ca.pem").write_text("not a CA\n")
        files["tls_client_ca"] = str(tmp_path / "ca.pem")
    with pytest.raises(ValueError, match="--tls-client-ca .* is not a PEM CA bundle" if broken == "client-ca" else "--tls-cert .* are not a PEM certificate chain and its private key"):
        asyncio.run(_built(loopback(**files, http_port=None)))  # built inside a loop, as serve builds it


async def _built(config) -> None:
    from tandem.server.api.grpc_server import build_server

    build_server(config)


@pytest.mark.parametrize("missing", ["tls_cert", "tls_key", "tls_client_ca"])
def test_a_missing_tls_file_is_named_with_its_flag(certs, tmp_path, missing):
    """It failed with OSError's "[Errno 2] No such file or directory", naming neither."""
    files = dict(tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key"), tls_client_ca=str(certs / "ca.pem"))
    files[missing] = str(tmp_path / "absent.pem")
    flag = "--" + missing.replace("_", "-")
    with pytest.raises(ValueError, match=f"^{flag} {tmp_path / 'absent.pem'} cannot be read: No such file or directory$"):
        asyncio.run(_built(loopback(**files, http_port=None)))


def test_tls_with_the_http_front_on_warns_that_http_is_plaintext(certs, caplog):
    tls = dict(tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key"))
    for http_port, warned in ((0, True), (None, False)):
        caplog.clear()
        ServerThread(loopback(**tls, http_port=http_port), None).stop()
        assert ("TLS covers the gRPC port only: the HTTP front is plaintext" in caplog.text) is warned
