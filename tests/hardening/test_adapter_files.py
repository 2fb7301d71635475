"""Issue 11, defects 4, 7, 12 and 15: whatever an adapter folder or an adapter name holds, the
caller gets INVALID_ARGUMENT or FAILED_PRECONDITION with the reason, never INTERNAL; PEFT's
regexes cannot stall the server; no file outside an adapter's folder is read and no error
message quotes a file's bytes; safetensors files whose tensors overlap, leave gaps or sit
misaligned are refused."""

import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from tandem.client import TandemClient, TandemRpcError
from tandem.server.adapters.patterns import NotSimple, pattern_cost
from tandem.server.adapters.peft_format import CONFIG_FILE, max_file_bytes, read_adapter
from tandem.server.adapters.registry import resolve_adapter_dir
from tandem.server.errors import IncompatibleAdapter, InvalidRequest
from tests.adapters.make_adapters import edit_config, make_adapter, weights_file
from tests.api.conftest import loopback, start_engine
from tests.api.harness import ServerThread

CONFIG = "adapter_config.json"
Q = "model.layers.0.self_attn.q_proj"
A_KEY = f"base_model.model.{Q}.lora_A.weight"
B_KEY = f"base_model.model.{Q}.lora_B.weight"
SECRET = "SECRET-d41d8cd98f00"


def refusal(path: Path, base, cls: type[Exception] = IncompatibleAdapter) -> str:
    with pytest.raises(cls) as info:
        read_adapter("x", path, base, 8)
    assert type(info.value) is cls
    return str(info.value)


