"""Merging adapters: each method against a plain implementation of its paper's rule on small
tensors, and against peft's add_weighted_adapter where the two coincide (linear = peft's
"svd", TIES = "ties_svd"); the reported SVD error is the measured one; the merged adapter
loads in peft and peft's greedy output equals Tandem's; bad merges are refused."""

import copy
import json
import shutil
import weakref
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from tandem.server.adapters import merge_methods
from tandem.server.adapters.merging import MergeSpec, module_weights
from tandem.server.errors import FailedPrecondition, InvalidRequest, NotFound
from tests.adapters.make_adapters import ALL_LINEAR, make_adapter
from tests.adapters.test_routers import engine_for, greedy, random_gates, write
from tests.engine.helpers import run


def numpy_ties(deltas: np.ndarray, weights: np.ndarray, density: float) -> np.ndarray:
    """TIES-Merging step by step: trim each delta to its top-k magnitudes, elect a sign per
    parameter from the trimmed sum, average the weighted values that agree with it."""
    n, size = deltas.shape[0], deltas[0].size
    k = int(density * size)
    trimmed = np.zeros_like(deltas)
    for i in range(n):
        flat = deltas[i].ravel()
        keep = np.argsort(-np.abs(flat), kind="stable")[:k]
        out = np.zeros(size)
        out[keep] = flat[keep]
        trimmed[i] = out.reshape(deltas[i].shape)
    elected = np.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    merged = np.zeros(deltas.shape[1:])
    for idx in np.ndindex(*deltas.shape[1:]):
        agreeing = [weights[i] * trimmed[i][idx] for i in range(n) if np.sign(trimmed[i][idx]) == elected[idx]]
        merged[idx] = sum(agreeing) / max(len(agreeing), 1)
    return merged


