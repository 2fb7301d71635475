"""Issue 11, the suite that keeps it fixed: property-based fuzzing of every tandem.v1 RPC's
request fields, of malformed request bytes, and of adapter files, against a real server on the
tiny model with adapter serving and fine-tuning on and no auth (every call is authorized).

Whatever comes in, the caller gets a status its RPC documents (never INTERNAL or UNKNOWN), with
a message under 1000 characters that never quotes an adapter file, and nothing it sends
changes another caller's output: after every test the base model and a reference adapter give
the greedy tokens they gave before any fuzzing, the engine holds no sequence and no KV block,
and no fine-tuning job is left running.
"""

import json
import math
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tandem.server.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE
from tandem.server.adapters.registry import AdapterRegistry
from tandem.server.errors import FailedPrecondition, InvalidRequest, NotFound
from tandem.server.engine.async_engine import AsyncEngine
from tandem.v1 import (
    adapters_pb2, adapters_pb2_grpc, finetuning_pb2, finetuning_pb2_grpc, generation_pb2, generation_pb2_grpc,
)
from tests.adapters.make_adapters import ATTENTION, make_adapter
from tests.api.conftest import all_blocks_free, loopback, start_engine, wait_until
from tests.api.harness import ServerThread

Code = grpc.StatusCode
TIMEOUT = 30.0  # a call still running after this long is a hang
MAX_DETAILS = 1000
ENDED = (finetuning_pb2.JOB_STATUS_CANCELLED, finetuning_pb2.JOB_STATUS_SUCCEEDED)
# Written into adapter files by the fuzz: no error message may quote it. Longer than the 64
# characters up to which the server shows a config value as written (peft_format._shown).
MARKER = "FILE-BYTES-" + "m" * 70
REFERENCE = "ref"  # the adapter whose output must not change: nothing fuzzed loads, unloads or trains it
MAX_RANK = 8
VOCAB = 49_152  # the tiny model's: SmolLM2's tokenizer
PROJECTIONS = ATTENTION + ("gate_proj", "up_proj", "down_proj")
DATASET = "\n".join(json.dumps({"prompt": f"Item {i}:", "completion": f" value {i}"}) for i in range(4))

# What each RPC may answer; RESOURCE_EXHAUSTED everywhere: a request over the size limit.
ALLOWED = {
    "Generate": {Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION, Code.RESOURCE_EXHAUSTED},
    "Tokenize": {Code.OK, Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED},
    "GetModelInfo": {Code.OK, Code.RESOURCE_EXHAUSTED},
    "LoadAdapter": {Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION, Code.RESOURCE_EXHAUSTED},
    "UnloadAdapter": {Code.OK, Code.NOT_FOUND, Code.RESOURCE_EXHAUSTED},
    "ListAdapters": {Code.OK, Code.RESOURCE_EXHAUSTED},
    "CreateJob": {
        Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION, Code.ALREADY_EXISTS, Code.RESOURCE_EXHAUSTED,
    },
    "GetJob": {Code.OK, Code.NOT_FOUND, Code.RESOURCE_EXHAUSTED},
    "ListJobs": {Code.OK, Code.RESOURCE_EXHAUSTED},
    "CancelJob": {Code.OK, Code.NOT_FOUND, Code.FAILED_PRECONDITION, Code.RESOURCE_EXHAUSTED},
    "WatchJob": {Code.OK, Code.NOT_FOUND, Code.RESOURCE_EXHAUSTED},
}
ALLOWED["GenerateStream"] = ALLOWED["Generate"]
# Every method, whether it streams, and the field numbers of its string fields (a.b: field b
# of the message in field a), where bytes that are not UTF-8 make the request unparsable.
METHODS = {
    "/tandem.v1.GenerationService/Generate": (False, ["1", "3", "10", "2.1", "2.2"]),
    "/tandem.v1.GenerationService/GenerateStream": (True, ["1", "3", "10", "2.1", "2.2"]),
    "/tandem.v1.GenerationService/Tokenize": (False, ["1", "2.1", "2.2"]),
    "/tandem.v1.GenerationService/GetModelInfo": (False, []),
    "/tandem.v1.AdaptersService/LoadAdapter": (False, ["1", "2"]),
    "/tandem.v1.AdaptersService/UnloadAdapter": (False, ["1"]),
    "/tandem.v1.AdaptersService/ListAdapters": (False, []),
    "/tandem.v1.FineTuningService/CreateJob": (False, ["1", "2", "3", "4", "5.4", "6.2"]),
    "/tandem.v1.FineTuningService/GetJob": (False, ["1"]),
    "/tandem.v1.FineTuningService/ListJobs": (False, []),
    "/tandem.v1.FineTuningService/CancelJob": (False, ["1"]),
    "/tandem.v1.FineTuningService/WatchJob": (True, ["1"]),
}


