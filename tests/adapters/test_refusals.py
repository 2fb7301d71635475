"""Every adapter Tandem cannot serve is refused with its exact reason, and a refused adapter
costs nothing but itself: the engine keeps serving other adapters and the base model."""

import copy
import hashlib
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from peft import LoHaConfig, get_peft_model
from safetensors.torch import load_file, save_file

from tandem.server.adapters import peft_format
from tandem.server.adapters.peft_format import read_adapter
from tandem.server.adapters.registry import resolve_adapter_dir
from tandem.server.engine.sampling_params import SamplingParams
from tandem.server.errors import IncompatibleAdapter, InvalidRequest, NotFound
from tandem.server.model.loader import build_from_hf
from tests.adapters.make_adapters import edit_config, make_adapter, weights_file
from tests.conftest import make_tiny_hf_model
from tests.engine.helpers import make_engine, random_prompts

MAX_RANK = 8
Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def base(tiny_hf_model):
    """Our model built from the tiny Llama: what read_adapter checks adapters against."""
    return build_from_hf(tiny_hf_model, torch.float32, torch.device("cpu"))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("refused-adapters")


def refusal(cls: type[Exception], name: str, path: Path, base, max_rank: int = MAX_RANK) -> str:
    with pytest.raises(cls) as info:
        read_adapter(name, path, base, max_rank)
    assert type(info.value) is cls
    return str(info.value)