def write_safetensors(path: Path, header: object, data: bytes = b"") -> None:
    """A safetensors file with any header (raw bytes are written as they are)."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def f32(*offsets_and_shapes: tuple[str, int, int, list[int]]) -> dict:
    return {key: {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]} for key, begin, end, shape, dtype in offsets_and_shapes}


# Defect 4: inputs that gave INTERNAL.


@pytest.mark.parametrize(
    "name, path, reason",
    [
        ("a\0b", "", "adapter name must not contain a NUL character"),
        ("a" * 256, "", "adapter name is too long: 256 bytes where the file system allows 255"),
        ("é" * 128, "", "adapter name is too long: 256 bytes where the file system allows 255"),
        ("x", "dir/\0", "path must not contain a NUL character"),
        ("x", "b" * 300, "path is too long: 300 bytes where the file system allows 255"),
    ],
    ids=["nul-name", "long-name", "long-utf8-name", "nul-path", "long-path-part"],
)
def test_names_the_file_system_refuses_are_invalid(tmp_path, name, path, reason):
    with pytest.raises(InvalidRequest) as info:
        resolve_adapter_dir(tmp_path, name, path)
    assert str(info.value) == reason


def test_a_path_too_long_for_the_file_system_is_invalid(tmp_path):
    with pytest.raises(InvalidRequest, match=r"^path is too long: \d+ bytes where the file system allows 4095$"):
        resolve_adapter_dir(tmp_path, "x", "d/" * 3000)


@pytest.mark.parametrize(
    "config, reason",
    [
        ([1, 2], "has an unreadable adapter_config.json: it holds an array, not a JSON object"),
        (7, "has an unreadable adapter_config.json: it holds a number, not a JSON object"),
        ("LORA", "has an unreadable adapter_config.json: it holds a string, not a JSON object"),
    ],
    ids=["list", "number", "string"],
)
def test_a_config_that_is_not_an_object_is_refused(adapter, base, config, reason):
    (adapter / CONFIG).write_text(json.dumps(config))
    assert refusal(adapter, base) == f"adapter 'x' {reason}"


def test_deeply_nested_json_is_refused(adapter, base, template):
    (adapter / CONFIG).write_text('{"r": 4, "lora_alpha": 8, "extra": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert refusal(adapter, base) == (
        "adapter 'x' has an unreadable adapter_config.json: it holds a number too long or nesting too deep to read"
    )
    shutil.copy(template / CONFIG, adapter / CONFIG)
    write_safetensors(weights_file(adapter), b"[" * 100_000 + b"]" * 100_000)
    assert refusal(adapter, base) == (
        "adapter 'x' has a corrupt adapter_model.safetensors: its header: it holds a number too long or nesting too deep to read"
    )


@pytest.mark.parametrize(
    "fields, reason",
    [
        (dict(r="8"), "has r '8'; a LoRA rank is an integer of at least 1"),
        (dict(r=0), "has r 0; a LoRA rank is an integer of at least 1"),
        (dict(r=-4), "has r -4; a LoRA rank is an integer of at least 1"),
        (dict(r=4.5), "has r 4.5; a LoRA rank is an integer of at least 1"),
        (dict(r=[4]), "has r [4]; a LoRA rank is an integer of at least 1"),
        (dict(lora_alpha={"q": 1}), f"has lora_alpha an object for {Q}; it must be a finite number"),
        (dict(lora_alpha="x" * 100), f"has lora_alpha a string for {Q}; it must be a finite number"),
        (dict(alpha_pattern=["q_proj"]), "has alpha_pattern ['q_proj']; it must be an object of at most 1024 pattern keys"),
        (dict(rank_pattern="q_proj"), "has rank_pattern 'q_proj'; it must be an object of at most 1024 pattern keys"),
        (dict(rank_pattern={"q_proj": 0}), "has rank_pattern key 'q_proj' with a rank that is not an integer of at least 1"),
        (dict(rank_pattern={"q_proj": "4"}), "has rank_pattern key 'q_proj' with a rank that is not an integer of at least 1"),
        (dict(peft_type=["LORA"]), "is a non-LoRA (an array) adapter; only LoRA is served"),
        (dict(bias={"x": 1}), "trains biases (bias=an object), which Tandem does not serve"),
    ],
    ids=[
        "string-r", "rank-0", "negative-r", "float-r", "list-r", "object-alpha", "long-string-alpha",
        "list-alpha-pattern", "string-rank-pattern", "rank-pattern-0", "rank-pattern-string", "list-peft-type", "object-bias",
    ],
)
def test_malformed_config_fields_are_refused_with_the_reason(adapter, base, fields, reason):
    edit_config(adapter, **fields)
    assert refusal(adapter, base) == f"adapter 'x' {reason}"


@pytest.mark.parametrize(
    "header, reason",
    [
        ([], "its header: it holds an array, not a JSON object"),
        (12, "its header: it holds a number, not a JSON object"),
        ("tensors", "its header: it holds a string, not a JSON object"),
        ({A_KEY: [1, 2]}, f"tensor {A_KEY!r} is described by an array, not an object"),
        ({A_KEY: {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, f"tensor {A_KEY!r} has dtype ['F32']; adapters must be F32, F16, BF16 or F64"),
        ({A_KEY: {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, f"tensor {A_KEY!r} needs a shape and data_offsets [begin, end] of non-negative integers"),
        ({A_KEY: {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, f"tensor {A_KEY!r} needs a shape and data_offsets [begin, end] of non-negative integers"),
        ({A_KEY: {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, f"tensor {A_KEY!r} needs a shape and data_offsets [begin, end] of non-negative integers"),
        ({A_KEY: {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, f"tensor {A_KEY!r} needs a shape and data_offsets [begin, end] of non-negative integers"),
        # A million dimensions near 2^40 held the GIL for half an hour multiplying them out.
        ({A_KEY: {"dtype": "F32", "shape": [(1 << 40) - 1] * 10000, "data_offsets": [0, 4]}}, f"tensor {A_KEY!r} has 10000 dimensions; an adapter's tensors have at most 4"),
        ({A_KEY: {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 4]}}, f"tensor {A_KEY!r} has a dimension of 1099511627776, more than any adapter has"),
        # Empty, but with strides past torch's int64: INTERNAL.
        ({A_KEY: {"dtype": "F32", "shape": [0, 1 << 39, 1 << 39], "data_offsets": [0, 0]}}, f"tensor {A_KEY!r} has a shape [0, 549755813888, 549755813888] past any adapter's"),
    ],
    ids=["list", "number", "string", "entry-list", "dtype-list", "bool-dim", "negative-dim", "one-offset", "reversed-offsets",
         "many-dims", "huge-dim", "empty-huge-strides"],
)
def test_malformed_safetensors_headers_are_refused_with_the_reason(adapter, base, header, reason):
    write_safetensors(weights_file(adapter), header, bytes(4))
    assert refusal(adapter, base) == f"adapter 'x' has a corrupt adapter_model.safetensors: {reason}"


def test_a_weights_file_larger_than_any_adapter_of_the_base_is_refused_before_memory_is_taken(adapter, base):
    """A sparse 100 GB file was read into memory (after the host cache was emptied for it)."""
    os.truncate(weights_file(adapter), 100 << 30)
    taken = []
    with pytest.raises(IncompatibleAdapter) as info:
        read_adapter("x", adapter, base, 8, buffer=lambda n: taken.append(n) or bytearray(n))
    limit = max_file_bytes(base, 8)
    assert str(info.value) == (
        "adapter 'x' has an unreadable adapter_model.safetensors: it is 107,374,182,400 bytes, more than a file of its kind "
        f"holds for this base model ({limit:,})"
    )
    assert not taken and limit < 32 << 20


def test_a_config_file_of_megabytes_is_refused_unread(adapter, base):
    config = adapter / CONFIG_FILE
    config.write_text(config.read_text() + " " * (2 << 20))
    assert refusal(adapter, base) == "adapter 'x' has an unreadable adapter_config.json: it holds more than 1,048,576 bytes: not a config file"


def test_rank_0_tensors_are_refused(adapter, base):
    write_safetensors(weights_file(adapter), f32((A_KEY, 0, 0, [0, 64], "F32"), (B_KEY, 0, 0, [64, 0], "F32")))
    assert refusal(adapter, base) == f"adapter 'x' has rank 0 on {Q}; a LoRA rank is at least 1"


# With layers_to_transform, the check that the config targets the module read the index first.
@pytest.mark.parametrize("layers", [None, [0, 1]], ids=["all-layers", "layers_to_transform"])
def test_a_layer_index_of_thousands_of_digits_is_refused(adapter, base, layers):
    if layers is not None:
        edit_config(adapter, layers_to_transform=layers)
    tensors = load_file(weights_file(adapter))
    huge = "7" * 5000
    save_file({k.replace("layers.0.", f"layers.{huge}."): v.clone() for k, v in tensors.items()}, weights_file(adapter))
    assert refusal(adapter, base) == "adapter 'x' targets layer index of 5000 digits; the base model has 2 layers"


# Defect 7: PEFT's regexes.

CATASTROPHIC = ["(a+)+$", "(.*a){20}", "(a|aa)+$", "(x+x+)+y", "^(a?){30}a{30}$", "a?" * 25 + "a" * 25]


@pytest.mark.parametrize("pattern", CATASTROPHIC)
@pytest.mark.parametrize("field", ["alpha_pattern", "rank_pattern", "target_modules"])
def test_catastrophic_patterns_are_refused_within_milliseconds(adapter, base, field, pattern):
    edit_config(adapter, **{field: pattern if field == "target_modules" else {pattern: 8}})
    started = time.perf_counter()
    reason = refusal(adapter, base)
    # The whole read, with room for a slow host: matching these would take hours.
    assert time.perf_counter() - started < 5
    label = field if field == "target_modules" else f"{field} key"
    assert reason.startswith(f"adapter 'x' has {label} ")
    assert ", which repeats a group" in reason or ", which could backtrack " in reason


@pytest.mark.parametrize(
    "pattern, problem",
    [
        ("(a+)+$", "repeats a group at position 4 (only ? may follow a group)"),
        ("(.*a){20}", "repeats a group at position 5 (only ? may follow a group)"),
        (r"(q)\1", r"uses the escape \1 at position 3 (no backreferences or character codes)"),
        ("(?P<m>q)_proj", "uses (?...) at position 0 (only (?:...) groups and lookarounds: no names or flags)"),
        ("(?i)q_proj", "uses (?...) at position 0 (only (?:...) groups and lookarounds: no names or flags)"),
        (".*.*.*.*x", "could backtrack 16777216 ways on a module name, more than 262144 (each *, + or {m,} counts 64, ? 2, "
                      "a group its alternatives): use fewer quantifiers"),
        ("q_proj" * 50, "has 300 characters, more than 256"),
        ("q_proj)", "is not a valid regular expression (unbalanced parenthesis at position 6)"),
    ],
)
def test_patterns_that_are_not_simple_say_why(pattern, problem):
    with pytest.raises(NotSimple) as info:
        pattern_cost(pattern)
    assert str(info.value) == problem


@pytest.mark.parametrize(
    "pattern, cost",
    [
        ("q_proj", 1),
        ("model.layers.3.self_attn.q_proj", 1),
        (r".*\.(q_proj|v_proj)", 64 * 2),
        (r"model\.layers\.\d+\.self_attn\.(q|k|v)_proj", 64 * 3),
        (r"^(?:model\.)?layers\.[0-9]{1,2}\.mlp\.\w+$", 2 * 2 * 64),
        (r"(self_attn|mlp)\.(q|down)_proj", 2 * 2),
        # Alternatives cost what they add, not a quantifier's reach: these were refused.
        (r".*\.layers\.\d+\.(self_attn|mlp)\.(q|v|down)_proj", 64 * 64 * 2 * 3),
        (r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)", 64 * (4 + 3)),
        (r"^(?!.*vision).*\.(q_proj|v_proj)", 64 * 64 * 2),
    ],
)
def test_patterns_peft_users_write_are_simple(pattern, cost):
    assert pattern_cost(pattern) == cost


def test_the_costliest_simple_pattern_matches_every_module_name_within_milliseconds():
    names = [f"model.layers.{i}.{part}.{p}_proj" for i in range(64) for part, projections in
             (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down"))) for p in projections]
    for pattern in (".*.*.*x", "a?" * 18 + "x"):
        assert pattern_cost(pattern) == 262144
        matcher = re.compile(rf"(.*\.)?({pattern})$")  # as alpha_pattern and rank_pattern keys are matched
        started = time.perf_counter()
        assert not any(matcher.match(name) for name in names)
        assert time.perf_counter() - started < 5  # catastrophic backtracking would take hours


def test_simple_patterns_still_apply(tiny_hf_model, base, tmp_path):
    path = make_adapter(
        tiny_hf_model, tmp_path / "x", r=4, target_modules=r".*\.(q_proj|v_proj)", alpha_pattern={r"layers\.1\.self_attn\.q_proj": 32}
    )
    adapter = read_adapter("x", path, base, 8)
    assert adapter.targets == ["q_proj", "v_proj"]
    scales = {key: {s: scale for s, (_, _, scale) in g.slices.items()} for key, g in adapter.groups.items()}
    assert scales[(0, "qkv")] == {0: 4.0, 2: 4.0} and scales[(1, "qkv")] == {0: 8.0, 2: 4.0}


def test_many_patterns_together_are_refused(adapter, base):
    edit_config(adapter, alpha_pattern={f"x{i}.*y.*z.*": 8 for i in range(9)})
    assert refusal(adapter, base) == (
        "adapter 'x' has patterns that could backtrack 2359296 ways on a module name together, more than 2097152 "
        "(server/adapters/patterns.py): use fewer quantifiers"
    )
    edit_config(adapter, alpha_pattern={f"layers.{i}.q_proj": 8 for i in range(1025)})
    assert refusal(adapter, base) == "adapter 'x' has alpha_pattern an object; it must be an object of at most 1024 pattern keys"


# Defect 12: files outside the adapter's folder, and messages that quote files.


@pytest.mark.parametrize("file", ["adapter_config.json", "adapter_model.safetensors"])
def test_files_linked_from_outside_the_adapter_folder_are_refused(adapter, base, tmp_path, file):
    outside = tmp_path / "outside" / file
    outside.parent.mkdir()
    shutil.copy(adapter / file, outside)
    (adapter / file).unlink()
    (adapter / file).symlink_to(outside)
    assert refusal(adapter, base) == f"adapter 'x' has a {file} that links outside its directory"


def test_a_link_inside_the_adapter_folder_is_followed(adapter, base):
    weights_file(adapter).rename(adapter / "v2.safetensors")
    weights_file(adapter).symlink_to("v2.safetensors")
    assert read_adapter("x", adapter, base, 8).rank == 4


@pytest.mark.parametrize(
    "content, reason",
    [
        (f'{{"r": {SECRET}}}'.encode(), "it is not valid JSON (line 1, column 7)"),
        (f'{{"r": 4,\n "lora_alpha": "\xff{SECRET}"}}'.encode("latin-1"), "it is not UTF-8 text (byte 25)"),
        (f'"{SECRET}"'.encode(), "it holds a string, not a JSON object"),
    ],
    ids=["bad-json", "bad-utf8", "string"],
)
def test_config_errors_say_where_not_what(adapter, base, content, reason):
    (adapter / CONFIG).write_bytes(content)
    message = refusal(adapter, base)
    assert message == f"adapter 'x' has an unreadable adapter_config.json: {reason}"


def test_weights_errors_never_quote_the_file(adapter, base):
    weights_file(adapter).write_bytes(SECRET.encode() * 4)
    message = refusal(adapter, base)
    header_len = int.from_bytes(SECRET.encode()[:8], "little")
    assert message == (
        f"adapter 'x' has a corrupt adapter_model.safetensors: its header length points past the end of the file ({len(SECRET) * 4} bytes)"
    )
    assert str(header_len) not in message
    write_safetensors(weights_file(adapter), {A_KEY: {"dtype": SECRET * 4, "shape": [1], "data_offsets": [0, 4]}}, bytes(4))
    assert SECRET not in refusal(adapter, base)
    edit_config(adapter, modules_to_save=[SECRET * 4])
    assert SECRET not in refusal(adapter, base)


# Defect 15: the safetensors layout rules.


@pytest.mark.parametrize(
    "tensors, data_bytes, reason",
    [
        ([("x", 0, 8, [2], "F32"), ("y", 4, 12, [2], "F32")], 12, "tensor 'y' overlaps the tensor before it in the data section"),
        ([("x", 0, 8, [2], "F32"), ("y", 0, 8, [2], "F32")], 8, "tensor 'y' overlaps the tensor before it in the data section"),
        ([("x", 8, 16, [2], "F32"), ("y", 16, 24, [2], "F32")], 24, "the data section has 8 bytes that no tensor owns before tensor 'x'"),
        ([("x", 0, 8, [2], "F32"), ("y", 12, 20, [2], "F32")], 20, "the data section has 4 bytes that no tensor owns before tensor 'y'"),
        ([("x", 0, 8, [2], "F32"), ("y", 8, 16, [2], "F32")], 20, "the data section has 4 bytes after its last tensor"),
        (
            [("x", 0, 6, [3], "F16"), ("y", 6, 14, [2], "F32")],
            14,
            "tensor 'y' starts at byte 6 of the data section, not a multiple of its dtype's 4 bytes",
        ),
    ],
    ids=["overlap", "same-bytes", "gap-before-first", "gap-between", "trailing-bytes", "misaligned"],
)
def test_overlapping_gapped_or_misaligned_tensors_are_refused(adapter, base, tensors, data_bytes, reason):
    write_safetensors(weights_file(adapter), f32(*tensors), bytes(data_bytes))
    assert refusal(adapter, base) == f"adapter 'x' has a corrupt adapter_model.safetensors: {reason}"


def test_a_tiled_file_in_any_header_order_is_read(adapter, base):
    """The layout rules accept what the safetensors library writes, whatever the header order."""
    tensors = load_file(weights_file(adapter))
    a, b = tensors[A_KEY].clone(), tensors[B_KEY].clone()  # load_file maps the file we rewrite
    header = {B_KEY: {"dtype": "F32", "shape": list(b.shape), "data_offsets": [a.nbytes, a.nbytes + b.nbytes]},
              A_KEY: {"dtype": "F32", "shape": list(a.shape), "data_offsets": [0, a.nbytes]}}
    write_safetensors(weights_file(adapter), header, a.numpy().tobytes() + b.numpy().tobytes())
    (_, (a_read, b_read, _)), = read_adapter("x", adapter, base, 8).groups[(0, "qkv")].slices.items()
    assert torch.equal(a_read, a) and torch.equal(b_read, b)


@pytest.mark.parametrize("b_dtype", [torch.float32, torch.bfloat16], ids=["one-dtype", "mixed-dtypes"])
def test_a_nan_is_refused_in_files_of_one_dtype_or_several(adapter, base, b_dtype):
    """Reads check a file of one dtype in one pass over its data and one of mixed dtypes tensor
    by tensor: both read the file's values, and both find a NaN and name its tensor."""
    tensors = load_file(weights_file(adapter))
    a, b = tensors[A_KEY].clone(), tensors[B_KEY].clone().to(b_dtype)  # load_file maps the file we rewrite
    header = {A_KEY: {"dtype": "F32", "shape": list(a.shape), "data_offsets": [0, a.nbytes]},
              B_KEY: {"dtype": "F32" if b_dtype == torch.float32 else "BF16", "shape": list(b.shape),
                      "data_offsets": [a.nbytes, a.nbytes + b.nbytes]}}

    def write() -> None:
        write_safetensors(weights_file(adapter), header, bytes(a.view(torch.uint8).numpy()) + bytes(b.view(torch.uint8).numpy()))

    write()
    (_, (a_read, b_read, _)), = read_adapter("x", adapter, base, 8).groups[(0, "qkv")].slices.items()
    assert torch.equal(a_read, a) and torch.equal(b_read, b.float())
    b[-1, -1] = math.nan
    write()
    assert refusal(adapter, base) == f"adapter 'x' has NaN or infinite values in {Q}.lora_B"