def fuzz(examples: int) -> settings:
    """Bounded examples keep the whole file well under two minutes on 2 cores. The inputs are
    the same on every run (tests/conftest.py); for a longer hunt, raise the examples and run
    with HYPOTHESIS_PROFILE=explore."""
    return settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@dataclass
class Fuzzed:
    """The server under fuzz, its stubs, and what it answered before any fuzzing."""

    server: ServerThread
    engine: AsyncEngine
    adapters_dir: Path
    channel: grpc.Channel
    generation: generation_pb2_grpc.GenerationServiceStub
    adapters: adapters_pb2_grpc.AdaptersServiceStub
    finetuning: finetuning_pb2_grpc.FineTuningServiceStub
    reference: list[list[int]]

    @property
    def registry(self) -> AdapterRegistry:
        return self.engine.engine.registry

    def greedy(self) -> list[list[int]]:
        """Greedy tokens of the base model and of the reference adapter, prompts of two lengths."""
        prompts = ["one two three", "a longer prompt, with many more words in it than the first one has"]
        return [
            list(self.generation.Generate(
                generation_pb2.GenerateRequest(prompt=p, adapter=adapter, max_new_tokens=8, ignore_eos=True), timeout=TIMEOUT
            ).token_ids)
            for adapter in ("", REFERENCE)
            for p in prompts
        ]


@pytest.fixture(scope="module")
def fuzzed(tiny_model_dir, tiny_hf_model, tmp_path_factory) -> Iterator[Fuzzed]:
    adapters_dir, data_dir = tmp_path_factory.mktemp("fuzz-adapters"), tmp_path_factory.mktemp("fuzz-data")
    make_adapter(tiny_hf_model, adapters_dir / REFERENCE, r=4, seed=1)
    make_adapter(tiny_hf_model, adapters_dir / "good", r=8, target_modules=PROJECTIONS, seed=2)
    (data_dir / "train.jsonl").write_text(DATASET)
    (data_dir / "bad.jsonl").write_text('{"prompt": 1}\nnot json\n')
    engine = start_engine(
        tiny_model_dir, adapters_dir=str(adapters_dir), data_dir=str(data_dir), max_lora_rank=MAX_RANK, max_loras=2
    )
    server = ServerThread(loopback(), engine)
    channel = grpc.insecure_channel(server.target)
    stubs = (
        generation_pb2_grpc.GenerationServiceStub(channel), adapters_pb2_grpc.AdaptersServiceStub(channel), finetuning_pb2_grpc.FineTuningServiceStub(channel),
    )
    fuzzed = Fuzzed(server, engine, adapters_dir, channel, *stubs, reference=[])
    assert fuzzed.generation.GetModelInfo(generation_pb2.GetModelInfoRequest()).vocab_size == VOCAB
    fuzzed.reference = fuzzed.greedy()
    yield fuzzed
    channel.close()
    server.stop()
    engine.shutdown()


@pytest.fixture(autouse=True)
def isolated(fuzzed) -> Iterator[None]:
    """Each test starts with "good" loaded (another may have unloaded it); after it, no job
    is left running, the engine is empty, and the greedy output is the same."""
    fuzzed.adapters.LoadAdapter(adapters_pb2.LoadAdapterRequest(name="good"), timeout=TIMEOUT)
    yield
    for job in fuzzed.finetuning.ListJobs(finetuning_pb2.ListJobsRequest(), timeout=TIMEOUT).jobs:
        cancel(fuzzed, job.id)
    assert wait_until(lambda: all_blocks_free(fuzzed.engine), timeout=TIMEOUT)
    assert wait_until(lambda: fuzzed.engine.jobs.stats().running_adapter == "", timeout=TIMEOUT)
    assert fuzzed.greedy() == fuzzed.reference


