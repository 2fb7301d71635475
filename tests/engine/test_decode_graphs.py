"""Decode graphs' static-buffer forward on CPU (capture=False: the same buffers, padding and
copies a CUDA graph replays, run eagerly) against the engine without it: same tokens, same
logits, batches of every size so that rows are padded. The capture itself, and steps with
adapters, are checked on CUDA (tests/engine/test_cuda.py)."""

import pytest
import torch

from tandem.kernels import decode_attention
from tandem.server.engine.decode_graphs import DecodeGraphs, buckets
from tandem.server.engine.sampling_params import SamplingParams
from tests.adapters.make_adapters import ALL_LINEAR, make_adapter
from tests.engine.helpers import make_engine, random_prompts, run
from tests.engine.test_forward_oracle import record_logits

needs_native = pytest.mark.skipif(
    decode_attention.library() is None, reason="on CPU the static forward needs the C decode kernel (no compiler here)"
)


def test_buckets_cover_every_batch_size_up_to_the_largest():
    sizes = buckets(100)
    assert sizes[:4] == [1, 2, 4, 8] and sizes[-1] == 104 and all(b % 8 == 0 for b in sizes[3:])
    assert buckets(3) == [1, 2, 8]
    assert buckets(256)[-1] == 256


def with_static_decode(engine) -> list[int]:
    """Route the engine's decode steps through a non-capturing DecodeGraphs, set up as the
    engine sets up its graphs on CUDA (every bucket at start); returns a list that records
    the row count of each forward it took."""
    runner = engine.runner
    pool = engine.registry.pool if engine.registry is not None else None
    graphs = DecodeGraphs(runner.model, runner.kv_cache, engine.config.max_num_seqs, engine.max_model_len,
                          0 if pool is None else pool.num_slots, capture=False)
    graphs.capture_all(engine.device, None if pool is None else pool.weights)
    taken: list[int] = []
    forward = graphs.forward
    graphs.forward = lambda batch: taken.append(batch.input_ids.shape[0]) or forward(batch)
    runner.graphs = graphs
    return taken


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory, tiny_hf_model):
    root = tmp_path_factory.mktemp("graph-adapters")
    make_adapter(tiny_hf_model, root / "all", r=8, target_modules=ALL_LINEAR, seed=1)
    make_adapter(tiny_hf_model, root / "qv", r=4, target_modules=["q_proj", "v_proj"], seed=2)
    return root


def arrivals(engine, names: list[str]) -> dict[int, list[tuple]]:
    """Seven requests arriving every other iteration, each decoding past the last arrival,
    so that decode batches of 1 to 7 rows (padded to 1, 2, 4 or 8) run, with the adapters
    named (\"\" for none)."""
    params = SamplingParams(temperature=0.0, max_new_tokens=14, ignore_eos=True)
    prompts = random_prompts([5, 9, 3, 12, 7, 4, 6], 400, seed=4)
    out: dict[int, list[tuple]] = {}
    for i, prompt in enumerate(prompts):
        name = names[i % len(names)]
        adapter = engine.registry.get(name) if name else None
        out.setdefault(2 * i, []).append((f"r{i}", prompt, params, adapter))
    return out


@needs_native
def test_static_decode_forward_equals_the_eager_one(tiny_hf_model, smollm2_tokenizer):
    eager = make_engine(tiny_hf_model, smollm2_tokenizer, max_num_seqs=16)
    static = make_engine(tiny_hf_model, smollm2_tokenizer, max_num_seqs=16)
    taken = with_static_decode(static)
    seen_eager, seen_static = record_logits(eager), record_logits(static)
    out_eager = run(eager, arrivals(eager, [""]))
    out_static = run(static, arrivals(static, [""]))
    assert out_static == out_eager
    assert set(taken) >= {1, 2, 3, 4, 5, 6, 7}  # padded to buckets 1, 2, 4 and 8
    for rid in out_eager:
        torch.testing.assert_close(torch.stack(seen_static[rid]), torch.stack(seen_eager[rid]), rtol=1e-5, atol=1e-5)