def test_a_good_adapter_is_read(tiny_hf_model, base, root):
    adapter = read_adapter("good", make_adapter(tiny_hf_model, root / "good", r=4), base, MAX_RANK)
    assert (adapter.name, adapter.rank, adapter.targets) == ("good", 4, ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert len(adapter.content_hash) == 64


VARIANT = "a LoRA variant whose forward pass differs from plain LoRA's: Tandem serves plain LoRA (with rsLoRA and rank or alpha patterns)"


@pytest.mark.parametrize(
    "options, reason",
    [
        (dict(use_dora=True), "adapter 'x' uses DoRA, which Tandem does not serve"),
        (
            dict(modules_to_save=["lm_head"]),
            "adapter 'x' has modules_to_save ['lm_head']: full-weight modules are not served",
        ),
        (dict(bias="all"), "adapter 'x' trains biases (bias='all'), which Tandem does not serve"),
        (dict(bias="lora_only"), "adapter 'x' trains biases (bias='lora_only'), which Tandem does not serve"),
        (dict(alora_invocation_tokens=[300, 42]), f"adapter 'x' sets alora_invocation_tokens, {VARIANT}"),
        (dict(lora_bias=True), f"adapter 'x' sets lora_bias, {VARIANT}"),
    ],
    ids=["dora", "modules_to_save", "bias-all", "bias-lora_only", "activated-lora", "lora-bias"],
)
def test_config_refusals(tiny_hf_model, base, tmp_path, options, reason):
    path = make_adapter(tiny_hf_model, tmp_path / "x", r=4, **options)
    assert refusal(IncompatibleAdapter, "x", path, base) == reason


@pytest.mark.parametrize(
    "targets, module",
    [
        (["embed_tokens"], "model.embed_tokens"),
        (["q_proj", "embed_tokens"], "model.embed_tokens"),
        (["lm_head"], "lm_head"),
    ],
    ids=["embed_tokens", "attention+embed_tokens", "lm_head"],
)
def test_embedding_and_lm_head_lora_are_refused(tiny_hf_model, base, tmp_path, targets, module):
    path = make_adapter(tiny_hf_model, tmp_path / "x", r=4, target_modules=targets)
    reason = f"adapter 'x' adapts '{module}': LoRA on embeddings or lm_head is not served"
    assert refusal(IncompatibleAdapter, "x", path, base) == reason


def test_non_lora_adapter_is_refused(tiny_hf_model, base, tmp_path):
    peft_model = get_peft_model(copy.deepcopy(tiny_hf_model), LoHaConfig(r=4, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "x")
    assert refusal(IncompatibleAdapter, "x", tmp_path / "x", base) == "adapter 'x' is a LOHA adapter; only LoRA is served"


def test_shapes_that_do_not_fit_the_base_are_refused(smollm2_tokenizer, base, tmp_path):
    narrow = make_tiny_hf_model(smollm2_tokenizer, hidden_size=32, intermediate_size=64)
    path = make_adapter(narrow, tmp_path / "x", r=4, target_modules=["q_proj"])
    assert refusal(IncompatibleAdapter, "x", path, base) == (
        f"adapter 'x' does not fit the base model: {Q} has A (4, 32) and B (32, 4), "
        "the base layer needs A [r, 64] and B [64, r]"
    )
    deeper = make_tiny_hf_model(smollm2_tokenizer, num_hidden_layers=3)
    path = make_adapter(deeper, tmp_path / "y", r=4, target_modules=["q_proj"])
    assert refusal(IncompatibleAdapter, "y", path, base) == "adapter 'y' targets layer 2; the base model has 2 layers"


@pytest.mark.parametrize("module", ["model.layers.00.self_attn.q_proj", "model.layers.0.mlp.q_proj"], ids=["leading-zero", "other-parent"])
def test_a_module_spelled_unlike_the_base_model_s_is_refused(tiny_hf_model, base, tmp_path, module):
    """Two spellings of one module were read as one (layer "00" as layer 0, a q_proj under
    mlp as the attention's): the last read replaced the other's weights in silence."""
    path = make_adapter(tiny_hf_model, tmp_path / "x", r=4, target_modules=["q_proj"])
    tensors = load_file(weights_file(path))
    for ab in "AB":
        tensors[f"base_model.model.{module}.lora_{ab}.weight"] = 2 * tensors[f"base_model.model.{Q}.lora_{ab}.weight"]
    save_file(tensors, weights_file(path))
    assert refusal(IncompatibleAdapter, "x", path, base) == (
        f"adapter 'x' targets '{module}', which is no module of the base model: did you mean {Q}?"
    )


def test_rank_above_the_maximum_is_refused(tiny_hf_model, base, tmp_path):
    path = make_adapter(tiny_hf_model, tmp_path / "x", r=16, target_modules=["q_proj"])
    assert refusal(IncompatibleAdapter, "x", path, base) == (
        f"adapter 'x' has rank 16 on {Q}, the server's maximum is {MAX_RANK} (--max-lora-rank)"
    )
    assert read_adapter("x", path, base, max_rank=16).rank == 16
    # Only one module's rank_pattern entry is too big: that module is named.
    path = make_adapter(tiny_hf_model, tmp_path / "y", r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 12})
    assert refusal(IncompatibleAdapter, "y", path, base) == (
        f"adapter 'y' has rank 12 on model.layers.0.self_attn.v_proj, the server's maximum is {MAX_RANK} (--max-lora-rank)"
    )


def test_incomplete_configs_are_refused(tiny_hf_model, base, tmp_path):
    path = make_adapter(tiny_hf_model, tmp_path / "x", r=4, target_modules=["q_proj"])
    edit_config(path, r=None)
    assert refusal(IncompatibleAdapter, "x", path, base) == "adapter 'x' has no r or lora_alpha in adapter_config.json"
    (path / "adapter_config.json").write_text("{not json")
    assert refusal(IncompatibleAdapter, "x", path, base).startswith("adapter 'x' has an unreadable adapter_config.json: ")
    path = make_adapter(tiny_hf_model, tmp_path / "y", r=4, target_modules=["q_proj"])
    weights_file(path).unlink()
    assert refusal(IncompatibleAdapter, "y", path, base) == (
        "adapter 'y' has no adapter_model.safetensors (only safetensors adapters are served)"
    )


def _truncate(path: Path) -> None:
    data = weights_file(path).read_bytes()
    weights_file(path).write_bytes(data[: len(data) // 2])


def _garble(path: Path) -> None:
    weights_file(path).write_bytes(os.urandom(4096))


def _cut_header(path: Path) -> None:
    weights_file(path).write_bytes(weights_file(path).read_bytes()[:20])


_SHA256 = hashlib.sha256


class _SlowSha256:
    """hashlib.sha256 taking its time, so that a read's check fails while its hash still runs."""

    def __init__(self, prefix: bytes):
        self._h = _SHA256(prefix)

    def update(self, data) -> None:
        time.sleep(0.2)
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


@pytest.mark.parametrize("damage", [_truncate, _garble, _cut_header], ids=["truncated", "garbage", "cut-header"])
def test_corrupt_weights_are_refused_once_nothing_reads_them(tiny_hf_model, base, tmp_path, damage, monkeypatch):
    """The weights are parsed while hashed on another thread; a refusal waits for that thread,
    so that no thread reads the bytes once their memory goes back to the host slab."""
    monkeypatch.setattr(peft_format.hashlib, "sha256", _SlowSha256)
    path = make_adapter(tiny_hf_model, tmp_path / "x", r=4, target_modules=["q_proj"])
    damage(path)
    assert refusal(IncompatibleAdapter, "x", path, base).startswith("adapter 'x' has a corrupt adapter_model.safetensors: ")
    assert not [t for t in threading.enumerate() if t.name == "tandem-sha256"]


def test_missing_adapters_are_not_found(base, root, tmp_path):
    reason = refusal(NotFound, "ghost", tmp_path / "ghost", base)
    assert reason == f"adapter 'ghost' not found: {tmp_path / 'ghost'} has no adapter_config.json"
    with pytest.raises(NotFound) as info:
        resolve_adapter_dir(root, "ghost", "")
    assert str(info.value) == "adapter 'ghost' not found: no 'ghost/adapter_config.json' in the adapters directory"
    with pytest.raises(NotFound, match=r"the server has no adapters directory \(start it with --adapters-dir\)"):
        resolve_adapter_dir(None, "ghost", "")


def test_paths_outside_the_adapters_directory_are_invalid(tiny_hf_model, tmp_path):
    root = tmp_path / "adapters"
    root.mkdir()
    outside = make_adapter(tiny_hf_model, tmp_path / "outside", r=4, target_modules=["q_proj"])
    for path in ("../outside", str(outside), "sub/../../outside"):
        with pytest.raises(InvalidRequest) as info:
            resolve_adapter_dir(root, "x", path)
        assert str(info.value) == f"path {path!r} is outside the adapters directory"
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidRequest) as info:
        resolve_adapter_dir(root, "link", "")
    assert str(info.value) == "adapter 'link' (a link out of it) is outside the adapters directory"
    for name in ("", ".", "..", "a/b", "../outside"):
        with pytest.raises(InvalidRequest) as info:
            resolve_adapter_dir(root, name, "")
        assert str(info.value) == f"adapter name must be a non-empty single path component, got {name!r}"


def test_a_corrupt_adapter_fails_alone(tiny_hf_model, smollm2_tokenizer, tmp_path):
    """The engine refuses the corrupt adapter, then serves a good one and the base model as before."""
    make_adapter(tiny_hf_model, tmp_path / "good", r=4, seed=1)
    _truncate(make_adapter(tiny_hf_model, tmp_path / "bad", r=4, seed=2))
    engine = make_engine(
        tiny_hf_model, smollm2_tokenizer, adapters_dir=str(tmp_path), max_lora_rank=MAX_RANK, max_loras=2, kv_cache_bytes=8 << 20
    )
    prompt = random_prompts([9], len(smollm2_tokenizer))[0]
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)

    def generate(adapter_name: str | None) -> list[int]:
        adapter = None if adapter_name is None else engine.registry.get(adapter_name)
        engine.add_request("r", prompt, params, adapter)
        ids = []
        while engine.has_work():
            ids += [t for out in engine.step() for t in out.token_ids]
        return ids

    good, plain = generate("good"), generate(None)
    assert good != plain and len(good) == 8
    for _ in range(2):
        with pytest.raises(IncompatibleAdapter, match="^adapter 'bad' has a corrupt adapter_model.safetensors: "):
            engine.registry.get("bad")
        with pytest.raises(IncompatibleAdapter, match="^adapter 'bad' has a corrupt"):
            engine.registry.load("bad")
    assert [a.name for a in engine.registry.list()] == ["good"]
    assert generate("good") == good and generate(None) == plain
    assert engine.allocator.num_free == engine.allocator.num_blocks


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"target_modules": ["q_proj", "v_proj"]},
         "adapter 'x' has weights for 'model.layers.0.self_attn.k_proj', which its config does not target "
         "(target_modules ['q_proj', 'v_proj']): peft would not load them"),
        ({"target_modules": ["k_proj", "o_proj", "q_proj", "v_proj"], "layers_to_transform": [0], "layers_pattern": "layers"},
         "adapter 'x' has weights for 'model.layers.1.self_attn.k_proj', which its config does not target "
         "(target_modules ['k_proj', 'o_proj', 'q_proj', 'v_proj'], layers_to_transform [0]): peft would not load them"),
        ({"target_modules": ["k_proj", "o_proj", "q_proj", "v_proj"], "exclude_modules": r".*\.1\.self_attn\.o_proj"},
         "adapter 'x' has weights for 'model.layers.1.self_attn.o_proj', which its config does not target "
         r"(target_modules ['k_proj', 'o_proj', 'q_proj', 'v_proj'], exclude_modules '.*\\.1\\.self_attn\\.o_proj'): peft would not load them"),
        ({"layers_to_transform": "all"}, "adapter 'x' has layers_to_transform 'all'; it must be a layer index or a list of them"),
    ],
    ids=["target-modules", "layers-to-transform", "exclude-modules", "layers-not-indices"],
)
def test_weights_the_config_does_not_target_are_refused(tiny_hf_model, base, tmp_path, fields, reason):
    """peft loads only what the config targets and ignores the file's other tensors: serving
    them made logits up to 4.5 away from peft's."""
    path = make_adapter(tiny_hf_model, tmp_path / "x", r=4)
    edit_config(path, **fields)
    assert refusal(IncompatibleAdapter, "x", path, base) == reason