def cancel(fuzzed: Fuzzed, job_id: str) -> None:
    try:
        fuzzed.finetuning.CancelJob(finetuning_pb2.CancelJobRequest(id=job_id), timeout=TIMEOUT)
    except grpc.RpcError as exc:
        assert exc.code() == Code.FAILED_PRECONDITION, exc.details()  # it had already ended


def outcome(method: str, call: Callable[[], object], also: frozenset = frozenset()) -> tuple[grpc.StatusCode, object]:
    """The call's status (its result when OK), checked against what `method` may answer (and
    `also`). The codes show in --hypothesis-show-statistics."""
    try:
        result = call()
    except grpc.RpcError as exc:
        event(f"{method} {exc.code().name}")
        assert exc.code() in ALLOWED[method] | also, (exc.code(), exc.details())
        assert len(exc.details() or "") < MAX_DETAILS, exc.details()
        return exc.code(), None
    event(f"{method} OK")
    return Code.OK, result


# Strategies.

UINT32 = st.integers(0, 2**32 - 1)
UINT64 = st.integers(0, 2**64 - 1)
FLOAT32 = st.floats(width=32)
TEXT = st.text(max_size=60)
# Names requests use for adapters: real ones, path tricks, names the file system refuses,
# unicode, names of thousands of characters; never the reference adapter.
NAMES = st.one_of(
    st.sampled_from(["good", "", ".", "..", "../good", "good/..", "a/b", ".tandem", "a\0b", "x" * 256, "é" * 128, "missing", "a/" + "L" * 3000]),
    TEXT,
).filter(lambda name: name != REFERENCE)
MESSAGES = st.lists(
    st.builds(
        generation_pb2.Message,
        role=st.sampled_from(["system", "user", "assistant", "tool", ""]) | st.text(max_size=8),
        content=TEXT,
    ),
    max_size=4,
)
# Over the context limit (512 tokens, 16384 characters), or over the 4 MiB message limit.
HUGE_TEXT = st.sampled_from(["word " * 5000, "x" * 20_000, "é" * (5 << 20)])


def with_wild_fields(draw, valid: dict, wild: dict, max_wild: int = 3) -> dict:
    """Field values: each drawn from `valid` (what a careful caller sends), then up to
    max_wild of them replaced from `wild` (anywhere in the field's type: extremes, NaN,
    unicode, empty, huge). Wild values in every field at once would be refused by the first
    check and leave the rest of the request untested."""
    fields = {name: draw(strategy) for name, strategy in valid.items()}
    for name in draw(st.lists(st.sampled_from(sorted(wild)), max_size=max_wild, unique=True)):
        fields[name] = draw(wild[name])
    return {name: value for name, value in fields.items() if value is not None}


PROMPTS = {
    "prompt": st.text(min_size=1, max_size=40),
    "messages": st.lists(
        st.builds(generation_pb2.Message, role=st.sampled_from(["system", "user", "assistant"]), content=TEXT), min_size=1, max_size=3
    ),
    "prompt_token_ids": st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=20),
}
GENERATE_VALID = {
    "adapter": st.sampled_from(["", "good", REFERENCE]),
    "max_new_tokens": st.integers(1, 4),
    "temperature": st.sampled_from([0.0, 0.5, 1.0]),
    "top_p": st.none() | st.floats(0.0625, 1.0, width=32),
    "top_k": st.integers(0, 50),
    "repetition_penalty": st.none() | st.floats(0.5, 2.0, width=32),
    "seed": st.none() | UINT64,
    "stop": st.lists(st.text(min_size=1, max_size=8), max_size=3),
    "stop_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=4),
    "ignore_eos": st.booleans(),
    "logprobs": st.none() | st.integers(0, 20),
}
GENERATE_WILD = {
    "adapter": NAMES,
    # Beyond the context limit: a request the server accepts generates 4 tokens at most.
    "max_new_tokens": st.integers(512, 2**32 - 1),
    "temperature": FLOAT32 | st.just(1e-40),
    "top_p": FLOAT32,
    "top_k": UINT32,
    "repetition_penalty": FLOAT32,
    "seed": UINT64,
    "stop": st.lists(TEXT, max_size=20) | st.sampled_from([["s" * 300], [""], ["x"] * 100_000]),
    "stop_token_ids": st.lists(UINT32, max_size=300) | st.just(list(range(100_000))),
    "logprobs": UINT32,
    # A second prompt field, or one that is empty, too long, or over the message size limit.
    "prompt": TEXT | HUGE_TEXT,
    "messages": MESSAGES | st.just([generation_pb2.Message(role="user")] * 10_000),
    "prompt_token_ids": st.lists(UINT32, max_size=40) | st.just([1] * 100_000),
}


