"""Training through our own forward gives the gradients of ordinary full-sequence training:
the A/B gradients of Tandem's path equal a `peft` model's on the same base and data."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tandem.server.engine.iteration import IGNORE_INDEX, TrainingSequence, TrainingWork
from tandem.server.finetune.trainable_adapter import LoRASpec, TrainableAdapter
from tests.adapters.make_adapters import ALL_LINEAR, ATTENTION
from tests.engine.helpers import make_engine, random_prompts

CASES = {
    "r4-all-linear": LoRASpec(r=4, lora_alpha=8, target_modules=ALL_LINEAR),
    "r16-attention-rslora": LoRASpec(r=16, lora_alpha=16, target_modules=ATTENTION, use_rslora=True),
    "r64-q-v": LoRASpec(r=64, lora_alpha=32, target_modules=("q_proj", "v_proj")),
    "r8-mlp": LoRASpec(r=8, lora_alpha=4, target_modules=("gate_proj", "down_proj")),
}


def randomize(adapter: TrainableAdapter, seed: int) -> None:
    """Non-zero B (PEFT starts it at zero, which would leave A without a gradient)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.a.values():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
        for p in adapter.b.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def peft_twin(hf_model, adapter: TrainableAdapter, dtype: torch.dtype = torch.float32):
    """A peft model with the same LoRA settings and weights as adapter, in dtype."""
    spec = adapter.spec
    config = LoraConfig(
        r=spec.r, lora_alpha=spec.lora_alpha, target_modules=list(spec.target_modules), use_rslora=spec.use_rslora,
        lora_dropout=spec.lora_dropout,
    )
    model = get_peft_model(copy.deepcopy(hf_model).to(dtype), config)
    model.train(spec.lora_dropout > 0)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in adapter.peft_tensors().items():
            params[key.replace(".weight", ".default.weight")].copy_(value)
    return model


def sequences(vocab: int, lengths: list[int], prompt_lens: list[int]) -> list[TrainingSequence]:
    """Random sequences whose first prompt_len tokens carry no loss (a prompt)."""
    out = []
    for ids, p in zip(random_prompts(lengths, vocab, seed=3), prompt_lens):
        out.append(TrainingSequence(ids, [IGNORE_INDEX] * p + ids[p:]))
    return out


def peft_loss(model, seqs: list[TrainingSequence]) -> torch.Tensor:
    """Hugging Face's loss on a right-padded batch: the mean over every target token."""
    width = max(s.num_tokens for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : s.num_tokens] = torch.tensor(s.input_ids)
        labels[i, : s.num_tokens] = torch.tensor(s.labels)
        mask[i, : s.num_tokens] = 1
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def our_gradients(adapter: TrainableAdapter) -> dict[str, torch.Tensor]:
    """The adapter's A/B gradients under the names of the peft twin's parameters."""
    ours = {}
    for kind, masters in (("lora_A", adapter.a), ("lora_B", adapter.b)):
        for layer_target, p in masters.items():
            layer, target = layer_target.split("_", 1)
            group = "self_attn" if target in ATTENTION else "mlp"
            ours[f"base_model.model.model.layers.{layer}.{group}.{target}.{kind}.default.weight"] = p.grad
    return ours


def assert_gradients_equal_peft(
    hf_model, tokenizer, spec: LoRASpec, lengths: list[int], prompt_lens: list[int], oracle: torch.dtype = torch.float32
) -> None:
    """Tandem's float32 A/B gradients against peft's in the oracle dtype. float32: to rtol 1e-4,
    atol 1e-6. float64 (a deep model, whose float32 gradients differ from the exact ones by
    rounding that grows with depth: peft's own float32 ones by up to 2.8e-5 of each tensor's
    largest element on SmolLM2): to rtol 1e-4 and 1e-4 of each tensor's largest element."""
    engine = make_engine(hf_model, tokenizer)
    adapter = TrainableAdapter(engine.runner.model, spec, seed=0)
    randomize(adapter, seed=1)
    seqs = sequences(len(tokenizer), lengths, prompt_lens)
    num_targets = sum(sum(label != IGNORE_INDEX for label in s.labels[1:]) for s in seqs)

    # With lora_dropout both draw their masks from the global generator, module by module.
    torch.manual_seed(11)
    work = TrainingWork(seqs, adapter.slot_weights(), dropout=spec.lora_dropout)
    result = engine.train(work, loss_scale=1 / num_targets)

    twin = peft_twin(hf_model, adapter, oracle)
    torch.manual_seed(11)
    loss = peft_loss(twin, seqs)
    loss.backward()
    assert (result.num_targets, result.num_tokens) == (num_targets, sum(lengths))
    torch.testing.assert_close(torch.tensor(result.loss_sum / num_targets), loss.detach().float(), rtol=1e-5, atol=1e-6)
    twin_grads = {name: p.grad for name, p in twin.named_parameters() if p.requires_grad}
    ours = our_gradients(adapter)
    assert ours.keys() == twin_grads.keys()
    for key, grad in ours.items():
        want = twin_grads[key]
        atol = 1e-6 if oracle == torch.float32 else 1e-4 * want.abs().max().item()
        torch.testing.assert_close(grad.to(oracle), want, rtol=1e-4, atol=atol, msg=key)
    # The frozen base never gets a gradient.
    assert all(p.grad is None for p in engine.runner.model.parameters())


