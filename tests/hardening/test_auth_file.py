"""Issue 11, defect 3: a '#' inside a token is part of the token. Only a '#' at the start of
a line or after whitespace starts a comment in the tokens file. And defect 15's choice:
server reflection, like health, needs no token (it exposes only the public .proto schema)."""

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tandem.client import TandemClient, TandemRpcError
from tandem.server.api.auth import Role, TokenTable, Unauthenticated
from tests.api.conftest import loopback
from tests.api.harness import ServerThread

LOAD = "/tandem.v1.AdaptersService/LoadAdapter"


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_a_hash_inside_a_token_is_part_of_it(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# operators\nadmin hash#tail\ninference plain  # a trailing comment\n\t# indented comment\n")
    table = TokenTable.from_file(path)
    assert table.authorize(LOAD, bearer("hash#tail")) == Role.ADMIN
    with pytest.raises(Unauthenticated):
        table.authorize(LOAD, bearer("hash"))
    assert table.authorize("/tandem.v1.GenerationService/Generate", bearer("plain")) == Role.INFERENCE


def test_a_line_of_only_a_comment_after_the_role_is_still_an_error(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("admin #not-a-token\n")
    with pytest.raises(ValueError, match=r":1: expected '<inference\|admin> <token>'$"):
        TokenTable.from_file(path)


def test_a_tokens_file_that_cannot_be_read_is_named_with_its_flag(tmp_path):
    """`tandem serve --auth-tokens-file /typo` said only "[Errno 2] No such file or directory"."""
    with pytest.raises(ValueError, match=rf"^--auth-tokens-file {tmp_path / 'typo'} cannot be read: No such file or directory$"):
        TokenTable.from_file(tmp_path / "typo")


def test_reflection_and_health_need_no_token_and_the_api_does(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("inference secret-token\n")
    thread = ServerThread(loopback(auth_tokens_file=str(path)), None)
    try:
        with grpc.insecure_channel(thread.target) as channel:
            services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert {"tandem.v1.GenerationService", "tandem.v1.AdaptersService", "grpc.health.v1.Health"} <= set(services)
        with TandemClient(thread.target, max_retries=0) as anonymous:
            assert anonymous.health() == "SERVING"
            with pytest.raises(TandemRpcError) as info:
                anonymous.model_info()
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        thread.stop()