def test_an_adapter_peft_made_for_some_layers_and_not_others_is_read(tiny_hf_model, base, tmp_path):
    path = make_adapter(tiny_hf_model, tmp_path / "x", r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                        layers_pattern="layers", exclude_modules=["model.layers.1.self_attn.v_proj"])
    adapter = read_adapter("x", path, base, MAX_RANK)
    assert sorted(adapter.groups) == [(1, "qkv")] and adapter.targets == ["q_proj"]


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq"])
def test_an_adapter_whose_init_rewrote_its_base_is_refused(tiny_hf_model, base, tmp_path, init):
    """PiSSA, OLoRA, CorDA and LoftQ train against a rewritten base (W less the initial B·A,
    or W quantized), which peft redoes on load: on the unchanged base such an adapter served
    logits 4.0-4.5 away from the model it was trained as."""
    path = make_adapter(tiny_hf_model, tmp_path / "x", r=4, target_modules=["q_proj"])
    edit_config(path, init_lora_weights=init)
    assert refusal(IncompatibleAdapter, "x", path, base) == (
        f"adapter 'x' was initialised with init_lora_weights '{init}', which rewrites the base weights it trains against, "
        "and Tandem serves the unchanged base: save it from peft with path_initial_model_for_weight_conversion, "
        "which turns it into a plain LoRA"
    )
    edit_config(path, init_lora_weights="gaussian")  # an init of A and B only
    assert read_adapter("x", path, base, MAX_RANK).targets == ["q_proj"]