def numpy_breadcrumbs(deltas: np.ndarray, weights: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """Model Breadcrumbs: per delta, sort magnitudes, drop the top gamma fraction and keep the
    next density fraction, then the weighted sum."""
    out = np.zeros(deltas.shape[1:])
    size = deltas[0].size
    top, keep = int(gamma * size), int(density * size)
    for delta, w in zip(deltas, weights):
        order = np.argsort(-np.abs(delta.ravel()), kind="stable")
        mask = np.zeros(size)
        mask[order[top : top + keep]] = 1
        out += w * delta * mask.reshape(delta.shape)
    return out


@pytest.fixture
def small():
    g = torch.Generator().manual_seed(0)
    deltas = torch.randn(3, 6, 5, generator=g, dtype=torch.float64)
    return deltas, torch.tensor([0.5, 1.0, -0.3], dtype=torch.float64)


def test_ties_follows_trim_elect_and_disjoint_mean(small):
    deltas, weights = small
    expected = numpy_ties(deltas.numpy(), weights.numpy(), 0.4)
    np.testing.assert_allclose(merge_methods.ties(deltas, weights, 0.4).numpy(), expected, rtol=1e-12, atol=1e-12)


def test_dare_ties_drops_with_the_seed_and_rescales(small):
    deltas, weights = small
    g = torch.Generator().manual_seed(7)
    dropped = np.stack([d.numpy() * (torch.rand(d.shape, generator=g, dtype=torch.float64) < 0.6).numpy() / 0.6 for d in deltas])
    # DARE's drop then TIES' election on the kept values (no trim: all of them count).
    expected = numpy_ties(dropped, weights.numpy(), 1.0)
    seeded = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    np.testing.assert_allclose(merge_methods.dare_ties(deltas, weights, 0.6, seeded(7)).numpy(), expected, rtol=1e-12, atol=1e-12)
    assert not torch.equal(merge_methods.dare_ties(deltas, weights, 0.6, seeded(8)), merge_methods.dare_ties(deltas, weights, 0.6, seeded(7)))


def test_breadcrumbs_drops_tiny_and_outlier_magnitudes(small):
    deltas, weights = small
    expected = numpy_breadcrumbs(deltas.numpy(), weights.numpy(), 0.5, 0.1)
    np.testing.assert_allclose(merge_methods.breadcrumbs(deltas, weights, 0.5, 0.1).numpy(), expected, rtol=1e-12, atol=1e-12)
    mask = merge_methods.breadcrumb_mask(deltas[0], 0.5, 0.1)
    largest = deltas[0].abs().max()
    assert mask[deltas[0].abs() == largest].item() == 0 and int(mask.sum()) == 15


def test_svd_refactor_reports_the_error_it_makes():
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(12, 9, generator=g, dtype=torch.float64)
    b, a, error = merge_methods.refactor(delta, 4)
    measured = float(torch.linalg.matrix_norm(delta - b.double() @ a.double()) / torch.linalg.matrix_norm(delta))
    assert error == pytest.approx(measured, rel=1e-9) and 0 < error < 1
    s = torch.linalg.svdvals(delta)
    assert error == pytest.approx(float(s[4:].norm() / s.norm()), rel=1e-5)  # Eckart-Young: the best rank-4 error
    assert merge_methods.refactor(delta, 9)[2] < 1e-6


class CountedDeltas(Sequence):
    """Deltas made on demand, counting how many are alive at once."""

    def __init__(self, deltas: torch.Tensor):
        self.deltas, self.alive, self.most = deltas, 0, 0

    def __len__(self) -> int:
        return len(self.deltas)

    def __getitem__(self, i: int) -> torch.Tensor:
        delta = self.deltas[i].clone()
        self.alive += 1
        self.most = max(self.most, self.alive)
        weakref.finalize(delta, self._freed)
        return delta

    def _freed(self) -> None:
        self.alive -= 1


def test_the_methods_hold_one_delta_at_a_time_and_leave_their_input_alone():
    """Stacked, TIES held about six copies of all N deltas at once: 28 GB for 16 adapters'
    Llama-8B down_proj, enough to take the serving process down."""
    g = torch.Generator().manual_seed(4)
    deltas, weights = torch.randn(6, 7, 5, generator=g, dtype=torch.float64), torch.rand(6, generator=g, dtype=torch.float64)
    before = deltas.clone()
    runs = {
        "ties": lambda d: merge_methods.ties(d, weights, 0.5),
        "dare_ties": lambda d: merge_methods.dare_ties(d, weights, 0.5, torch.Generator().manual_seed(1)),
        "breadcrumbs": lambda d: merge_methods.breadcrumbs(d, weights, 0.5, 0.1),
    }
    for name, merge in runs.items():
        counted = CountedDeltas(deltas)
        assert torch.equal(merge(counted), merge(deltas)), name
        assert counted.most == 1, name
    assert torch.equal(deltas, before)


def test_refactoring_a_product_equals_refactoring_the_full_delta():
    """A linear merge re-factorises the stacked factors without forming the out x in delta:
    the same rank-r factors' product and the same error as the full delta's SVD."""
    g = torch.Generator().manual_seed(2)
    b, a = torch.randn(40, 6, generator=g, dtype=torch.float64), torch.randn(6, 30, generator=g, dtype=torch.float64)
    for rank in (4, 8):
        full_b, full_a, full_error = merge_methods.refactor(b @ a, rank)
        product_b, product_a, product_error = merge_methods.refactor_product(b, a, rank)
        assert product_b.shape == (40, rank) and product_a.shape == (rank, 30)
        torch.testing.assert_close(product_b.double() @ product_a.double(), full_b.double() @ full_a.double(), rtol=1e-5, atol=1e-5)
        assert product_error == pytest.approx(full_error, rel=1e-4, abs=1e-6)
    assert 0 < merge_methods.refactor_product(b, a, 4)[2] < 1 and merge_methods.refactor_product(b, a, 8)[2] < 1e-12
    assert merge_methods.refactor_product(torch.zeros(5, 2), torch.zeros(2, 3), 2)[2] == 0.0


@pytest.fixture(scope="module")
def merge_dir(tmp_path_factory, tiny_hf_model):
    root = tmp_path_factory.mktemp("merge-adapters")
    make_adapter(tiny_hf_model, root / "m0", r=4, target_modules=ALL_LINEAR, seed=11, b_std=0.2)
    make_adapter(tiny_hf_model, root / "m1", r=4, target_modules=ALL_LINEAR, seed=12, b_std=0.2, lora_alpha=8)
    make_adapter(tiny_hf_model, root / "qv", r=4, target_modules=["q_proj", "v_proj"], seed=13)
    return root


def _merged_deltas(directory) -> dict[str, torch.Tensor]:
    config = json.loads((directory / "adapter_config.json").read_text())
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    scale = config["lora_alpha"] / config["r"]
    return {
        key.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): scale * tensors[key.replace("lora_A", "lora_B")].double() @ a.double()
        for key, a in tensors.items() if key.endswith("lora_A.weight")
    }


