"""Routers (mixtures of LoRA experts) on the tiny model: served logits equal a plain torch
implementation (dense gates, top-k softmax with temperature, a loop over experts with
PEFT-style deltas) in a batch mixed with plain-adapter and base requests; experts are pinned
while a router runs; mismatched routers are refused with the reason."""

import copy
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tandem.server.adapters import router_format
from tandem.server.adapters.peft_format import LoRAAdapter, max_file_bytes
from tandem.server.adapters.router_format import CONFIG_FILE, GATES_FILE, Router, router_config, router_files, write_router
from tandem.server.atomic_files import write_directory
from tandem.server.engine.sampling_params import SamplingParams
from tandem.server.errors import FailedPrecondition, IncompatibleAdapter, NotFound, Unavailable
from tests.adapters.make_adapters import ALL_LINEAR, make_adapter
from tests.engine.helpers import make_engine, run
from tests.engine.test_forward_oracle import record_logits

EXPERTS = {"e0": 4, "e1": 8, "e2": 8}
# Routers as (experts, top_k, temperature): experts of mixed ranks (served as pairs grouped
# by slot), of one rank (on CPU served dense over the experts), and one with fewer experts
# and a smaller top_k than the others it shares a step with.
ROUTERS = {"mix": (["e0", "e1", "e2"], 2, 0.7), "same": (["e1", "e2", "e3"], 2, 0.7), "solo": (["e3", "e1"], 1, 1.3)}
GROUP_OF = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "gate_up", "up_proj": "gate_up", "down_proj": "down"}
NEW_TOKENS = 6


def random_gates(model, num_experts: int, seed: int, groups=("qkv", "o", "gate_up", "down")) -> dict:
    g = torch.Generator().manual_seed(seed)
    config = model.config
    inputs = {"qkv": config.hidden_size, "o": config.hidden_size, "gate_up": config.hidden_size, "down": config.intermediate_size}
    return {
        (layer, group): torch.randn(num_experts, inputs[group], generator=g)
        for layer in range(config.num_hidden_layers)
        for group in groups
    }


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory, tiny_hf_model) -> Path:
    root = tmp_path_factory.mktemp("router-adapters")
    for seed, (name, r) in enumerate({**EXPERTS, "e3": 8}.items()):
        make_adapter(tiny_hf_model, root / name, r=r, target_modules=ALL_LINEAR, seed=seed, b_std=0.2)
    make_adapter(tiny_hf_model, root / "qv-only", r=4, target_modules=["q_proj", "v_proj"], seed=7)
    for seed, (name, (experts, top_k, temperature)) in enumerate(ROUTERS.items()):
        gates = random_gates(tiny_hf_model, len(experts), seed=3 + seed)
        write_router(root / name, router_config(experts, top_k, temperature), gates)
    return root