@st.composite
def generate_requests(draw) -> generation_pb2.GenerateRequest:
    kind = draw(st.sampled_from(sorted(PROMPTS)))
    return generation_pb2.GenerateRequest(**with_wild_fields(draw, {**GENERATE_VALID, kind: PROMPTS[kind]}, GENERATE_WILD))


JOB_VALID = {
    "adapter": st.sampled_from(["tuned", "good"]),
    "base_adapter": st.sampled_from(["", "good"]),
    # The oneof: (field, value), or None for neither.
    "data": st.sampled_from([("training_file", "train.jsonl"), ("training_data", DATASET)]),
    "lora.r": st.integers(0, MAX_RANK),
    "lora.lora_alpha": st.none() | st.floats(1, 32, width=32),
    "lora.use_rslora": st.booleans(),
    "lora.target_modules": st.lists(st.sampled_from(PROJECTIONS), max_size=3, unique=True),
    "lora.lora_dropout": st.floats(0, 0.5, width=32),
    "hyperparameters.learning_rate": st.none() | st.floats(1e-5, 1e-2),
    "hyperparameters.lr_scheduler": st.sampled_from(["", "linear", "cosine", "constant"]),
    "hyperparameters.warmup_steps": st.integers(0, 2),
    "hyperparameters.max_steps": st.integers(1, 2),
    "hyperparameters.tokens_per_step": st.integers(0, 64),
    "hyperparameters.max_seq_length": st.sampled_from([0, 64]),
    "hyperparameters.eval_fraction": st.sampled_from([0.0, 0.25]),
    "hyperparameters.checkpoint_interval": st.integers(0, 2),
    "hyperparameters.seed": st.integers(0, 2**63 - 1),
}
JOB_WILD = {
    "adapter": NAMES,
    "base_adapter": NAMES,
    "data": st.none() | st.tuples(
        st.just("training_file"), st.sampled_from(["bad.jsonl", "missing.jsonl", "../x", ".tandem", "/etc/passwd", "."]) | TEXT
    ) | st.tuples(st.just("training_data"), st.sampled_from([DATASET + "\n{", '{"text": ""}', "\n\n", '{"messages": []}']) | TEXT),
    "lora.r": UINT32,
    "lora.lora_alpha": FLOAT32,
    "lora.target_modules": st.lists(TEXT, max_size=3) | st.lists(TEXT, min_size=200, max_size=400),
    "lora.lora_dropout": FLOAT32,
    "hyperparameters.learning_rate": st.floats(),
    "hyperparameters.lr_scheduler": TEXT,
    "hyperparameters.warmup_steps": UINT32,
    "hyperparameters.n_epochs": UINT32,
    # Up to the 1M-step limit and past it: the job is cancelled as soon as it exists.
    "hyperparameters.max_steps": st.integers(0, 2_000_000) | UINT32,
    "hyperparameters.tokens_per_step": UINT32,
    "hyperparameters.max_seq_length": UINT32,
    "hyperparameters.weight_decay": st.floats(),
    "hyperparameters.max_grad_norm": st.floats(),
    "hyperparameters.eval_fraction": st.floats(),
    "hyperparameters.checkpoint_interval": UINT32,
    "hyperparameters.seed": st.integers(2**63, 2**64 - 1),
}


