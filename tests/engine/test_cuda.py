"""On CUDA, the engine against transformers and peft on the same GPU (skipped without CUDA).

The CPU suite checks the same contracts on the CPU. These catch what only the CUDA path runs:
the Triton LoRA kernels inside the model, slot loads on a side stream from pinned host memory,
and every per-step tensor placed on the device. The model is a tiny random Llama with a
word-level tokenizer, since GPU hosts have no SmolLM2 file.
"""

import contextlib
import copy
import json

import pytest
import torch

from tandem.server.engine.sampling_params import SamplingParams
from tests.adapters.make_adapters import ALL_LINEAR, make_adapter
from tests.conftest import make_tiny_hf_model
from tests.engine.helpers import make_engine, random_prompts, run
from tests.engine.test_forward_oracle import assert_matches_transformers, record_logits
from tests.word_tokenizer import word_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

VOCAB = 512
ADAPTERS = {
    "r8-all": dict(r=8, target_modules=ALL_LINEAR),
    "r16-qv": dict(r=16, target_modules=["q_proj", "v_proj"]),
    "r4-mlp": dict(r=4, target_modules=["gate_proj", "up_proj", "down_proj"], lora_alpha=8),
}
# bf16 logits against an fp32 oracle: relative error of the whole block, not elementwise.
BF16_REL_ERROR = 3e-2


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(VOCAB)


@pytest.fixture(scope="module")
def hf_cuda(tokenizer):
    return make_tiny_hf_model(tokenizer).to("cuda")


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory, hf_cuda):
    root = tmp_path_factory.mktemp("cuda-adapters")
    for seed, (name, spec) in enumerate(ADAPTERS.items()):
        make_adapter(hf_cuda, root / name, seed=seed, **spec)
    return root


