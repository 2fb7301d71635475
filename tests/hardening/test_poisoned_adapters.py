"""Issue 11, defect 1: one caller's adapter with NaN or infinite weights (or alpha) must never
change another caller's output. Such adapters are refused when read, and attention never reads
KV positions a sequence does not own, whatever they hold."""

import math
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from tandem.client import TandemClient, TandemRpcError
from tandem.server.adapters.peft_format import read_adapter
from tandem.server.engine.sampling_params import SamplingParams
from tandem.server.errors import IncompatibleAdapter
from tests.adapters.make_adapters import edit_config, make_adapter, weights_file
from tests.api.conftest import loopback, start_engine
from tests.api.harness import ServerThread
from tests.engine.helpers import make_engine, random_prompts, run

Q = "model.layers.0.self_attn.q_proj"


def poison(adapter_dir: Path, suffix: str, value: float) -> None:
    """Set one element of the tensor whose key ends with suffix to value."""
    tensors = load_file(weights_file(adapter_dir))
    key = next(k for k in tensors if k.endswith(suffix))
    tensors[key][0, 0] = value
    save_file(tensors, weights_file(adapter_dir))


@pytest.mark.parametrize(
    "suffix, value, where",
    [
        ("q_proj.lora_A.weight", math.nan, "lora_A"),
        ("q_proj.lora_B.weight", math.inf, "lora_B"),
        ("q_proj.lora_B.weight", -math.inf, "lora_B"),
    ],
    ids=["nan-A", "inf-B", "neg-inf-B"],
)
def test_non_finite_weights_are_refused(tiny_hf_model, base, tmp_path, suffix, value, where):
    path = make_adapter(tiny_hf_model, tmp_path / "x", r=4, target_modules=["q_proj"])
    poison(path, suffix, value)
    with pytest.raises(IncompatibleAdapter) as info:
        read_adapter("x", path, base, 8)
    assert str(info.value) == f"adapter 'x' has NaN or infinite values in {Q}.{where}"


@pytest.mark.parametrize(
    "fields, shown",
    [
        (dict(lora_alpha=math.nan), "nan"),
        (dict(lora_alpha=math.inf), "inf"),
        (dict(alpha_pattern={"q_proj": -math.inf}), "-inf"),
        (dict(lora_alpha="16"), "'16'"),
        (dict(lora_alpha=True), "True"),
    ],
    ids=["nan", "inf", "pattern-neg-inf", "string", "bool"],
)
def test_non_finite_alpha_is_refused(tiny_hf_model, base, tmp_path, fields, shown):
    path = make_adapter(tiny_hf_model, tmp_path / "x", r=4, target_modules=["q_proj"])
    edit_config(path, **fields)  # json writes NaN / Infinity literals, which json.loads reads back
    with pytest.raises(IncompatibleAdapter) as info:
        read_adapter("x", path, base, 8)
    assert str(info.value) == f"adapter 'x' has lora_alpha {shown} for {Q}; it must be a finite number"


def test_weights_that_overflow_the_slot_dtype_are_refused(tiny_hf_model, base, tmp_path):
    path = make_adapter(tiny_hf_model, tmp_path / "x", r=4, target_modules=["q_proj"], lora_alpha=1)
    edit_config(path, lora_alpha=4e38)  # scale 1e38 times B ~ 0.05 fits float32, not float16
    assert read_adapter("x", path, base, 8).rank == 4
    with pytest.raises(IncompatibleAdapter, match=rf"^adapter 'x' overflows float16 in {Q}: its largest scaled weight is"):
        read_adapter("x", path, base, 8, torch.float16)
    edit_config(path, lora_alpha=4e41)  # scale 1e41: no B entry of ~0.05 fits float32
    with pytest.raises(IncompatibleAdapter, match=rf"^adapter 'x' overflows float32 in {Q}"):
        read_adapter("x", path, base, 8)


def _stale_nan(engine) -> None:
    """Fill every KV slot a sequence could be handed (all but the null slot) with NaN, as if a
    NaN adapter's requests had just freed every block."""
    for k, v in engine.runner.kv_cache.layers:
        k[:-1] = math.nan
        v[:-1] = math.nan


def test_stale_kv_never_reaches_other_requests(tiny_hf_model, smollm2_tokenizer):
    """Greedy requests of different lengths, decoded together, give the same tokens when every
    free KV slot holds NaN as with a clean cache (padding used to gather stale slots)."""
    prompts = random_prompts([3, 17, 9, 30], len(smollm2_tokenizer), seed=5)
    params = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)
    arrivals = {0: [(f"r{i}", p, params) for i, p in enumerate(prompts)]}
    outputs = []
    for poisoned in (False, True):
        engine = make_engine(tiny_hf_model, smollm2_tokenizer, block_size=4, kv_cache_bytes=4 << 20)
        if poisoned:
            _stale_nan(engine)
        outputs.append(run(engine, arrivals))
    assert outputs[0] == outputs[1]
    assert all(len(ids) == 10 for ids in outputs[1].values())


def test_a_nan_adapter_over_grpc_fails_alone(tiny_hf_model, tiny_model_dir, tmp_path):
    """FAILED_PRECONDITION for the poisoned adapter; a good adapter and the base model give the
    same output before and after it was tried."""
    make_adapter(tiny_hf_model, tmp_path / "good", r=4, seed=1)
    poison(make_adapter(tiny_hf_model, tmp_path / "nan", r=4, seed=2), "v_proj.lora_B.weight", math.nan)
    make_adapter(tiny_hf_model, tmp_path / "nan-alpha", r=4, seed=3)
    edit_config(tmp_path / "nan-alpha", lora_alpha=math.nan)
    engine = start_engine(tiny_model_dir, adapters_dir=str(tmp_path), max_lora_rank=8, max_loras=2)
    server = ServerThread(loopback(), engine)
    try:
        with TandemClient(server.target, timeout=60) as client:
            def greedy(adapter: str = "") -> list[list[int]]:
                prompts = ["one two three", "a much longer prompt with many more words in it than the others", "x"]
                return [client.generate(p, max_new_tokens=8, adapter=adapter).token_ids for p in prompts]

            before = greedy(), greedy("good")
            for name in ("nan", "nan-alpha"):
                with pytest.raises(TandemRpcError) as info:
                    client.generate("hello", max_new_tokens=4, adapter=name)
                assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
                assert info.value.message.startswith(f"adapter {name!r} has ")
            assert (greedy(), greedy("good")) == before
    finally:
        server.stop()
        engine.shutdown()
