"""The API's pure pieces: token file, status mapping, adapter paths, request conversion."""

import grpc
import pytest

from tandem.server import errors
from tandem.server.api import convert
from tandem.server.adapters.registry import check_adapter_name, resolve_adapter_dir
from tandem.server.api.auth import PermissionDenied, Role, TokenTable, Unauthenticated
from tandem.server.api.status_mapping import status_for
from tandem.v1 import generation_pb2


def test_token_file_roles_and_errors(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# comment\ninference  reader-token\nadmin admin-token  # trailing comment\n")
    table = TokenTable.from_file(path)
    bearer = lambda t: {"authorization": f"Bearer {t}"}  # noqa: E731
    assert table.authorize("/tandem.v1.GenerationService/Generate", bearer("reader-token")) == Role.INFERENCE
    assert table.authorize("/tandem.v1.AdaptersService/LoadAdapter", bearer("admin-token")) == Role.ADMIN
    with pytest.raises(PermissionDenied, match="needs the admin role"):
        table.authorize("/tandem.v1.AdaptersService/LoadAdapter", bearer("reader-token"))
    with pytest.raises(Unauthenticated, match="missing bearer token"):
        table.authorize("/tandem.v1.GenerationService/Generate", {})
    with pytest.raises(Unauthenticated, match="unknown"):
        table.authorize("/tandem.v1.GenerationService/Generate", bearer("guess"))


def test_token_file_errors_never_show_the_token(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("superuser s3cret-value\n")
    with pytest.raises(ValueError) as info:
        TokenTable.from_file(path)
    assert ":1:" in str(info.value) and "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    "exc, code",
    [
        (errors.InvalidRequest("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotFound("x"), grpc.StatusCode.NOT_FOUND),
        (errors.IncompatibleAdapter("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.ResourceExhausted("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (Unauthenticated("x"), grpc.StatusCode.UNAUTHENTICATED),
        (PermissionDenied("x"), grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_domain_errors_map_to_their_codes(exc, code):
    assert status_for(exc, "rid") == (code, "x")


def test_bugs_become_internal_without_details():
    code, message = status_for(KeyError("secret internals"), "rid-7")
    assert code == grpc.StatusCode.INTERNAL
    assert "rid-7" in message and "secret" not in message


def test_adapter_paths_stay_inside_the_adapters_dir(tmp_path):
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "adapter_config.json").write_text("{}")
    assert resolve_adapter_dir(str(tmp_path), "ok", "") == tmp_path / "ok"
    assert resolve_adapter_dir(str(tmp_path), "alias", "ok") == tmp_path / "ok"
    with pytest.raises(errors.InvalidRequest, match="outside"):
        resolve_adapter_dir(str(tmp_path), "x", "../../etc")
    with pytest.raises(errors.InvalidRequest, match="single path component"):
        resolve_adapter_dir(str(tmp_path), "a/b", "")
    with pytest.raises(errors.NotFound, match="'missing' not found"):
        resolve_adapter_dir(str(tmp_path), "missing", "")
    with pytest.raises(errors.NotFound, match="--adapters-dir"):
        resolve_adapter_dir(None, "ok", "")


def test_an_adapter_name_holds_no_comma():
    """The metrics' lora_requests_info lists names comma-separated: "x,sql-expert" in flight
    read as this replica serving sql-expert. A refusal of the caller's (INVALID_ARGUMENT)."""
    for name in ("x,sql-expert", ",", "a,"):
        with pytest.raises(errors.InvalidRequest) as info:
            check_adapter_name(name)
        assert str(info.value) == f"adapter name must not contain ',' (the metrics list adapters comma-separated), got {name!r}"
        assert status_for(info.value, "rid")[0] == grpc.StatusCode.INVALID_ARGUMENT
    check_adapter_name("sql-expert_v2.1")


def test_proto_defaults_mean_unset():
    params = convert.sampling_params_of(generation_pb2.GenerateRequest(prompt="hi"))
    assert params.greedy and params.max_new_tokens == 256 and params.default_max_new_tokens  # capped by the context left
    assert not convert.sampling_params_of(generation_pb2.GenerateRequest(prompt="hi", max_new_tokens=8)).default_max_new_tokens
    assert (params.top_p, params.repetition_penalty, params.seed, params.logprobs) == (1.0, 1.0, None, None)
    explicit = convert.sampling_params_of(generation_pb2.GenerateRequest(prompt="hi", top_p=0.5, seed=0, logprobs=0))
    assert (explicit.top_p, explicit.seed, explicit.logprobs) == (0.5, 0, 0)


def test_float32_sampling_fields_read_as_the_decimals_sent():
    """1e-5 arrives as 9.99999975e-06 through the float32 field, under the greedy threshold
    that the OpenAI front (float64) compares the same 1e-5 against."""
    request = generation_pb2.GenerateRequest(
        prompt="hi", temperature=1e-5, top_p=0.9, min_p=0.05, repetition_penalty=1.1, presence_penalty=-0.3, frequency_penalty=0.7
    )
    params = convert.sampling_params_of(request)
    assert not params.greedy
    assert (params.temperature, params.top_p, params.min_p, params.repetition_penalty) == (1e-5, 0.9, 0.05, 1.1)
    assert (params.presence_penalty, params.frequency_penalty) == (-0.3, 0.7)