def expert_weights(adapter_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """PEFT module path -> (A, B, alpha / r) of one adapter, as peft would apply it."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        if key.endswith("lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = tensors[key.replace("lora_A", "lora_B")]
            out[module] = (a, b, config["lora_alpha"] / a.shape[0])
    return out


def oracle_model(hf_model, adapters_dir: Path, name: str, usage: list | None = None):
    """The HF model with a forward hook on every projection adding the delta of adapter
    `name`: for a router, top-k softmax(gate x / T) over its experts; for an adapter, that one
    expert at weight 1. usage, when given, collects a router's mixture weights at each gated
    linear (once per fused group)."""
    model = copy.deepcopy(hf_model)
    experts, top_k, temperature = ROUTERS.get(name, ([name], 1, 1.0))
    gates = None
    if name in ROUTERS:
        gates = load_file(str(adapters_dir / name / GATES_FILE))
        gates = {(int(k.split(".")[1]), k.split(".")[2]): g for k, g in gates.items()}
    weights = [expert_weights(adapters_dir / e) for e in experts]
    for layer_idx, layer in enumerate(model.model.layers):
        for target, group in GROUP_OF.items():
            parent = layer.self_attn if target in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
            module = getattr(parent, target)
            path = f"model.layers.{layer_idx}.{'self_attn' if parent is layer.self_attn else 'mlp'}.{target}"
            gate = None if gates is None else gates[(layer_idx, group)]
            first_of_group = target in ("q_proj", "o_proj", "gate_proj", "down_proj")
            hook = _hook([w[path] for w in weights], gate, top_k, temperature, usage if first_of_group else None)
            module.register_forward_hook(hook)
    return model


def _hook(expert_weights: list, gate: torch.Tensor | None, top_k: int, temperature: float, usage: list | None):
    def hook(module, inputs, output):
        x = inputs[0]
        if gate is None:
            mix = torch.ones(*x.shape[:-1], 1)
        else:
            top = (x @ gate.t() / temperature).topk(top_k, dim=-1)
            mix = torch.zeros(*x.shape[:-1], gate.shape[0]).scatter(-1, top.indices, torch.softmax(top.values, -1))
            if usage is not None:
                usage.append(mix[0])
        for e, (a, b, scale) in enumerate(expert_weights):
            output = output + mix[..., e : e + 1] * ((x @ a.t()) @ b.t()) * scale
        return output

    return hook


def greedy() -> SamplingParams:
    return SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


def engine_for(tiny_hf_model, tokenizer, adapters_dir, **config):
    return make_engine(tiny_hf_model, tokenizer, adapters_dir=str(adapters_dir), max_lora_rank=8, kv_cache_bytes=1 << 22, **config)


@pytest.mark.parametrize("first, second", [("mix", "mix"), ("same", "same"), ("same", "solo"), ("mix", "solo")])
def test_router_logits_equal_a_torch_mixture_in_a_mixed_batch(tiny_hf_model, smollm2_tokenizer, adapters_dir, first, second):
    engine = engine_for(tiny_hf_model, smollm2_tokenizer, adapters_dir, max_loras=4)
    seen = record_logits(engine)
    prompts = [[5, 17, 300, 42, 9, 77, 1200], [8, 8, 450, 13], [99, 3, 4, 5, 6], [640, 2, 31]]
    kinds = [first, "e1", "", second]
    arrivals = {0: [], 1: []}
    for i, (prompt, kind) in enumerate(zip(prompts, kinds)):
        adapter = engine.registry.get(kind) if kind else None
        arrivals[i % 2].append((f"req{i}", prompt, greedy(), adapter))
    outputs = run(engine, arrivals)

    oracles = {kind: oracle_model(tiny_hf_model, adapters_dir, kind) for kind in {first, second, "e1"}} | {"": tiny_hf_model}
    for i, (prompt, kind) in enumerate(zip(prompts, kinds)):
        full = torch.tensor([prompt + outputs[f"req{i}"]])
        with torch.no_grad():
            expected = oracles[kind](full).logits[0, len(prompt) - 1 : -1].float()
        torch.testing.assert_close(torch.stack(seen[f"req{i}"]), expected, rtol=1e-3, atol=1e-3, msg=kind or "base")
    # The mixture changes the output: the comparison is not of base logits with themselves.
    with torch.no_grad():
        base = tiny_hf_model(torch.tensor([prompts[0] + outputs["req0"]])).logits[0, len(prompts[0]) - 1 : -1]
    assert (torch.stack(seen["req0"]) - base).abs().max() > 1e-2


def test_each_token_reports_the_expert_its_gates_weighted_most(tiny_hf_model, smollm2_tokenizer, adapters_dir):
    engine = engine_for(tiny_hf_model, smollm2_tokenizer, adapters_dir, max_loras=4)
    prompt = [5, 17, 300, 42, 9, 77, 1200]
    engine.add_request("r", prompt, greedy(), engine.registry.get("mix"))
    engine.add_request("p", [8, 8, 450], greedy(), engine.registry.get("e1"))
    tokens, experts, plain = [], [], []
    while engine.has_work():
        for out in engine.step():
            if out.request_id == "r":
                tokens += out.token_ids
                experts += out.top_experts
            else:
                plain.append(out.top_experts)
    usage: list[torch.Tensor] = []
    model = oracle_model(tiny_hf_model, adapters_dir, "mix", usage)
    with torch.no_grad():
        model(torch.tensor([prompt + tokens[:-1]]))
    top = torch.stack(usage).sum(0).argmax(-1)[len(prompt) - 1 :]
    assert experts == [ROUTERS["mix"][0][e] for e in top.tolist()] and len(experts) == NEW_TOKENS
    assert plain == [None] * NEW_TOKENS
    # Every routed token computed (prompt and generated, but the last) counts once.
    counts = engine.stats().router_expert_tokens
    assert set(counts) <= {("mix", e) for e in ROUTERS["mix"][0]}
    assert sum(counts.values()) == len(prompt) + NEW_TOKENS - 1


def test_tokens_a_preemption_recomputes_are_counted_once_per_expert(tiny_hf_model, smollm2_tokenizer, adapters_dir):
    """router_expert_tokens counted every routed row of every forward: a preempted request's
    recomputed prompt and tokens counted again (79 for 63 tokens)."""
    from tandem.server.engine.kv_cache import KVCache
    from tests.engine.helpers import random_prompts

    shape = engine_for(tiny_hf_model, smollm2_tokenizer, adapters_dir).runner.model.shape
    engine = make_engine(tiny_hf_model, smollm2_tokenizer, adapters_dir=str(adapters_dir), max_lora_rank=8, max_loras=4,
                         block_size=4, kv_cache_bytes=12 * KVCache.bytes_per_block(shape, 4, torch.float32))
    prompts = random_prompts([10, 9, 11], len(smollm2_tokenizer), seed=2)
    params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params, engine.registry.get("same"))
    while engine.has_work():
        engine.step()
    assert engine.stats().num_preemptions >= 1
    assert sum(engine.stats().router_expert_tokens.values()) == sum(len(p) + 12 - 1 for p in prompts)


def test_a_running_router_pins_its_experts_and_releases_them(tiny_hf_model, smollm2_tokenizer, adapters_dir):
    engine = engine_for(tiny_hf_model, smollm2_tokenizer, adapters_dir, max_loras=3)
    pool = engine.registry.pool
    engine.add_request("r", [5, 6, 7], greedy(), engine.registry.get("mix"))
    engine.step()
    assert sorted(pool._pins) == [1, 1, 1]
    assert {info.name: info.in_use for info in engine.registry.list()} == {"mix": 1, "e0": 1, "e1": 1, "e2": 1}
    # A plain request for a fourth adapter waits: every slot is pinned by the router's experts.
    engine.add_request("p", [5, 6], greedy(), engine.registry.get("qv-only"))
    engine.step()
    assert engine.scheduler.find("p").slot is None
    while engine.has_work():
        engine.step()
    assert sorted(pool._pins) == [0, 0, 0]


def test_routers_are_listed_and_unloaded_like_adapters(tiny_hf_model, smollm2_tokenizer, adapters_dir):
    registry = engine_for(tiny_hf_model, smollm2_tokenizer, adapters_dir, max_loras=4).registry
    info = registry.load("mix")
    assert info.experts == list(EXPERTS) and info.rank == 8 and info.path == "mix"
    assert {i.name for i in registry.list()} == {"mix", *EXPERTS}
    registry.unload("mix")
    with pytest.raises(NotFound, match="was unloaded"):
        registry.get("mix")


def test_a_name_republished_as_the_other_kind_is_served_as_the_new_kind(tiny_hf_model, smollm2_tokenizer, adapters_dir, tmp_path):
    """A router's name published as a LoRA adapter (a merge, a fine-tune) serves the adapter,
    also after its cached version is checked again (the router stayed cached beside it and
    came back), and a LoRA adapter's name published as a router serves the router."""
    root = tmp_path / "adapters"
    root.mkdir()
    for name in ["e0", "e1", "e2", "mix"]:
        shutil.copytree(adapters_dir / name, root / name)
    registry = engine_for(tiny_hf_model, smollm2_tokenizer, root, max_loras=4, adapter_refresh_seconds=0).registry
    assert isinstance(registry.get("mix"), Router)
    shutil.rmtree(root / "mix")
    shutil.copytree(adapters_dir / "e1", root / "mix")
    registry.load("mix")
    assert [type(registry.get("mix")) for _ in range(2)] == [LoRAAdapter, LoRAAdapter]
    assert [i.format for i in registry.list() if i.name == "mix"] == ["peft"]
    shutil.rmtree(root / "e2")
    write(root, "e2", ["e0", "e1"], random_gates(tiny_hf_model, 2, 0))
    assert isinstance(registry.get("e2"), LoRAAdapter)
    registry.load("e2")
    assert [type(registry.get("e2")) for _ in range(2)] == [Router, Router]


def test_a_router_republished_while_it_is_read_is_served_as_one_version(tiny_hf_model, smollm2_tokenizer, adapters_dir, tmp_path, monkeypatch):
    """A publish landing between the read of router_config.json and that of its gates was
    served (and cached) as one version's experts, top_k and temperature with the other's
    gates: the router is read again, whole; one that changes during every read is refused."""
    for name in ["e0", "e1"]:
        shutil.copytree(adapters_dir / name, tmp_path / name)
    gates = [random_gates(tiny_hf_model, 2, seed) for seed in (0, 1)]
    versions = [router_files(router_config(["e0", "e1"], 1, 1.0), gates[0]), router_files(router_config(["e1", "e0"], 2, 0.5), gates[1])]
    write_directory(tmp_path / "r", versions[0])
    registry = engine_for(tiny_hf_model, smollm2_tokenizer, tmp_path, max_loras=2).registry
    read_hashed, publishes = router_format.read_hashed, []

    def republishing(every_read: bool):
        def read(*args):  # after the config is read, before the gates are
            if every_read or not publishes:
                publishes.append(1)
                write_directory(tmp_path / "r", versions[len(publishes) % 2])
            return read_hashed(*args)

        return read

    monkeypatch.setattr(router_format, "read_hashed", republishing(every_read=False))
    router = registry.get("r")
    assert router.content_hash == hashlib.sha256(versions[1][CONFIG_FILE] + versions[1][GATES_FILE]).hexdigest()
    assert (router.experts, router.top_k, router.temperature) == (("e1", "e0"), 2, 0.5)
    assert all(torch.equal(router.gates[key], gate) for key, gate in gates[1].items())
    monkeypatch.setattr(router_format, "read_hashed", republishing(every_read=True))
    with pytest.raises(Unavailable, match="adapter 'r' changed on disk during each of 3 reads of its files"):
        registry.load("r")
    assert registry.get("r").content_hash == router.content_hash


def write(root: Path, name: str, experts: list[str], gates: dict, **config) -> None:
    write_router(root / name, {**router_config(experts), **config}, gates)


def write_gates(root: Path, name: str, gates: dict[str, torch.Tensor]) -> None:
    """A router of two experts whose gates file holds exactly `gates` (keys as written)."""
    write(root, name, ["e0", "e1"], {})
    save_file(gates, str(root / name / GATES_FILE))


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda m, d: write(d, "r", ["e0", "nope"], random_gates(m, 2, 0)), NotFound, "uses expert 'nope'"),
        (lambda m, d: write(d, "r", ["e0", "qv-only"], random_gates(m, 2, 0)), IncompatibleAdapter,
         r"gates layer 0 down \(down_proj\), which its expert 'qv-only' does not adapt"),
        (lambda m, d: write(d, "r", ["e0", "e1"], {(0, "qkv"): torch.randn(2, 96)}), IncompatibleAdapter,
         r"layers.0.qkv.weight is \[2, 96\], the base layer needs \[2 experts, 64 inputs\]"),
        (lambda m, d: write(d, "r", ["e0", "e1"], {(5, "qkv"): torch.randn(2, 64)}), IncompatibleAdapter,
         "gates layer 5; the base model has 2 layers"),
        (lambda m, d: write(d, "r", ["e0", "mix"], random_gates(m, 2, 0)), FailedPrecondition, "'mix', a router"),
        (lambda m, d: write(d, "r", ["e0", "e1"], random_gates(m, 2, 0), top_k=3), IncompatibleAdapter, "top_k 3"),
        (lambda m, d: write(d, "r", ["e0", "e1"], random_gates(m, 2, 0), temperature=1e-40), IncompatibleAdapter,
         "has temperature 1e-40; it must be a finite number of at least 0.0001"),
        # An integer past any float: math.isfinite raised OverflowError (INTERNAL for every request).
        (lambda m, d: write(d, "r", ["e0", "e1"], random_gates(m, 2, 0), temperature=10**400), IncompatibleAdapter,
         "has temperature .*; it must be a finite number of at least 0.0001"),
        (lambda m, d: write(d, "r", ["e0", "e1", "e2"], random_gates(m, 3, 0)), FailedPrecondition,
         "mixes 3 experts, more than the server's 2 adapter slots"),
        (lambda m, d: (d / "r").mkdir() or (d / "r" / CONFIG_FILE).write_text("{}"), IncompatibleAdapter,
         f"has no {GATES_FILE}"),
        (lambda m, d: write_gates(d, "r", {f"layers.{'9' * 5000}.qkv.weight": torch.randn(2, 64)}), IncompatibleAdapter,
         "has an unexpected tensor 'layers.999"),
        # One gate spelled twice: which copy served depended on the file's key order.
        (lambda m, d: write_gates(d, "r", {"layers.1.qkv.weight": torch.randn(2, 64), "layers.01.qkv.weight": torch.randn(2, 64)}),
         IncompatibleAdapter, "has an unexpected tensor 'layers.01.qkv.weight'"),
    ],
    ids=["unknown-expert", "missing-target", "other-base", "too-many-layers", "nested-router", "top-k", "tiny-temperature", "huge-temperature", "slots", "no-gates",
         "layer-of-5000-digits", "leading-zero"],
)
def test_mismatched_routers_are_refused_with_the_reason(tiny_hf_model, smollm2_tokenizer, adapters_dir, tmp_path, make, error, message):
    root = tmp_path / "adapters"
    root.mkdir()
    for name in ["e0", "e1", "e2", "qv-only", "mix"]:
        shutil.copytree(adapters_dir / name, root / name)
    make(tiny_hf_model, root)
    registry = engine_for(tiny_hf_model, smollm2_tokenizer, root, max_loras=2).registry
    with pytest.raises(error, match=message):
        registry.get("r")


