"""The engine with its base weights reordered for oneDNN (bfloat16, and float32 on CPUs that
are not Intel's) gives the F.linear path's tokens and logits, and trains through F.linear
with the same gradients."""

import pytest
import torch

from tandem.kernels import packed_linear
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


def train_grads(hf_model, tokenizer, dtype) -> tuple[float, dict[str, torch.Tensor]]:
    engine = make_engine(hf_model, tokenizer, dtype=dtype)
    adapter = TrainableAdapter(engine.runner.model, CASES["r4-all-linear"], seed=0)
    randomize(adapter, seed=1)
    seqs = sequences(len(tokenizer), [5, 23, 12], [2, 10, 0])
    result = engine.train(TrainingWork(seqs, adapter.slot_weights()), loss_scale=1.0)
    return result.loss_sum, {k: p.grad for k, p in {**adapter.a, **adapter.b}.items()}


@packed_dtypes
def test_training_runs_through_f_linear_with_the_same_gradients(tiny_hf_model, smollm2_tokenizer, monkeypatch, dtype):
    """Activation gradients flow through the frozen base; oneDNN's linear has no backward,
    and a training forward keeps F.linear even where its input needs none (the first layer)."""
    loss, grads = train_grads(tiny_hf_model, smollm2_tokenizer, dtype)
    monkeypatch.setattr(packed_linear, "supported", lambda weight: False)
    plain_loss, plain_grads = train_grads(tiny_hf_model, smollm2_tokenizer, dtype)
    assert loss == plain_loss
    assert grads.keys() == plain_grads.keys()
    for key, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, key
        assert torch.equal(grad, plain_grads[key]), key