@st.composite
def job_requests(draw) -> finetuning_pb2.CreateJobRequest:
    """Jobs that would train a step or two on a tiny dataset, or not start at all."""
    request = finetuning_pb2.CreateJobRequest()
    fields = with_wild_fields(draw, JOB_VALID, JOB_WILD)
    if "data" in fields:
        setattr(request, *fields.pop("data"))
    for name, value in fields.items():
        *parents, field = name.split(".")
        message = request
        for parent in parents:
            message = getattr(message, parent)
        if isinstance(value, list):
            getattr(message, field).extend(value)
        else:
            setattr(message, field, value)
    return request


# The RPCs' fields.


@fuzz(300)
@given(request=generate_requests(), stream=st.booleans())
def test_generation_requests(fuzzed, request, stream):
    if stream:
        code, _ = outcome("GenerateStream", lambda: list(fuzzed.generation.GenerateStream(request, timeout=TIMEOUT)))
    else:
        code, _ = outcome("Generate", lambda: fuzzed.generation.Generate(request, timeout=TIMEOUT))
    assert code != Code.OK or request.max_new_tokens <= 4  # a too long request is never run


@fuzz(100)
@given(
    request=st.one_of(
        st.builds(generation_pb2.TokenizeRequest, text=PROMPTS["prompt"] | HUGE_TEXT),
        st.builds(generation_pb2.TokenizeRequest, messages=PROMPTS["messages"] | MESSAGES),
        st.builds(generation_pb2.TokenizeRequest, text=TEXT, messages=MESSAGES),
    )
)
def test_tokenize_requests(fuzzed, request):
    outcome("Tokenize", lambda: fuzzed.generation.Tokenize(request, timeout=TIMEOUT))
    outcome("GetModelInfo", lambda: fuzzed.generation.GetModelInfo(generation_pb2.GetModelInfoRequest(), timeout=TIMEOUT))


@fuzz(150)
@given(name=NAMES, path=st.sampled_from(["", "good", "../good", "good/../good", "a" * 300, "d/" * 3000]) | TEXT, unload=st.booleans())
def test_adapter_requests(fuzzed, name, path, unload):
    load = adapters_pb2.LoadAdapterRequest(name=name, path=path)
    code, _ = outcome("LoadAdapter", lambda: fuzzed.adapters.LoadAdapter(load, timeout=TIMEOUT))
    if code == Code.OK:
        generated, _ = outcome("Generate", lambda: fuzzed.generation.Generate(
            generation_pb2.GenerateRequest(prompt="hi", adapter=name, max_new_tokens=2), timeout=TIMEOUT
        ))
        assert generated == Code.OK
    if unload:
        outcome("UnloadAdapter", lambda: fuzzed.adapters.UnloadAdapter(adapters_pb2.UnloadAdapterRequest(name=name), timeout=TIMEOUT))
    listed = fuzzed.adapters.ListAdapters(adapters_pb2.ListAdaptersRequest(), timeout=TIMEOUT).adapters
    assert all(a.in_use == 0 for a in listed)


@fuzz(120)
@given(request=job_requests(), job_id=st.sampled_from(["", "ftjob-0"]) | TEXT)
def test_finetuning_requests(fuzzed, request, job_id):
    code, job = outcome("CreateJob", lambda: fuzzed.finetuning.CreateJob(request, timeout=TIMEOUT))
    created = [job.job.id] if code == Code.OK else []
    for id_ in created:
        cancel(fuzzed, id_)
    for id_ in [job_id, *created]:
        outcome("CancelJob", lambda: fuzzed.finetuning.CancelJob(finetuning_pb2.CancelJobRequest(id=id_), timeout=TIMEOUT))
        _, got = outcome("GetJob", lambda: fuzzed.finetuning.GetJob(finetuning_pb2.GetJobRequest(id=id_), timeout=TIMEOUT))
        _, watched = outcome("WatchJob", lambda: list(fuzzed.finetuning.WatchJob(finetuning_pb2.WatchJobRequest(id=id_), timeout=TIMEOUT)))
        if id_ in created:  # an ended job answers at once, and its watch ends with that state
            assert got.job.status in ENDED or got.job.error.code == "training_diverged", got
            assert watched[-1].job.status == got.job.status
    outcome("ListJobs", lambda: fuzzed.finetuning.ListJobs(finetuning_pb2.ListJobsRequest(), timeout=TIMEOUT))