def test_without_capture_steps_with_adapters_stay_eager(tiny_hf_model, smollm2_tokenizer, adapters_dir):
    engine = make_engine(tiny_hf_model, smollm2_tokenizer, adapters_dir=str(adapters_dir), max_lora_rank=8, max_loras=4)
    taken = with_static_decode(engine)
    run(engine, arrivals(engine, ["all", "qv"]))
    assert not taken


def test_steps_with_prefills_stay_eager(tiny_hf_model, smollm2_tokenizer):
    engine = make_engine(tiny_hf_model, smollm2_tokenizer, max_num_seqs=4)
    taken = with_static_decode(engine)
    params = SamplingParams(temperature=0.0, max_new_tokens=3, ignore_eos=True)
    prompts = random_prompts([6, 6], 400)
    # Step 0 prefills a; step 1 decodes a beside b's prefill; step 2 decodes a and b (a's
    # last token), step 3 b alone: only those two.
    run(engine, {0: [("a", prompts[0], params)], 1: [("b", prompts[1], params)]})
    assert taken == [2, 1]


@needs_native
def test_a_bucket_without_memory_to_capture_runs_eagerly(tiny_hf_model, smollm2_tokenizer, monkeypatch, caplog):
    eager = make_engine(tiny_hf_model, smollm2_tokenizer, max_num_seqs=8)
    engine = make_engine(tiny_hf_model, smollm2_tokenizer, max_num_seqs=8)

    def out_of_memory(self, size, weights):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(DecodeGraphs, "_record", out_of_memory)
    with caplog.at_level("WARNING"):
        with_static_decode(engine)  # the start-up captures fail
        assert "runs eagerly" in caplog.text
        assert run(engine, arrivals(engine, [""])) == run(eager, arrivals(eager, [""]))


@needs_native
def test_decodes_beside_coserved_training_go_through_the_graphs_and_both_stay_exact(tiny_hf_model, smollm2_tokenizer):
    """Decode-only steps beside a co-served micro-batch's head and backward slices replay the
    graphs; a step that carries its forward chunk's training rows never does. The requests'
    tokens are those of an idle engine, the gradients those of the micro-batch alone."""
    from tandem.server.finetune.trainable_adapter import LoRASpec, TrainableAdapter
    from tests.finetune.test_coserve import coserve, grads, sequences, smollm2_head
    from tests.finetune.test_gradients import randomize

    prompts = random_prompts([30, 5, 12], len(smollm2_tokenizer), seed=11)
    params = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
    arrivals = {0: [("a", prompts[0], params)], 2: [("b", prompts[1], params), ("c", prompts[2], params)]}
    config = dict(max_num_batched_tokens=48, block_size=4, kv_cache_bytes=4 << 20, max_num_seqs=8)
    expected_tokens = run(make_engine(tiny_hf_model, smollm2_tokenizer, **config), arrivals)

    engine = smollm2_head(make_engine(tiny_hf_model, smollm2_tokenizer, **config))
    adapter = TrainableAdapter(engine.runner.model, LoRASpec(r=4), seed=0)
    randomize(adapter, seed=2)
    seqs = sequences(len(smollm2_tokenizer))
    coserve(engine, adapter, seqs, 0.01)
    alone = grads(adapter)

    with_static_decode(engine)
    steps, graphed = [], []
    execute, forward = engine.runner.execute, engine.runner.graphs.forward

    def recording(scheduled):
        steps.append(scheduled)
        return execute(scheduled)

    def replayed(batch):
        graphed.append((steps[-1], batch.train_lora is not None or batch.kept is not None))
        return forward(batch)

    engine.runner.execute, engine.runner.graphs.forward = recording, replayed
    _, outputs = coserve(engine, adapter, seqs, 0.01, arrivals)

    assert outputs == expected_tokens
    for name, grad in grads(adapter).items():
        torch.testing.assert_close(grad, alone[name], rtol=1e-4, atol=1e-6, msg=name)
    assert not any(carried for _, carried in graphed)
    assert any(s.train_forward is not None and s.decodes for s in steps)  # forward chunks beside decodes ran eagerly
    assert any(s.train_backward is not None or s.train_head is not None for s, _ in graphed)