@pytest.mark.parametrize("spec", CASES.values(), ids=CASES.keys())
def test_bfloat16_training_follows_the_exact_gradients(tiny_hf_model, smollm2_tokenizer, spec):
    """The default server trains in bfloat16 (--dtype auto where the CPU has AVX-512 BF16, and
    on GPUs), where a micro-batch of 128+ rows multiplies in bfloat16 (kernels/lora/reference.py):
    its A/B gradients stay within bfloat16's reach of the exact ones (float64 peft on the same
    bfloat16-rounded base): 1.6-3.1% of each tensor's norm measured (AMD EPYC), bounded at 6%.
    A float32 test cannot see that path; a wrong scale or transpose there is off by 100%."""
    rounded = copy.deepcopy(tiny_hf_model).to(torch.bfloat16).float()
    engine = make_engine(rounded, smollm2_tokenizer, dtype=torch.bfloat16)
    adapter = TrainableAdapter(engine.runner.model, spec, seed=0)
    randomize(adapter, seed=1)
    seqs = sequences(len(smollm2_tokenizer), [70, 60, 40], [20, 10, 5])
    num_targets = sum(sum(label != IGNORE_INDEX for label in s.labels[1:]) for s in seqs)
    result = engine.train(TrainingWork(seqs, adapter.slot_weights()), loss_scale=1 / num_targets)
    twin = peft_twin(rounded, adapter, torch.float64)
    loss = peft_loss(twin, seqs)
    loss.backward()
    assert result.loss_sum / num_targets == pytest.approx(loss.item(), rel=1e-3)
    twin_grads = {name: p.grad for name, p in twin.named_parameters() if p.requires_grad}
    ours = our_gradients(adapter)
    assert ours.keys() == twin_grads.keys()
    for key, grad in ours.items():
        want = twin_grads[key]
        assert (grad.double() - want).norm() <= 0.06 * want.norm(), key


@pytest.mark.parametrize("spec", CASES.values(), ids=CASES.keys())
def test_gradients_equal_peft(tiny_hf_model, smollm2_tokenizer, spec):
    """Sequences of different lengths in one step, some with a prompt that carries no loss."""
    assert_gradients_equal_peft(tiny_hf_model, smollm2_tokenizer, spec, [5, 23, 12], [2, 10, 0])


def test_gradients_equal_peft_with_lora_dropout(tiny_hf_model, smollm2_tokenizer):
    """lora_dropout draws a mask per module, as peft's do, also inside a fused q/k/v or
    gate/up group: with the same generator state, the same masks, the same gradients. (One
    sequence: peft draws over its padded batch.)"""
    spec = LoRASpec(r=4, lora_alpha=8, target_modules=ALL_LINEAR, lora_dropout=0.3)
    assert_gradients_equal_peft(tiny_hf_model, smollm2_tokenizer, spec, [19], [4])


@pytest.mark.smollm
def test_gradients_equal_peft_on_smollm2(smollm2_hf, smollm2_tokenizer):
    spec = LoRASpec(r=16, lora_alpha=32, target_modules=ALL_LINEAR)
    assert_gradients_equal_peft(smollm2_hf, smollm2_tokenizer, spec, [48, 17, 30], [20, 0, 5], oracle=torch.float64)


def test_gradients_equal_peft_with_runs_of_one_length(tiny_hf_model, smollm2_tokenizer):
    """Consecutive sequences of one length share an attention call; runs of several lengths
    and a lone sequence between them in one step."""
    spec = CASES["r4-all-linear"]
    assert_gradients_equal_peft(tiny_hf_model, smollm2_tokenizer, spec, [9, 9, 9, 4, 6, 6], [2, 0, 3, 0, 1, 0])