@pytest.mark.parametrize("method, peft_type, density", [("linear", "svd", None), ("ties", "ties_svd", 0.5)])
def test_merges_equal_peft_add_weighted_adapter(tiny_hf_model, smollm2_tokenizer, merge_dir, tmp_path, method, peft_type, density):
    root = tmp_path / "adapters"
    shutil.copytree(merge_dir, root)
    registry = engine_for(tiny_hf_model, smollm2_tokenizer, root, max_loras=4).registry
    spec = MergeSpec(("m0", "m1"), (0.7, 0.4), method, rank=8, density=density)
    info, errors = registry.merge("merged", spec)
    assert info.rank == 8 and info.format == "peft"
    ours = _merged_deltas(root / "merged")

    peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny_hf_model), str(root / "m0"), adapter_name="m0")
    peft_model.load_adapter(str(root / "m1"), adapter_name="m1")
    peft_model.add_weighted_adapter(["m0", "m1"], [0.7, 0.4], "merged", combination_type=peft_type, svd_rank=8, density=density)
    for module, delta in ours.items():
        target = peft_model.base_model.model.get_submodule(module)
        theirs = target.get_delta_weight("merged").double()
        torch.testing.assert_close(delta, theirs, rtol=1e-4, atol=1e-5, msg=module)
    assert set(errors) == set(ours)
    if method == "linear":  # two rank-4 deltas sum to rank 8: exact at rank 8
        assert max(errors.values()) < 1e-5


def test_dare_ties_drops_independently_in_every_projection_and_repeats_with_its_seed(tiny_hf_model, smollm2_tokenizer, merge_dir, tmp_path, monkeypatch):
    """Each projection drew its drop from a generator seeded afresh: every projection of a
    shape dropped the same entries of each adapter, where DARE drops each independently."""
    root = tmp_path / "adapters"
    shutil.copytree(merge_dir, root)
    registry = engine_for(tiny_hf_model, smollm2_tokenizer, root, max_loras=4).registry
    combined: list[torch.Tensor] = []
    refactor = merge_methods.refactor
    monkeypatch.setattr(merge_methods, "refactor", lambda delta, rank: combined.append(delta) or refactor(delta, rank))
    spec = MergeSpec(("m0", "m1"), (1.0, 1.0), "dare_ties", rank=8, density=0.5, seed=3)
    _, errors = registry.merge("dropped", spec)
    first, combined = combined, []
    registry.merge("again", spec)
    # One combined delta per projection, each merge: 2 layers x 7 projections (ALL_LINEAR).
    assert len(first) == len(combined) == len(errors) == 2 * 7
    assert all(torch.equal(a, b) for a, b in zip(first, combined))  # the seed repeats the merge
    by_shape: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for delta in first:  # both adapters dropped an entry: 0 in the merge
        by_shape.setdefault(tuple(delta.shape), []).append(delta == 0)
    for masks in by_shape.values():
        assert all(0 < int(m.sum()) < m.numel() for m in masks)
        assert len(masks) > 1 and not all(torch.equal(masks[0], m) for m in masks[1:])


def test_reported_errors_are_measured_and_peft_greedy_equals_tandem(tiny_hf_model, smollm2_tokenizer, merge_dir, tmp_path):
    root = tmp_path / "adapters"
    shutil.copytree(merge_dir, root)
    engine = engine_for(tiny_hf_model, smollm2_tokenizer, root, max_loras=4)
    spec = MergeSpec(("m0", "m1"), (1.0, 1.0), "breadcrumbs", rank=3, density=0.6, gamma=0.05)
    _, errors = engine.registry.merge("crumbs", spec)

    # The error each projection reports is the one its written factors make on the merged delta.
    inputs = [module_weights(engine.registry.get(n)) for n in ("m0", "m1")]
    written = _merged_deltas(root / "crumbs")
    for module, delta in written.items():
        full = torch.stack([scale * b.double() @ a.double() for a, b, scale in (m[module] for m in inputs)])
        merged = merge_methods.breadcrumbs(full, torch.ones(2, dtype=torch.float64), 0.6, 0.05)
        measured = float(torch.linalg.matrix_norm(merged - delta) / torch.linalg.matrix_norm(merged))
        assert errors[module] == pytest.approx(measured, rel=1e-4, abs=1e-7), module
    assert max(errors.values()) > 0.05  # rank 3 of a full-rank delta: a real truncation

    prompt = [5, 17, 300, 42, 9]
    outputs = run(engine, {0: [("r", prompt, greedy(), engine.registry.get("crumbs"))]})
    peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny_hf_model), str(root / "crumbs"))
    with torch.no_grad():
        expected = peft_model.generate(torch.tensor([prompt]), max_new_tokens=len(outputs["r"]), do_sample=False, min_new_tokens=len(outputs["r"]))
    assert outputs["r"] == expected[0, len(prompt):].tolist()


