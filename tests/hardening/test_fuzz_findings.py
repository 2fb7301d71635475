"""What tests/hardening/test_fuzz.py found, one focused regression test each: inputs that
gave INTERNAL (for LoadAdapter and any Generate naming the adapter), refusals that quoted
a caller's or a file's text whole, and a seed CreateJob accepted but training could not use.
And what the soak (bench/soak.py) found: memory that grows with every new batch shape in
bfloat16 on CPU (fixed by padding rows to buckets: tandem/kernels/row_buckets.py)."""

import json
import time
from pathlib import Path

import pytest
import torch

from bench.soak import memory_in_use_mb
from tandem.kernels.row_buckets import bucket_rows
from tandem.server.adapters.peft_format import read_adapter
from tandem.server.adapters.registry import resolve_adapter_dir
from tandem.server.config import EngineConfig
from tandem.server.engine.async_engine import AsyncEngine
from tandem.server.engine.sampling_params import SamplingParams
from tandem.server.errors import IncompatibleAdapter, InvalidRequest, NotFound
from tandem.server.finetune.job import JobStatus
from tandem.server.finetune.jobs import JobRequest
from tandem.server.finetune.trainable_adapter import LoRASpec
from tandem.server.finetune.trainer import Hyperparameters
from tests.adapters.make_adapters import edit_config, weights_file
from tests.conftest import make_tiny_hf_model
from tests.engine.helpers import make_engine

Q = "base_model.model.model.layers.0.self_attn.q_proj"
MAX_DETAILS = 1000  # server/api/status_mapping.py cuts messages here


def write_header(path: Path, header: dict) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text)


@pytest.mark.parametrize("fields", [dict(lora_alpha=10**400), dict(alpha_pattern={"q_proj": 10**400})], ids=["lora_alpha", "alpha_pattern"])
def test_an_integer_alpha_too_large_for_a_float_is_refused(adapter, base, fields):
    edit_config(adapter, **fields)
    with pytest.raises(IncompatibleAdapter, match="it must be a finite number"):
        read_adapter("x", adapter, base, 8)


@pytest.mark.parametrize("field", ["target_modules", "alpha_pattern", "rank_pattern"])
def test_a_repetition_count_too_large_for_re_is_refused(adapter, base, field):
    pattern = "q_proj{4294967295}"
    edit_config(adapter, **{field: pattern if field == "target_modules" else {pattern: 4}})
    with pytest.raises(IncompatibleAdapter, match="is not a valid regular expression"):
        read_adapter("x", adapter, base, 8)


def test_a_dimension_too_large_for_torch_is_refused(adapter, base):
    write_header(
        weights_file(adapter),
        {
            f"{Q}.lora_A.weight": {"dtype": "F32", "shape": [2**63, 0], "data_offsets": [0, 0]},
            f"{Q}.lora_B.weight": {"dtype": "F32", "shape": [64, 0], "data_offsets": [0, 0]},
        },
    )
    with pytest.raises(IncompatibleAdapter, match="corrupt adapter_model.safetensors"):
        read_adapter("x", adapter, base, 8)


@pytest.mark.parametrize(
    "shape, reason",
    [([10**62] * 10, "has 10 dimensions"), ([10**62] * 2, "has a dimension of"), ([2], "bytes, its shape")],
    ids=["ten-huge-dims", "two-huge-dims", "huge-offsets"],
)
def test_a_tensor_of_a_huge_shape_is_refused_in_a_short_message(adapter, base, shape, reason):
    """Sizes in a safetensors header are JSON integers of any length: the byte count a shape
    of ten 10^62 dimensions needs ran to 600 digits, and the refusal past the 1000 characters
    a gRPC status carries (found by test_fuzz.py)."""
    write_header(weights_file(adapter), {f"{Q}.lora_A.weight": {"dtype": "F32", "shape": shape, "data_offsets": [0, 10**700]}})
    with pytest.raises(IncompatibleAdapter, match=f"corrupt adapter_model.safetensors: tensor .* {reason}") as info:
        read_adapter("x", adapter, base, 8)
    assert len(str(info.value)) < 400


LONG = "L" * 2000


@pytest.mark.parametrize(
    "key",
    [LONG, f"base_model.model.{LONG}.lora_A.weight", f"base_model.model.{LONG}.lm_head.lora_B.weight"],
    ids=["unexpected", "not-a-projection", "lm-head"],
)
def test_refusals_never_quote_a_long_tensor_name(adapter, base, key):
    write_header(weights_file(adapter), {key: {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}})
    with pytest.raises(IncompatibleAdapter) as info:
        read_adapter("x", adapter, base, 8)
    assert LONG[:65] not in str(info.value) and len(str(info.value)) < MAX_DETAILS


@pytest.mark.parametrize("name, path", [("a/" + LONG, ""), ("." + LONG, ""), ("x", "d/" * 2000)], ids=["slash", "dot", "path"])
def test_refusals_of_long_names_and_paths_stay_short(tmp_path, name, path):
    with pytest.raises((InvalidRequest, NotFound)) as info:
        resolve_adapter_dir(tmp_path, name, path)
    assert len(str(info.value)) < MAX_DETAILS


def test_a_refused_target_module_list_is_not_quoted_whole():
    with pytest.raises(InvalidRequest) as info:
        LoRASpec(target_modules=("not_a_projection",) * 1000)
    assert len(str(info.value)) < MAX_DETAILS


def test_every_seed_createjob_accepts_trains(tiny_model_dir, tmp_path):
    (tmp_path / "adapters").mkdir()
    config = EngineConfig(
        model=str(tiny_model_dir), dtype="float32", kv_cache_bytes=16 << 20, adapters_dir=str(tmp_path / "adapters"),
        data_dir=str(tmp_path / "data"), max_lora_rank=8, adapter_cache_prefault=False,
    )
    engine = AsyncEngine(config)
    engine.start()
    try:
        data = "\n".join(json.dumps({"prompt": f"Item {i}:", "completion": f" value {i}"}) for i in range(4))
        hp = Hyperparameters(max_steps=1, tokens_per_step=64, seed=2**63 - 1)
        job = engine.jobs.create(JobRequest(adapter="tuned", hyperparameters=hp, training_data=data, lora={"r": 4}))
        deadline = time.monotonic() + 60
        while not engine.jobs.get(job.id).status.terminal and time.monotonic() < deadline:
            time.sleep(0.02)
        job = engine.jobs.get(job.id)
    finally:
        engine.shutdown()
    assert job.status is JobStatus.SUCCEEDED, job.error


def _serve(engine, prompt_lengths) -> None:
    for n in prompt_lengths:
        engine.add_request(f"len-{n}", list(range(5, 5 + n)), SamplingParams(temperature=0.0, max_new_tokens=1))
        while engine.has_work():
            engine.step()


def test_serving_every_prompt_length_in_bfloat16_does_not_grow_memory(smollm2_tokenizer):
    # oneDNN keeps a compiled kernel per matmul shape (~2 MB per row count an iteration
    # meets; +630 MB over prompts of 9..72 tokens before the fix). Once each row bucket has
    # been met, every further prompt length must cost no memory. Dimensions no other test
    # uses, so that no shape has been compiled before.
    hf = make_tiny_hf_model(smollm2_tokenizer, hidden_size=48, intermediate_size=80)
    engine = make_engine(hf, smollm2_tokenizer, dtype=torch.bfloat16, kv_cache_bytes=8 << 20)
    lengths = range(1, 161)
    _serve(engine, sorted({bucket_rows(n) for n in lengths}))
    before = memory_in_use_mb()
    _serve(engine, lengths)
    assert memory_in_use_mb() - before < 32