# Request bytes that do not parse, or parse into whatever they happen to encode.


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def string_field(path: str, payload: bytes) -> bytes:
    """Field `path` ("3", or "2.1": field 1 of the message in field 2) holding payload."""
    number, _, rest = path.partition(".")
    inner = string_field(rest, payload) if rest else payload
    return varint(int(number) << 3 | 2) + varint(len(inner)) + inner


# Text around a byte sequence UTF-8 forbids: a stray continuation byte, an overlong NUL, a
# surrogate, a 5-byte form, a truncated character.
NOT_UTF8 = st.tuples(TEXT, st.sampled_from([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xe2\x82"]), TEXT).map(
    lambda t: t[0].encode() + t[1] + t[2].encode()
)


def send_bytes(fuzzed: Fuzzed, method: str, data: bytes) -> object:
    """Calls `method` with `data` as the serialized request (a stream is read to its end)."""
    streaming, _ = METHODS[method]
    if streaming:
        return list(fuzzed.channel.unary_stream(method)(data, timeout=TIMEOUT))
    return fuzzed.channel.unary_unary(method)(data, timeout=TIMEOUT)


@fuzz(200)
@given(method=st.sampled_from([m for m, (_, fields) in METHODS.items() if fields]), data=st.data(), payload=NOT_UTF8)
def test_string_fields_that_are_not_utf8_are_invalid_argument(fuzzed, method, data, payload):
    valid = string_field(METHODS[method][1][0], b"hello")
    field = data.draw(st.sampled_from(METHODS[method][1]))
    try:
        send_bytes(fuzzed, method, valid + string_field(field, payload))
    except grpc.RpcError as exc:
        assert exc.code() == Code.INVALID_ARGUMENT
        assert exc.details().startswith("the request is not valid protobuf: Error parsing message")
        assert len(exc.details()) < MAX_DETAILS
    else:
        pytest.fail(f"{method} accepted {payload!r} in field {field}")


@fuzz(400)
@given(method=st.sampled_from(sorted(METHODS)), data=st.binary(max_size=120))
def test_arbitrary_request_bytes(fuzzed, method, data):
    """Bytes that do not parse are INVALID_ARGUMENT; bytes that happen to parse are a request
    like any other. Jobs they create are cancelled after the test."""
    name = method.rsplit("/", 1)[1]
    if name in ("Generate", "GenerateStream"):
        # 0 (unset) means 256 tokens; keep what random bytes ask for short (the last field wins).
        data += varint(4 << 3) + varint(2)
    outcome(name, lambda: send_bytes(fuzzed, method, data), frozenset({Code.INVALID_ARGUMENT}))


# Adapter files: the safetensors header and adapter_config.json.

JSON_LEAVES = st.one_of(
    st.none(), st.booleans(), st.floats(), st.integers(), st.just(10**400), st.text(max_size=12), st.just(MARKER),
)
JSON = st.recursive(
    JSON_LEAVES, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12
)
# What PEFT users write as patterns, and what they should not: a small regex grammar.
REGEX_ATOMS = ["q_proj", "v_proj", "mlp", r"\.", ".", r"\d", r"\w", "layers", "[0-9]", "(q|v)", "(?:k|o)", "(", ")", "|", "^", "$"]
REGEX = st.lists(
    st.tuples(
        st.sampled_from([*REGEX_ATOMS, r"\1", "(?!x)", MARKER]), st.sampled_from(["", "", "*", "+", "?", "{2}", "{1,3}", "+?", "{100}", "{4294967295}"])
    ).map("".join),
    min_size=1,
    max_size=6,
).map("".join)
# The tiny model's projections, (in, out) features (tests/conftest.py TINY_CONFIG).
PROJECTION_FEATURES = {
    "q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
    "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64),
}
ODD_KEYS = st.one_of(
    st.sampled_from(["__metadata__", "base_model.model.model.embed_tokens.lora_embedding_A", "base_model.model.lm_head.lora_B.weight"]),
    st.text(max_size=64),
    st.text(min_size=1000, max_size=2000),
)
DTYPES = {"F32": "<f", "F16": "<e", "F64": "<d", "BF16": None}
SIZES = st.lists(st.integers(0, 4) | st.integers(-3, 200) | st.integers(2**31, 2**70), max_size=3)


def lora_key(layer: int, projection: str, ab: str) -> str:
    part = "self_attn" if projection in ATTENTION else "mlp"
    return f"base_model.model.model.layers.{layer}.{part}.{projection}.lora_{ab}.weight"


RARELY = st.sampled_from([True] + [False] * 9)


@st.composite
def tensor(draw, shape: list[int]) -> tuple[str, list[int], bytes]:
    """(dtype, shape, bytes) holding one value: in [-1, 1], or rarely anywhere in float32
    (NaN, infinities, too large for float16)."""
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    value = draw(st.floats(width=32) if draw(RARELY) else st.floats(-1, 1, width=32))
    if DTYPES[dtype] is None:  # bfloat16: the high half of a float32
        one = struct.pack("<f", value)[2:]
    else:
        try:
            one = struct.pack(DTYPES[dtype], value)
        except OverflowError:  # too large for float16
            one = b"\x00\x7c"
    return dtype, shape, one * math.prod(shape)


@st.composite
def lora_tensors(draw) -> dict[str, tuple[str, list[int], bytes]]:
    """key -> tensor: lora_A [r, in] and lora_B [out, r] of a few projections, each pair
    rarely odd (a rank of 0 or past the server's maximum, layer 2 of a 2-layer model, another
    shape, half of the pair missing), and rarely an odd tensor besides."""
    found = {}
    modules = st.tuples(st.sampled_from([0, 1]), st.sampled_from(sorted(PROJECTION_FEATURES)))
    for layer, projection in draw(st.lists(modules, min_size=1, max_size=3, unique_by=lambda m: m)):
        r = draw(st.integers(1, MAX_RANK))
        fan_in, fan_out = PROJECTION_FEATURES[projection]
        shapes = {"A": [r, fan_in], "B": [fan_out, r]}
        if draw(RARELY):
            odd = draw(st.sampled_from(["rank", "layer", "shape", "half"]))
            if odd == "rank":
                r = draw(st.sampled_from([0, MAX_RANK + 1]))
                shapes = {"A": [r, fan_in], "B": [fan_out, r]}
            elif odd == "layer":
                layer = 2
            elif odd == "shape":
                shapes[draw(st.sampled_from("AB"))] = draw(st.lists(st.integers(0, 5), max_size=3))
            else:
                del shapes[draw(st.sampled_from("AB"))]
        for ab, shape in shapes.items():
            found[lora_key(layer, projection, ab)] = draw(tensor(shape))
    if draw(RARELY):
        found[draw(ODD_KEYS)] = draw(tensor([1]))
    return found


@st.composite
def safetensors_files(draw, broken: bool) -> bytes:
    """A safetensors file: a header length, a JSON header and a data section, as the format
    wants them, or (broken) with one of them wrong: random JSON, lengths, offsets, dtypes,
    shapes, bytes."""
    kind = draw(st.sampled_from(["mangled", "json", "bytes"])) if broken else "tiled"
    if kind == "bytes":
        return draw(st.binary(max_size=64) | st.just(MARKER.encode()))
    header: object = draw(JSON)
    data = b""
    if kind != "json":
        header, position = {}, 0
        for key, (dtype, shape, raw) in draw(lora_tensors()).items():
            header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [position, position + len(raw)]}
            data += raw
            position += len(raw)
    text = json.dumps(header).encode()
    length, tail = len(text), b""
    if kind == "mangled":
        wrong = draw(st.sampled_from(["dtype", "shape", "data_offsets", "entry", "metadata", "length", "tail"]))
        if wrong == "length":
            length = draw(st.integers(0, len(text) + 8) | st.integers(0, 2**64 - 1))
        elif wrong == "tail":
            tail = draw(st.binary(min_size=1, max_size=8))
        else:
            key = "__metadata__" if wrong == "metadata" else draw(st.sampled_from(sorted(header)))
            value = draw(JSON | SIZES | st.sampled_from(["I32", "F8_E4M3", "f32", MARKER]))
            if wrong == "entry" or key == "__metadata__":
                header[key] = value
            else:
                header[key][wrong] = value
            text = json.dumps(header).encode()
            length = len(text)
    return struct.pack("<Q", length) + text + data + tail


# Values PEFT could have written (or nearly); rarely any JSON instead.
CONFIG_FIELDS = {
    "r": st.integers(-2, MAX_RANK + 2),
    "lora_alpha": st.integers(-64, 64) | st.floats(),
    "target_modules": st.lists(st.sampled_from(PROJECTIONS) | TEXT, max_size=4) | REGEX,
    "alpha_pattern": st.dictionaries(REGEX, st.floats() | st.integers(-64, 64), max_size=3),
    "rank_pattern": st.dictionaries(REGEX, st.integers(-1, MAX_RANK + 2), max_size=3),
    "use_rslora": st.booleans(),
    "peft_type": st.sampled_from(["LORA", "LOHA", MARKER]),
    "bias": st.sampled_from(["none", "all", "lora_only", MARKER]),
    "modules_to_save": st.sampled_from([None, [], [MARKER]]),
    "use_dora": st.booleans(),
}


@st.composite
def adapter_configs(draw, broken: bool) -> bytes:
    """adapter_config.json as PEFT writes it, or (broken) with fields replaced, or any JSON,
    or not JSON."""
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "bias": "none"}
    kind = draw(st.sampled_from(["fields", "fields", "json", "bytes"])) if broken else "peft"
    if kind == "bytes":
        return draw(st.binary(max_size=64) | st.just(b'{"r": 4, "lora_alpha": "' + MARKER.encode() + b"\xff"))
    if kind == "json":
        return json.dumps(draw(JSON)).encode()
    if kind == "fields":
        for field in draw(st.lists(st.sampled_from(sorted(CONFIG_FIELDS)), min_size=1, max_size=3, unique=True)):
            config[field] = draw(JSON if draw(RARELY) else CONFIG_FIELDS[field])
    return json.dumps(config).encode()


