"""End to end on SmolLM2: a mixed batch of 8 adapters matches `peft`, token for token."""

import copy

import pytest
import torch

from tandem.server.engine.sampling_params import SamplingParams
from tests.adapters.make_adapters import ALL_LINEAR, ATTENTION, make_adapter
from tests.engine.helpers import make_engine, run
from tests.engine.test_forward_oracle import record_logits
from tests.engine.test_smollm2 import QUESTIONS, chat_ids

pytestmark = pytest.mark.smollm

ADAPTERS = {
    "r4-attn": dict(r=4, target_modules=ATTENTION),
    "r8-all": dict(r=8, target_modules=ALL_LINEAR),
    "r16-qv": dict(r=16, target_modules=["q_proj", "v_proj"]),
    "r64-all": dict(r=64, target_modules=ALL_LINEAR, lora_alpha=32),
    "r16-rslora": dict(r=16, target_modules=ALL_LINEAR, use_rslora=True),
    "r8-pattern": dict(r=8, target_modules=ALL_LINEAR, rank_pattern={"q_proj": 16, "down_proj": 4}, alpha_pattern={"o_proj": 4}),
    "r8-regex": dict(r=8, target_modules=r".*\.(k_proj|up_proj|down_proj)"),
    "r32-mlp": dict(r=32, target_modules=["gate_proj", "up_proj", "down_proj"]),
}
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory, smollm2_hf):
    root = tmp_path_factory.mktemp("peft-adapters")
    for seed, (name, spec) in enumerate(ADAPTERS.items()):
        make_adapter(smollm2_hf, root / name, seed=seed, **spec)
    return root


@pytest.fixture(scope="module")
def peft_model(smollm2_hf, adapters_dir):
    from peft import PeftModel

    names = list(ADAPTERS)
    model = PeftModel.from_pretrained(copy.deepcopy(smollm2_hf), str(adapters_dir / names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters_dir / name), adapter_name=name)
    return model.eval()


def test_mixed_adapter_batch_matches_peft(smollm2_hf, smollm2_tokenizer, adapters_dir, peft_model):
    engine = make_engine(
        smollm2_hf, smollm2_tokenizer, dtype=torch.float32, adapters_dir=str(adapters_dir), max_lora_rank=64, max_loras=8,
        max_num_batched_tokens=128,
    )
    seen = record_logits(engine)
    params = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS)
    requests = [(name, chat_ids(smollm2_tokenizer, QUESTIONS[i])) for i, name in enumerate(ADAPTERS)]
    requests += [("", chat_ids(smollm2_tokenizer, QUESTIONS[8])), ("", chat_ids(smollm2_tokenizer, QUESTIONS[0]))]
    arrivals = {}
    for i, (name, ids) in enumerate(requests):
        adapter = engine.registry.get(name) if name else None
        arrivals.setdefault(i // 3, []).append((f"req{i}", ids, params, adapter))
    outputs = run(engine, arrivals)
    assert engine.registry.pool.stats().slots_in_use == len(ADAPTERS)

    for i, (name, ids) in enumerate(requests):
        if name:
            peft_model.set_adapter(name)
            context = torch.no_grad()
        else:
            context = peft_model.disable_adapter()
        with context, torch.no_grad():
            ref = peft_model.generate(input_ids=torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
            generated = ref[0, len(ids) :].tolist()
            logits = peft_model(input_ids=ref[:, :-1]).logits[0, len(ids) - 1 :].float()
        assert outputs[f"req{i}"] == generated, name or "base"
        torch.testing.assert_close(torch.stack(seen[f"req{i}"]), logits, rtol=1e-3, atol=1e-3)
    # The comparison means something only if the adapters ran past their first few tokens.
    assert sum(len(out) for out in outputs.values()) >= len(requests) * NEW_TOKENS // 2
    assert engine.stats().num_free_blocks == engine.stats().num_total_blocks