def test_a_rank_the_config_does_not_state_is_refused(tiny_hf_model, base, tmp_path):
    """peft refuses the file (size mismatch); served, its scale alpha/r would be off by r_config/r_tensor."""
    path = make_adapter(tiny_hf_model, tmp_path / "x", r=4, target_modules=["q_proj", "v_proj"])
    edit_config(path, r=8)
    assert refusal(IncompatibleAdapter, "x", path, base) == (
        f"adapter 'x' has rank 4 on {Q}, where its config says 8 (r, or rank_pattern): "
        "its scale alpha/r would not be the one it was trained with, and peft refuses the file too"
    )
    edit_config(path, r=4, rank_pattern={"v_proj": 2})
    assert "has rank 4 on model.layers.0.self_attn.v_proj, where its config says 2" in refusal(IncompatibleAdapter, "x", path, base)


def test_without_target_modules_only_peft_s_defaults_are_served(tiny_hf_model, base, tmp_path):
    """peft fills an unset target_modules with the model type's defaults (q_proj and v_proj
    for every architecture served) and ignores the file's other tensors."""
    path = make_adapter(tiny_hf_model, tmp_path / "x", r=4)
    edit_config(path, target_modules=None)
    assert "has weights for 'model.layers.0.self_attn.k_proj', which its config does not target" in refusal(
        IncompatibleAdapter, "x", path, base
    )
    path = make_adapter(tiny_hf_model, tmp_path / "y", r=4, target_modules=["q_proj", "v_proj"])
    edit_config(path, target_modules=None)
    assert read_adapter("y", path, base, MAX_RANK).targets == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "fields",
    [
        {"target_modules": ["q_proj", "v_proj"]},
        {"target_modules": ["q_proj"], "layers_to_transform": []},
        {"target_modules": ["q_proj"], "layers_to_transform": [1]},
        {"target_modules": ["q_proj"], "layers_to_transform": 0, "layers_pattern": "layers"},
        {"target_modules": ["q_proj"], "layers_to_transform": [1], "layers_pattern": "model.layers"},
        {"target_modules": ["q_proj"], "layers_to_transform": [1], "layers_pattern": ["h", "layers"]},
        {"target_modules": ["model.layers.0.self_attn.q_proj", "v_proj"], "layers_to_transform": [1]},
        {"target_modules": r".*\.layers\.0\..*_proj", "layers_to_transform": [1]},
        {"target_modules": ["q_proj", "down_proj"], "exclude_modules": ["model.layers.1.mlp.down_proj"]},
        {"target_modules": r".*proj", "exclude_modules": r".*\.0\..*"},
    ],
)
def test_the_modules_a_config_targets_are_the_ones_peft_targets(fields):
    """peft's own check_target_module_exists is the oracle, over every projection of a 2-layer model."""
    from types import SimpleNamespace

    from peft.tuners.tuners_utils import check_target_module_exists

    config = {"target_modules": None, "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None} | fields
    oracle = SimpleNamespace(**config, modules_to_save=None, target_parameters=None)
    modules = [f"model.layers.{i}.{part}.{p}_proj" for i in range(2) for part, names in
               (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down"))) for p in names]
    for module in modules:
        assert peft_format._targeted(config, module) == bool(check_target_module_exists(oracle, module)), module