@st.composite
def adapter_files(draw) -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors): both well-formed (their content may
    still be refused), or one or both broken."""
    broken = draw(st.sampled_from(["neither", "config", "weights", "both"]))
    return draw(adapter_configs(broken in ("config", "both"))), draw(safetensors_files(broken in ("weights", "both")))


def write_adapter_files(directory: Path, config: bytes, weights: bytes) -> None:
    directory.mkdir(exist_ok=True)
    (directory / CONFIG_FILE).write_bytes(config)
    (directory / WEIGHTS_FILE).write_bytes(weights)


def assert_no_file_bytes(message: str) -> None:
    assert MARKER not in message and "m" * 65 not in message, message
    assert len(message) < MAX_DETAILS, message


@fuzz(600)
@given(files=adapter_files())
def test_adapter_files_read_by_the_registry(fuzzed, files):
    """Every file the registry reads is served or refused as the caller's problem (invalid,
    not found, incompatible) with a short message that quotes nothing of it."""
    write_adapter_files(fuzzed.adapters_dir / "direct", *files)
    try:
        info = fuzzed.registry.load("direct")
    except (InvalidRequest, NotFound, FailedPrecondition) as exc:
        event(f"refused: {type(exc).__name__}")
        assert_no_file_bytes(str(exc))
    else:
        event("served")
        assert 1 <= info.rank <= MAX_RANK


@fuzz(150)
@given(files=adapter_files())
def test_adapter_files_over_grpc(fuzzed, files):
    """The same over LoadAdapter, and an adapter it accepts serves (its output is its own: the
    autouse check sees the base model's and the reference adapter's unchanged)."""
    write_adapter_files(fuzzed.adapters_dir / "fuzzed", *files)
    try:
        fuzzed.adapters.LoadAdapter(adapters_pb2.LoadAdapterRequest(name="fuzzed"), timeout=TIMEOUT)
    except grpc.RpcError as exc:
        event(f"LoadAdapter {exc.code().name}")
        assert exc.code() in (Code.FAILED_PRECONDITION, Code.NOT_FOUND), (exc.code(), exc.details())
        assert_no_file_bytes(exc.details())
        return
    event("LoadAdapter OK")
    response = fuzzed.generation.Generate(
        generation_pb2.GenerateRequest(prompt="one two", adapter="fuzzed", max_new_tokens=3, ignore_eos=True), timeout=TIMEOUT
    )
    assert len(response.token_ids) == 3
