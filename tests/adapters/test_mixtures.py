"""Per-request mixtures on the tiny model: served logits equal a dense torch sum of the
members' PEFT-style deltas at fixed weights, in one batch with plain-adapter, base and routed
requests; every member is pinned while the mixture runs; malformed mixtures are refused."""

import copy

import pytest
import torch

from tandem.server.errors import InvalidRequest, NotFound
from tests.adapters.test_routers import GROUP_OF, adapters_dir, engine_for, expert_weights, greedy, oracle_model  # noqa: F401
from tests.engine.helpers import run
from tests.engine.test_forward_oracle import record_logits

# Members of mixed ranks (4 and 8), a negative weight, and one adapting q/v only.
MIXTURES = {"blend": [("e0", 0.7), ("e1", -0.4), ("e2", 1.3)], "partial": [("qv-only", 0.5), ("e3", 0.25)]}


def mixture_oracle(hf_model, adapters_dir, members: list[tuple[str, float]]):
    """The HF model with a forward hook on every projection adding sum_i w_i * B_i(A_i x) * scale_i."""
    model = copy.deepcopy(hf_model)
    weights = [(expert_weights(adapters_dir / name), w) for name, w in members]
    for layer_idx, layer in enumerate(model.model.layers):
        for target in GROUP_OF:
            attention = target in ("q_proj", "k_proj", "v_proj", "o_proj")
            path = f"model.layers.{layer_idx}.{'self_attn' if attention else 'mlp'}.{target}"
            deltas = [(member[path], w) for member, w in weights if path in member]
            getattr(layer.self_attn if attention else layer.mlp, target).register_forward_hook(_hook(deltas))
    return model


def _hook(deltas):
    def hook(module, inputs, output):
        x = inputs[0]
        for (a, b, scale), w in deltas:
            output = output + w * ((x @ a.t()) @ b.t()) * scale
        return output

    return hook


@pytest.mark.parametrize("router", ["mix", "same"])
def test_mixture_logits_equal_a_torch_sum_of_weighted_deltas_in_a_mixed_batch(tiny_hf_model, smollm2_tokenizer, adapters_dir, router):
    engine = engine_for(tiny_hf_model, smollm2_tokenizer, adapters_dir, max_loras=8)
    seen = record_logits(engine)
    prompts = [[5, 17, 300, 42, 9, 77, 1200], [8, 8, 450, 13], [99, 3, 4, 5, 6], [640, 2, 31], [7, 700, 70]]
    kinds = ["blend", "e1", "", router, "partial"]
    arrivals = {0: [], 1: []}
    for i, (prompt, kind) in enumerate(zip(prompts, kinds)):
        if kind in MIXTURES:
            adapter = engine.registry.mixture(MIXTURES[kind])
        else:
            adapter = engine.registry.get(kind) if kind else None
        arrivals[i % 2].append((f"req{i}", prompt, greedy(), adapter))
    outputs = run(engine, arrivals)

    for i, (prompt, kind) in enumerate(zip(prompts, kinds)):
        if kind in MIXTURES:
            oracle = mixture_oracle(tiny_hf_model, adapters_dir, MIXTURES[kind])
        else:
            oracle = oracle_model(tiny_hf_model, adapters_dir, kind) if kind else tiny_hf_model
        with torch.no_grad():
            expected = oracle(torch.tensor([prompt + outputs[f"req{i}"]])).logits[0, len(prompt) - 1 : -1].float()
        torch.testing.assert_close(torch.stack(seen[f"req{i}"]), expected, rtol=1e-3, atol=1e-3, msg=kind or "base")
    # The weights matter: the same members at weight 1 each give other logits.
    with torch.no_grad():
        unweighted = mixture_oracle(tiny_hf_model, adapters_dir, [(n, 1.0) for n, _ in MIXTURES["blend"]])
        other = unweighted(torch.tensor([prompts[0] + outputs["req0"]])).logits[0, len(prompts[0]) - 1 : -1]
    assert (torch.stack(seen["req0"]) - other).abs().max() > 1e-2


def test_a_running_mixture_pins_its_adapters_and_releases_them(tiny_hf_model, smollm2_tokenizer, adapters_dir):
    engine = engine_for(tiny_hf_model, smollm2_tokenizer, adapters_dir, max_loras=3)
    pool = engine.registry.pool
    engine.add_request("m", [5, 6, 7], greedy(), engine.registry.mixture(MIXTURES["blend"]))
    engine.step()
    assert sorted(pool._pins) == [1, 1, 1]
    assert {info.name: info.in_use for info in engine.registry.list()} == {"e0": 1, "e1": 1, "e2": 1}
    # A plain request for a fourth adapter waits: every slot is pinned by the mixture.
    engine.add_request("p", [5, 6], greedy(), engine.registry.get("qv-only"))
    engine.step()
    assert engine.scheduler.find("p").slot is None
    while engine.has_work():
        engine.step()
    assert sorted(pool._pins) == [0, 0, 0]
    assert all(info.in_use == 0 for info in engine.registry.list())


@pytest.mark.parametrize(
    "members, error, message",
    [
        ([("e0", 1.0), ("nope", 1.0)], NotFound, "adapter 'nope' not found"),
        ([("e0", 1.0), ("solo", 0.5)], InvalidRequest, "names 'solo', a router"),
        ([("e0", 1.0), ("e0", 0.5)], InvalidRequest, "names adapter 'e0' twice"),
        ([("e0", float("nan"))], InvalidRequest, "must be a finite number"),
        ([("e0", 1.0), ("e1", 1.0), ("e2", 1.0)], InvalidRequest, "at most 2 can be mixed"),
        ([], InvalidRequest, "at least one adapter"),
    ],
    ids=["unknown", "router", "twice", "nan", "slots", "empty"],
)
def test_malformed_mixtures_are_refused_with_the_reason(tiny_hf_model, smollm2_tokenizer, adapters_dir, members, error, message):
    registry = engine_for(tiny_hf_model, smollm2_tokenizer, adapters_dir, max_loras=2).registry
    with pytest.raises(error, match=message):
        registry.mixture(members)