# Over gRPC: every one of these is a status with its reason, and the server serves on.


def test_bad_names_and_adapter_files_over_grpc(template, tiny_model_dir, tmp_path):
    root = tmp_path / "adapters"
    root.mkdir()
    shutil.copytree(template, root / "good")
    for name, change in [
        ("list-config", lambda p: (p / CONFIG).write_text("[]")),
        ("deep-config", lambda p: (p / CONFIG).write_text("[" * 100_000)),
        ("redos", lambda p: edit_config(p, alpha_pattern={"(a+)+$": 8})),
        ("overlap", lambda p: write_safetensors(weights_file(p), f32(("x", 0, 8, [2], "F32"), ("y", 4, 12, [2], "F32")), bytes(12))),
        ("nan", lambda p: edit_config(p, lora_alpha=math.nan)),
    ]:
        change(Path(shutil.copytree(template, root / name)))
    engine = start_engine(tiny_model_dir, adapters_dir=str(root), max_lora_rank=8, max_loras=2)
    server = ServerThread(loopback(), engine)
    try:
        with TandemClient(server.target, timeout=60, max_retries=0) as client:
            before = client.generate("one two three", max_new_tokens=4, adapter="good").token_ids
            for name in ("a\0b", "a" * 256):
                with pytest.raises(TandemRpcError) as info:
                    client.generate("hi", max_new_tokens=1, adapter=name)
                assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT, info.value.message
            with pytest.raises(TandemRpcError) as info:
                client.load_adapter("x", path="p" * 300)
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
            for name in ("list-config", "deep-config", "redos", "overlap", "nan"):
                with pytest.raises(TandemRpcError) as info:
                    client.generate("hi", max_new_tokens=1, adapter=name)
                assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION, (name, info.value.message)
                assert info.value.message.startswith(f"adapter {name!r} ")
            assert client.generate("one two three", max_new_tokens=4, adapter="good").token_ids == before
    finally:
        server.stop()
        engine.shutdown()


