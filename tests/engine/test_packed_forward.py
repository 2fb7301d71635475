"""The engine with its base weights reordered for oneDNN (bfloat16, and float32 on CPUs that
are not Intel's) gives the F.linear path's tokens and logits, and trains through the
reordered weights with its gradients."""

import pytest
import torch

from tandem.kernels import packed_linear, skinny_linear
from tandem.server.engine.iteration import TrainingWork
from tandem.server.engine.sampling_params import SamplingParams
from tandem.server.finetune.trainable_adapter import TrainableAdapter
from tandem.server.model.lora_targets import group_linears
from tests.engine.helpers import make_engine, random_prompts, run
from tests.engine.test_forward_oracle import record_logits
from tests.finetune.test_gradients import CASES, randomize, sequences

from tests.kernels.test_packed_linear import packed_dtypes

# Logits: bfloat16 rounds each GEMM's output; float32 paths differ in summation order only.
LOGITS_TOLERANCE = {torch.bfloat16: {"atol": 0.05, "rtol": 0.02}, torch.float32: {"atol": 1e-4, "rtol": 1e-4}}


def greedy_run(hf_model, tokenizer, dtype):
    engine = make_engine(hf_model, tokenizer, dtype=dtype, max_num_batched_tokens=40, block_size=8)
    seen = record_logits(engine)
    ps = random_prompts([5, 37, 1, 23], len(tokenizer))
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
    outputs = run(engine, {0: [("a", ps[0], greedy), ("b", ps[1], greedy)], 2: [("c", ps[2], greedy), ("d", ps[3], greedy)]})
    return engine, outputs, seen


@packed_dtypes
def test_an_engine_reorders_its_weights_when_built_not_in_its_first_request(tiny_hf_model, smollm2_tokenizer, dtype):
    """The first request would otherwise wait for every copy (SmolLM2: 0.84 s on 2 cores);
    the transposes a backward needs are made only for training (by a co-served job's creation).
    The skinny kernel's copies (where it is routed rows) are made with oneDNN's."""
    model = make_engine(tiny_hf_model, smollm2_tokenizer, dtype=dtype).runner.model
    assert all(linear.packed._packed is not None for linear in group_linears(model).values())
    assert model.lm_head_packed._packed is not None
    skinny = skinny_linear.ROUTED_ROWS[dtype] > 0 and skinny_linear.tile_cols(dtype) > 0
    assert all((linear.packed._skinny is not None) == skinny for linear in group_linears(model).values())
    assert (model.lm_head_packed._skinny is not None) == skinny
    assert all(linear.packed._transposed is None for linear in group_linears(model).values())
    model.prepack(for_training=True)
    assert all(linear.packed._transposed is not None for linear in group_linears(model).values())
    assert model.lm_head_packed._transposed is not None


@packed_dtypes
def test_packed_engine_gives_the_f_linear_engines_tokens_and_logits(tiny_hf_model, smollm2_tokenizer, monkeypatch, dtype):
    engine, packed_out, packed_logits = greedy_run(tiny_hf_model, smollm2_tokenizer, dtype)
    model = engine.runner.model
    assert all(linear.packed._packed is not None for linear in group_linears(model).values())
    assert model.lm_head_packed._packed is not None
    monkeypatch.setattr(packed_linear, "supported", lambda weight: False)
    engine, plain_out, plain_logits = greedy_run(tiny_hf_model, smollm2_tokenizer, dtype)
    assert all(linear.packed._packed is None for linear in group_linears(engine.runner.model).values())
    assert packed_out == plain_out
    for rid in plain_out:
        torch.testing.assert_close(torch.stack(packed_logits[rid]), torch.stack(plain_logits[rid]), **LOGITS_TOLERANCE[dtype])


def train_grads(engine) -> tuple[float, dict[str, torch.Tensor]]:
    adapter = TrainableAdapter(engine.runner.model, CASES["r4-all-linear"], seed=0)
    randomize(adapter, seed=1)
    seqs = sequences(engine.runner.model.shape.vocab_size, [5, 23, 12], [2, 10, 0])
    result = engine.train(TrainingWork(seqs, adapter.slot_weights()), loss_scale=1.0)
    return result.loss_sum, {k: p.grad for k, p in {**adapter.a, **adapter.b}.items()}


# Training: every base GEMM forward and backward sums in another order, so a gradient moves
# by some ulps of its largest element (float32: measured up to 4 ulps, of elements 5-9).
GRAD_TOLERANCE = {torch.bfloat16: 3e-2, torch.float32: 1e-5}


@packed_dtypes
def test_training_runs_through_the_reordered_weights_with_f_linears_gradients(tiny_hf_model, smollm2_tokenizer, monkeypatch, dtype):
    """Activation gradients flow through the frozen base: forward by the reordered weight,
    backward by the reordered transpose, made on the first backward."""
    engine = make_engine(tiny_hf_model, smollm2_tokenizer, dtype=dtype)
    loss, grads = train_grads(engine)
    # The first projection's input (the embedding) needs no gradient; every other one's does.
    transposed = {key: linear.packed._transposed is not None for key, linear in group_linears(engine.runner.model).items()}
    assert not transposed.pop((0, "qkv")) and all(transposed.values())
    monkeypatch.setattr(packed_linear, "supported", lambda weight: False)
    plain_loss, plain_grads = train_grads(make_engine(tiny_hf_model, smollm2_tokenizer, dtype=dtype))
    torch.testing.assert_close(loss, plain_loss, rtol=1e-3 if dtype == torch.bfloat16 else 1e-6, atol=0)
    assert grads.keys() == plain_grads.keys()
    for key, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, key
        scale = plain_grads[key].abs().max()
        torch.testing.assert_close(grad, plain_grads[key], rtol=GRAD_TOLERANCE[dtype], atol=GRAD_TOLERANCE[dtype] * scale, msg=key)