@pytest.mark.parametrize(
    "spec, error, message",
    [
        (MergeSpec(("m0", "nope"), (), "ties"), NotFound, "adapter 'nope' not found"),
        (MergeSpec(("m0", "qv"), (), "linear"), FailedPrecondition, "adapt different projections"),
        (MergeSpec(("m0", "m1"), (), "linear", rank=64), InvalidRequest, "above the server's maximum LoRA rank 8"),
        (MergeSpec(("m0", "m1"), (1.0,), "ties"), InvalidRequest, "1 weights for 2 adapters"),
        (MergeSpec(("m0", "m1"), (), "ties", density=0.0), InvalidRequest, r"density must lie in \(0, 1\]"),
        (MergeSpec(("m0", "m1"), (), "ties", density=1.5), InvalidRequest, r"density must lie in \(0, 1\]"),
        (MergeSpec(("m0", "m1"), (), "breadcrumbs", density=0.9, gamma=0.2), InvalidRequest, "gamma must lie in"),
        (MergeSpec(("m0", "m1"), (), "slerp"), InvalidRequest, "merge method must be one of"),
        (MergeSpec(("m0", "m0"), (), "linear"), InvalidRequest, "named twice"),
    ],
    ids=["unknown", "targets", "rank", "weights", "density-0", "density-big", "gamma", "method", "twice"],
)
def test_bad_merges_are_refused_with_the_reason(tiny_hf_model, smollm2_tokenizer, merge_dir, spec, error, message):
    registry = engine_for(tiny_hf_model, smollm2_tokenizer, merge_dir, max_loras=4).registry
    with pytest.raises(error, match=message):
        registry.merge("out", spec)
    assert not (merge_dir / "out").exists()


def test_a_merge_of_more_adapters_than_the_cap_is_refused_before_its_names_are_compared():
    """200k names fit a 4 MiB request: finding the duplicates by count() took hours, and the
    merge's worker thread outlives any deadline."""
    with pytest.raises(InvalidRequest) as refused:
        MergeSpec(("a",) * 200_000, (), "linear").check(max_rank=8)
    assert str(refused.value) == "a merge names 200000 adapters; at most 64 can be merged in one call: merge fewer"


def test_breadcrumbs_at_a_density_that_leaves_less_than_the_default_gamma_takes_what_it_leaves():
    """Density 0.995 with gamma unset was refused for the default gamma 0.01 the caller never sent."""
    for density in (0.995, 1.0):
        spec = MergeSpec(("m0", "m1"), (), "breadcrumbs", density=density)
        spec.check(max_rank=8)
        assert spec.gamma_or_default == pytest.approx(1 - density)


def test_a_seed_is_refused_by_the_methods_that_draw_nothing():
    with pytest.raises(InvalidRequest, match="seed applies to dare_ties only"):
        MergeSpec(("m0", "m1"), (), "ties", seed=7).check(max_rank=8)
    MergeSpec(("m0", "m1"), (), "dare_ties", seed=7).check(max_rank=8)


def test_a_router_is_no_input_to_a_merge_or_a_compression(tiny_hf_model, smollm2_tokenizer, merge_dir, tmp_path):
    """FAILED_PRECONDITION, as for inputs adapting other projections (README): it was
    INVALID_ARGUMENT, and its message said "compressd"."""
    for name in ("m0", "m1"):
        shutil.copytree(merge_dir / name, tmp_path / name)
    write(tmp_path, "rt", ["m0", "m1"], random_gates(tiny_hf_model, 2, 0))
    registry = engine_for(tiny_hf_model, smollm2_tokenizer, tmp_path, max_loras=4).registry
    with pytest.raises(FailedPrecondition, match="^cannot merge 'rt': it is a router, and only LoRA adapters can be merged$"):
        registry.merge("out", MergeSpec(("m0", "rt"), (), "linear"))
    with pytest.raises(FailedPrecondition, match="^cannot compress 'rt': it is a router, and only LoRA adapters can be compressed$"):
        registry.compress("out", "rt", 0.5)
    assert not (tmp_path / "out").exists()


def test_breadcrumbs_takes_gamma_at_one_minus_density_as_grpc_carries_them():
    """Both arrive as float32: gamma 0.4 with density 0.6 lands 3e-8 past 1 - density."""
    density, gamma = (float(np.float32(v)) for v in (0.6, 0.4))
    MergeSpec(("m0", "m1"), (), "breadcrumbs", density=density, gamma=gamma).check(max_rank=8)
