"""Issue 11, defect 3: a '#' inside a token is part of the token. Only a '#' at the start of
a line or after whitespace starts a comment in the tokens file."""

import pytest

from server.api.auth import Role, TokenTable, Unauthenticated

LOAD = "/tandem.v1.Adapters/LoadAdapter"


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_a_hash_inside_a_token_is_part_of_it(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# operators\nadmin hash#tail\ninference plain  # a trailing comment\n\t# indented comment\n")
    table = TokenTable.from_file(path)
    assert table.authorize(LOAD, bearer("hash#tail")) == Role.ADMIN
    with pytest.raises(Unauthenticated):
        table.authorize(LOAD, bearer("hash"))
    assert table.authorize("/tandem.v1.Generation/Generate", bearer("plain")) == Role.INFERENCE


def test_a_line_of_only_a_comment_after_the_role_is_still_an_error(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("admin #not-a-token\n")
    with pytest.raises(ValueError, match=r":1: expected '<inference\|admin> <token>'$"):
        TokenTable.from_file(path)