def test_a_router_of_one_expert_that_names_no_top_k_routes_to_it(tiny_hf_model, smollm2_tokenizer, adapters_dir, tmp_path):
    """An unset top_k defaulted to 2, over its one expert: refused for a top_k its file never named."""
    shutil.copytree(adapters_dir / "e0", tmp_path / "e0")
    write(tmp_path, "r", ["e0"], random_gates(tiny_hf_model, 1, 0))
    config = json.loads((tmp_path / "r" / CONFIG_FILE).read_text())
    config.pop("top_k", None)
    (tmp_path / "r" / CONFIG_FILE).write_text(json.dumps(config))
    registry = engine_for(tiny_hf_model, smollm2_tokenizer, tmp_path, max_loras=2).registry
    assert registry.get("r").top_k == 1


def test_a_router_of_more_experts_than_slots_is_refused_before_its_gates_file_is_read(tiny_hf_model, smollm2_tokenizer, tmp_path, monkeypatch):
    """The gates file's size limit grows with the experts the config lists (1 MiB of config
    lists 200k): the whole file was read before the slot check refused the router."""
    registry = engine_for(tiny_hf_model, smollm2_tokenizer, tmp_path, max_loras=2).registry
    write(tmp_path, "r", [f"e{i}" for i in range(1000)], {})
    with open(tmp_path / "r" / GATES_FILE, "r+b") as f:  # sparse, as large as 1000 experts' gates may be
        f.truncate(max_file_bytes(registry.model, 1000))
    reads, read_hashed = [], router_format.read_hashed
    monkeypatch.setattr(router_format, "read_hashed", lambda path, *args: reads.append(path) or read_hashed(path, *args))
    with pytest.raises(FailedPrecondition) as refused:
        registry.get("r")
    assert str(refused.value) == (
        "router 'r' mixes 1000 experts, more than the server's 2 adapter slots: raise --max-loras (and --lora-pool-bytes)"
    )
    assert reads == []