@pytest.mark.parametrize("cache_bytes", [2 << 30, 1], ids=["slab", "over-budget"])
def test_a_cuda_slot_load_stages_the_adapter_from_its_pinned_file_bytes(hf_cuda, tokenizer, adapters_dir, cache_bytes):
    """Read into the page-locked slab, or (no room in the cache) into page-locked memory of
    its own: either way one buffer, which a slot load copies to the GPU at once."""
    from tests.adapters.test_slots import check_staged

    engine = make_engine(hf_cuda, tokenizer, dtype=torch.bfloat16, device="cuda", adapters_dir=str(adapters_dir),
                         max_lora_rank=16, adapter_cache_bytes=cache_bytes)
    adapter = engine.registry.get("r8-all")
    assert next(iter(adapter.groups.values())).slices[0][0].is_pinned()
    assert engine.registry.slab.stats().misses == (cache_bytes == 1)
    check_staged(adapter, torch.device("cuda"))


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def ragged_arrivals(tokenizer, params: SamplingParams) -> tuple[dict, list[list[int]]]:
    prompts = random_prompts([5, 37, 1, 64, 12, 23], VOCAB)
    rids = "abcdef"
    arrivals = {0: [], 2: [], 5: []}
    for i, (rid, prompt) in enumerate(zip(rids, prompts)):
        arrivals[(0, 2, 5)[i // 2]].append((rid, prompt, params))
    return arrivals, prompts


def test_ragged_batch_on_cuda_matches_transformers_float32(hf_cuda, tokenizer):
    engine = make_engine(hf_cuda, tokenizer, dtype=torch.float32, device="cuda", max_num_batched_tokens=40, block_size=8)
    assert engine.device.type == "cuda"
    seen = record_logits(engine)
    arrivals, prompts = ragged_arrivals(tokenizer, SamplingParams(temperature=0.0, max_new_tokens=9, ignore_eos=True))
    outputs = run(engine, arrivals)
    for rid, prompt in zip("abcdef", prompts):
        assert len(outputs[rid]) == 9
        assert_matches_transformers(hf_cuda, prompt, outputs[rid], [row.cpu() for row in seen[rid]])
    assert engine.stats().num_free_blocks == engine.stats().num_total_blocks


def test_ragged_batch_on_cuda_in_bfloat16_stays_near_float32_transformers(hf_cuda, tokenizer):
    engine = make_engine(hf_cuda, tokenizer, dtype=torch.bfloat16, device="cuda", max_num_batched_tokens=40, block_size=8)
    seen = record_logits(engine)
    arrivals, prompts = ragged_arrivals(tokenizer, SamplingParams(temperature=0.0, max_new_tokens=9, ignore_eos=True))
    outputs = run(engine, arrivals)
    for rid, prompt in zip("abcdef", prompts):
        full = torch.tensor([prompt + outputs[rid]], device="cuda")
        with torch.no_grad():
            ref = hf_cuda(full).logits[0, len(prompt) - 1 : -1].float()
        assert rel_error(torch.stack(seen[rid]), ref) < BF16_REL_ERROR, rid


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_adapter_batch_on_cuda_matches_peft(hf_cuda, tokenizer, adapters_dir, dtype):
    engine = make_engine(
        hf_cuda, tokenizer, dtype=dtype, device="cuda", adapters_dir=str(adapters_dir), max_lora_rank=16, max_loras=4,
        max_num_batched_tokens=64,
    )
    check_mixed_adapters_match_peft(engine, hf_cuda, adapters_dir, dtype)


@pytest.mark.parametrize("config", [dict(fused=False, split_k=4, block_n=32, num_warps=2), dict(fused=True, block_k=32, num_n_groups=2)],
                         ids=["two-launch", "fused"])
def test_tuned_decode_configs_serve_what_peft_computes(hf_cuda, tokenizer, adapters_dir, config, monkeypatch, tmp_path):
    """The committed tables are for Llama shapes: here a table for the tiny model's shapes
    sends its decode steps (in graphs) through the tuned launches. The table is in place
    before the engine captures its decode graphs at start-up: captured with the default
    launches, the graphs would replay those, whatever the table says."""
    from tandem.kernels.lora import triton_sgmv

    def engine():
        return make_engine(
            hf_cuda, tokenizer, dtype=torch.float32, device="cuda", adapters_dir=str(adapters_dir), max_lora_rank=16,
            max_loras=4, max_num_batched_tokens=64,
        )

    entry = triton_sgmv.config_entry(triton_sgmv.DecodeConfig(**config), 64)
    keys = {triton_sgmv.shape_key(w.in_features, w.out_slices) for w in engine().registry.pool.weights.values()}
    (tmp_path / "table.json").write_text(json.dumps({"configs": {key: [entry] for key in keys}}))
    monkeypatch.setattr(triton_sgmv, "tuned_table_path", lambda device: tmp_path / "table.json")
    triton_sgmv._tuned_tables.cache_clear()
    runs = []
    run_config = triton_sgmv.DecodeConfig.run
    monkeypatch.setattr(triton_sgmv.DecodeConfig, "run", lambda self, *a: runs.append(1) or run_config(self, *a))
    try:
        tuned = engine()
        assert tuned.runner.graphs is not None and runs  # the decode graphs were captured through the tuned launches
        check_mixed_adapters_match_peft(tuned, hf_cuda, adapters_dir, torch.float32)
    finally:
        triton_sgmv._tuned_tables.cache_clear()


def check_mixed_adapters_match_peft(engine, hf_cuda, adapters_dir, dtype):
    from peft import PeftModel

    seen = record_logits(engine)
    params = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    names = [*ADAPTERS, "", "r8-all"]
    prompts = random_prompts([7, 30, 3, 19, 11], VOCAB, seed=3)
    arrivals = {}
    for i, (name, prompt) in enumerate(zip(names, prompts)):
        adapter = engine.registry.get(name) if name else None
        arrivals.setdefault(i // 2, []).append((f"r{i}", prompt, params, adapter))
    outputs = run(engine, arrivals)
    assert engine.registry.pool.stats().slots_in_use == len(ADAPTERS)

    oracle = PeftModel.from_pretrained(copy.deepcopy(hf_cuda).float(), str(adapters_dir / names[0]), adapter_name=names[0])
    for name in ADAPTERS:
        if name != names[0]:
            oracle.load_adapter(str(adapters_dir / name), adapter_name=name)
    oracle.eval()
    for i, (name, prompt) in enumerate(zip(names, prompts)):
        full = torch.tensor([prompt + outputs[f"r{i}"]], device="cuda")
        if name:
            oracle.set_adapter(name)
        with oracle.disable_adapter() if not name else contextlib.nullcontext(), torch.no_grad():
            ref = oracle(input_ids=full).logits[0, len(prompt) - 1 : -1].float()
        got = torch.stack(seen[f"r{i}"]).float()
        if dtype == torch.float32:
            torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
            assert got.argmax(-1).tolist() == outputs[f"r{i}"]
        else:
            assert rel_error(got, ref) < BF16_REL_ERROR, name or "base"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_graphs_replay_what_the_eager_engine_computes(hf_cuda, tokenizer, adapters_dir, dtype):
    """The same requests (adapters of ranks 4-16 loading as they arrive, batches of 1-5 rows
    padded to their bucket) through captured decode steps and through eager ones. Every
    bucket was captured at start-up, with and without adapters: serving captures nothing."""
    outputs, logits, engines = {}, {}, {}
    for graphs in (True, False):
        engine = make_engine(
            hf_cuda, tokenizer, dtype=dtype, device="cuda", adapters_dir=str(adapters_dir), max_lora_rank=16,
            max_loras=4, max_num_batched_tokens=64, cuda_graphs=graphs,
        )
        seen = record_logits(engine)
        if graphs:  # what the served steps replayed: (rows, with adapters)
            replayed, forward = [], engine.runner.graphs.forward
            engine.runner.graphs.forward = lambda batch: replayed.append((batch.input_ids.shape[0], batch.lora is not None)) or forward(batch)
        params = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
        names = ["r4-mlp", "", "r8-all", "r16-qv", "r8-all"]
        prompts = random_prompts([7, 30, 3, 19, 11], VOCAB, seed=5)
        arrivals = {}
        for i, (name, prompt) in enumerate(zip(names, prompts)):
            arrivals.setdefault(2 * i, []).append((f"r{i}", prompt, params, engine.registry.get(name) if name else None))
        outputs[graphs] = run(engine, arrivals)
        logits[graphs] = {rid: torch.stack(rows).float() for rid, rows in seen.items()}
        engines[graphs] = engine
    assert engines[False].runner.graphs is None
    graphs = engines[True].runner.graphs
    # At start-up (these batches alone would capture 4 buckets twice); ranks 4-16 take the empty pool's tile.
    assert graphs.captures == 2 * len(graphs.sizes) > 8
    # Requests arrive every other step: the steps between arrivals decode 1 to 5 rows alone.
    assert {rows for rows, _ in replayed} >= {1, 2, 3, 4, 5} and all(lora for rows, lora in replayed if rows > 1)
    for rid, rows in logits[False].items():
        if dtype == torch.float32:
            assert outputs[True][rid] == outputs[False][rid]
            torch.testing.assert_close(logits[True][rid], rows, rtol=1e-4, atol=1e-4)
        else:  # cuBLAS may pick other kernels for a padded row count: bf16 rounding apart,
            # so greedy picks may part; the logits agree up to the first step that parts them.
            ours, theirs = outputs[True][rid], outputs[False][rid]
            upto = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours) - 1) + 1
            assert rel_error(logits[True][rid][:upto], rows[:upto]) < BF16_REL_ERROR, rid