def test_a_new_version_replaces_a_symlinked_adapter_and_leaves_its_target(tmp_path):
    """An adapters directory laid out as prod -> prod-v1: MergeAdapters, CompressAdapter or a
    job publishing to prod swapped the new folder in, then failed removing the old version
    (rmtree refuses a symlink), answering INTERNAL and leaving a temporary folder behind."""
    from tandem.server.atomic_files import TEMP_PREFIX, write_directory

    (tmp_path / "prod-v1").mkdir()
    (tmp_path / "prod-v1" / "adapter_config.json").write_text("old")
    (tmp_path / "prod").symlink_to("prod-v1")
    write_directory(tmp_path / "prod", {"adapter_config.json": b"new"})
    assert not (tmp_path / "prod").is_symlink() and (tmp_path / "prod" / "adapter_config.json").read_text() == "new"
    assert (tmp_path / "prod-v1" / "adapter_config.json").read_text() == "old"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_without_an_atomic_swap_a_new_version_never_leaves_the_old_half_deleted(tmp_path, monkeypatch):
    """NFS, CIFS and many FUSE mounts (Kubernetes' ReadWriteMany volumes) refuse renameat2's
    exchange: the fallback removed the old version file by file, then renamed the new one in,
    so a kill mid-removal left an adapter with half its files."""
    import os
    import uuid

    from tandem.server import atomic_files
    from tandem.server.atomic_files import ASIDE_PREFIX, TEMP_PREFIX, remove_leftovers, write_directory

    monkeypatch.setattr(atomic_files, "_exchange", lambda a, b: False)
    files = {"adapter_config.json": b"old", "adapter_model.safetensors": b"old weights"}
    write_directory(tmp_path / "prod", files)
    write_directory(tmp_path / "prod", {"adapter_config.json": b"new"})
    assert [p.name for p in tmp_path.iterdir()] == ["prod"] and (tmp_path / "prod" / "adapter_config.json").read_text() == "new"

    # The new version's rename fails (a kill's signal, an I/O error): the old one is back, whole.
    rename = os.rename

    def interrupted_putting_the_new_one_in(source, target):
        if Path(source).name.startswith(TEMP_PREFIX) and not Path(source).name.startswith(ASIDE_PREFIX):
            raise KeyboardInterrupt
        rename(source, target)

    monkeypatch.setattr(atomic_files.os, "rename", interrupted_putting_the_new_one_in)
    with pytest.raises(KeyboardInterrupt):
        write_directory(tmp_path / "prod", files)
    monkeypatch.setattr(atomic_files.os, "rename", rename)
    assert [p.name for p in tmp_path.iterdir()] == ["prod"] and (tmp_path / "prod" / "adapter_config.json").read_text() == "new"

    # A kill between the two renames runs no handler: the old version aside, the new one under
    # its temp name, the name missing. The start-up clean-up puts the old one back.
    aside = tmp_path / f"{ASIDE_PREFIX}{uuid.uuid4().hex}-prod"
    rename(tmp_path / "prod", aside)
    write_directory(tmp_path / f"{TEMP_PREFIX}{uuid.uuid4().hex}-prod", files)
    removed = remove_leftovers(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["prod"] and (tmp_path / "prod" / "adapter_config.json").read_text() == "new"
    assert len(removed) == 1 and removed[0].name.startswith(TEMP_PREFIX)