def test_tied_gates_pick_the_first_experts_whatever_shares_the_step():
    """Zero gates (how gate training starts) tie every expert: topk's order among ties changed
    with the step's widest router, so one request's experts, and its tokens, changed with the
    routers batched beside it."""
    from tandem.server.model.routing import RoutedRows, StepRouter

    x, cpu = torch.randn(1, 64, generator=torch.Generator().manual_seed(0)), torch.device("cpu")
    zero4 = StepRouter({(0, "qkv"): torch.zeros(4, 64)}, (0, 1, 2, 3), 2, 1.0)
    wide = StepRouter({(0, "qkv"): torch.randn(8, 64)}, tuple(range(4, 12)), 2, 1.0)
    zero8 = StepRouter({(0, "qkv"): torch.zeros(8, 64)}, tuple(range(8)), 2, 1.0)
    alone = RoutedRows.build([zero4], [0], [0], cpu).route(x, (0, "qkv"))
    beside = RoutedRows.build([zero4, wide], [0, 1], [0, 1], cpu).route(torch.cat([x, x]), (0, "qkv"))
    eight = RoutedRows.build([zero8], [0], [0], cpu).route(x, (0, "qkv"))
    assert alone[0][0].tolist() == beside[0][0].tolist() == eight[0][0].tolist() == [0, 1]
    assert alone[1][0].tolist() == [0.5, 0.5]
