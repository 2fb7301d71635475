"""ComPEFT-compressed adapters: the packed file round-trips to exactly the sparsified ternary
tensors (a trained adapter's A as its move from the trainer's seeded draw; a tensor coded
whole as two codes, the second of what the first left), is ~16 / (1 + density) times
smaller than float32 where coded whole, serves exactly like the same tensors written as a PEFT
adapter, counts its packed bytes in the host cache, shows its format and ratio, and is
refused with the reason when corrupt or truncated."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load, load_file, save

from tandem.server.adapters import registry as registry_module
from tandem.server.adapters.compeft_format import WEIGHTS_FILE, compressed_files, dense_slices, parse_compressed
from tandem.server.adapters.lora_init import initial_a
from tandem.server.adapters.peft_format import peft_config, write_adapter
from tandem.server.atomic_files import write_directory
from tandem.server.errors import IncompatibleAdapter, InvalidRequest
from tandem.server.finetune.trainable_adapter import LoRASpec, TrainableAdapter
from tandem.server.model.lora_targets import module_path, target_of
from tests.adapters.make_adapters import ALL_LINEAR, make_adapter
from tests.adapters.test_routers import engine_for, greedy
from tests.engine.helpers import run
from tests.engine.test_forward_oracle import record_logits


def sparsified_ternary(t: torch.Tensor, density: float) -> torch.Tensor:
    """The reference: keep the ceil(density * n) largest magnitudes, each replaced by its sign
    times the mean of the kept magnitudes; the rest zero."""
    flat = t.flatten()
    k = max(1, math.ceil(density * flat.numel()))
    kept = torch.zeros(flat.numel(), dtype=torch.bool)
    kept[flat.abs().argsort(descending=True, stable=True)[:k]] = True
    return torch.where(kept, flat.sign() * flat[kept].abs().mean(), 0.0).view_as(t)


def coded_whole(t: torch.Tensor, density: float) -> torch.Tensor:
    """The reference for a tensor coded whole: its sparsified ternary code plus that of what
    the first code left."""
    first = sparsified_ternary(t, density)
    return first + sparsified_ternary(t - first, density)


def unpacked(data: bytes) -> dict[str, torch.Tensor]:
    """Every tensor of a compressed file, unpacked the way a slot load unpacks it."""
    packed = parse_compressed(data)
    return dict(zip(packed.listing.keys, packed.unpacked()))


@pytest.mark.parametrize("shape, density", [((8, 64), 0.1), ((96, 4), 0.05), ((3, 5), 0.3), ((7, 9), 1.0)])
def test_decompression_equals_the_two_sparsified_ternary_codes_exactly(shape, density):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    files = compressed_files({}, {"k": t}, density)
    restored = unpacked(files[WEIGHTS_FILE])["k"]
    assert torch.equal(restored, coded_whole(t, density))
    # The second code leaves less error than the first alone.
    assert (restored - t).norm() < (sparsified_ternary(t, density) - t).norm()


def test_a_whole_adapter_unpacks_in_one_pass_to_each_tensor_exactly():
    """Tensors whose bits do not fill whole bytes sit at padded offsets in the shared arrays."""
    g = torch.Generator().manual_seed(5)
    tensors = {f"t{i}": torch.randn(shape, generator=g) for i, shape in enumerate([(3, 5), (7, 9), (8, 64), (1, 1), (13, 3)])}
    for density in (0.3, 1.0):  # (1, 1) keeps its one entry: a mask-less tensor among masked ones
        restored = unpacked(compressed_files({}, tensors, density)[WEIGHTS_FILE])
        assert list(restored) == list(tensors)
        for key, t in tensors.items():
            assert torch.equal(restored[key], coded_whole(t, density)), (key, density)


def test_signs_alone_at_density_one_are_16_times_smaller_than_float32_and_a_moved_a_32():
    t = torch.randn(64, 128)
    data = compressed_files({}, {"k": t}, 1.0)[WEIGHTS_FILE]
    tensors = load(data)
    assert tensors["masks"].numel() == 0 and tensors["signs"].numel() == 2 * t.numel() // 8
    a_key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors = load(compressed_files({}, {a_key: t}, 1.0, a_init_seed=1)[WEIGHTS_FILE])
    assert tensors["masks"].numel() == 0 and tensors["signs"].numel() == t.numel() // 8


def test_a_trained_adapters_a_is_stored_as_its_move_from_the_seeded_draw():
    """With the trainer's seed the lora_A tensors unpack to draw + sparsified ternary move,
    drawn in the order listed; B (which starts at zero) is coded whole."""
    a_keys = [f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight" for i in range(3)]
    shapes = [(4, 16), (4, 16), (4, 24)]
    start = initial_a(shapes, seed=11)
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for key, s0 in zip(a_keys, start):
        tensors[key] = s0 + 0.01 * torch.randn(s0.shape, generator=g)
        tensors[key.replace("lora_A", "lora_B")] = 0.01 * torch.randn(8, 4, generator=g)
    restored = unpacked(compressed_files({}, tensors, 0.2, a_init_seed=11)[WEIGHTS_FILE])
    for key, s0 in zip(a_keys, start):
        torch.testing.assert_close(restored[key], s0 + sparsified_ternary(tensors[key] - s0, 0.2), rtol=0, atol=0)
        b_key = key.replace("lora_A", "lora_B")
        assert torch.equal(restored[b_key], coded_whole(tensors[b_key], 0.2))


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory, tiny_hf_model):
    root = tmp_path_factory.mktemp("compress-adapters")
    make_adapter(tiny_hf_model, root / "full", r=8, target_modules=ALL_LINEAR, seed=21, b_std=0.3)
    return root


def test_compressed_adapter_serves_like_its_tensors_as_peft_and_is_small(tiny_hf_model, smollm2_tokenizer, source_dir, tmp_path):
    root = tmp_path / "adapters"
    shutil.copytree(source_dir, root)
    engine = engine_for(tiny_hf_model, smollm2_tokenizer, root, max_loras=4)
    registry = engine.registry
    info = registry.compress("small", "full", 0.1)
    assert info.format == "compeft" and info.rank == 8
    # The PEFT twin: the same sparsified ternary tensors, dense, in PEFT's files.
    peft = load_file(str(root / "full" / "adapter_model.safetensors"))
    config = json.loads((root / "full" / "adapter_config.json").read_text())
    write_adapter(root / "twin", config, {k: coded_whole(t, 0.1) for k, t in peft.items()})

    float32_bytes = sum(t.numel() * 4 for t in peft.values())
    data = (root / "small" / WEIGHTS_FILE).read_bytes()
    packed_bytes = len(data) - 8 - int.from_bytes(data[:8], "little")
    assert float32_bytes / packed_bytes > 13  # ~16 / 1.1 (no seed: every tensor coded whole, in two codes)
    cached = registry.get("small")
    assert cached.nbytes == sum(2 * (math.ceil(t.numel() / 8) + math.ceil(math.ceil(0.1 * t.numel()) / 8) + 4) for t in peft.values())
    listed = {i.name: i for i in registry.list()}
    assert listed["small"].compression_ratio == pytest.approx(float32_bytes / cached.nbytes) and listed["small"].compression_ratio > 13
    assert listed["full"].format == "peft" and listed["full"].compression_ratio == 1.0

    seen = record_logits(engine)
    prompt = [5, 17, 300, 42, 9]
    # One request at a time: each runs in the same rows of the same batch shapes, so the
    # base GEMMs round alike (oneDNN's may round a row by its place in the batch) and any
    # difference is the adapters'.
    outputs = {}
    for rid, name in (("c", "small"), ("p", "twin"), ("f", "full")):
        outputs |= run(engine, {0: [(rid, prompt, greedy(), registry.get(name))]})
    assert outputs["c"] == outputs["p"]
    torch.testing.assert_close(torch.stack(seen["c"]), torch.stack(seen["p"]), rtol=0, atol=1e-6)
    # Compression changed the adapter: the comparison is not of one tensor with itself.
    assert (torch.stack(seen["c"]) - torch.stack(seen["f"])).abs().max() > 1e-3


def test_a_trained_adapter_records_its_seed_and_compresses_as_its_move(tiny_hf_model, smollm2_tokenizer, tmp_path):
    """An adapter the trainer drew from a seed records it in its file; compressing it
    redraws the start and codes only the move (A = draw + sparsified ternary move), while
    the same weights with no record are coded whole."""
    engine = engine_for(tiny_hf_model, smollm2_tokenizer, tmp_path, max_loras=4)
    spec = LoRASpec(r=8, target_modules=ALL_LINEAR)
    trained = TrainableAdapter(engine.runner.model, spec, seed=7)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # what a few Adam steps do: small, sign-like moves of every weight
        for p in trained.parameters():
            p += 1e-3 * torch.randn(p.shape, generator=g).sign()
    config = peft_config(8, 16, list(ALL_LINEAR), False, 0.0, "tiny")
    engine.registry.publish("trained", config, trained.peft_tensors(), trained.a_init_seed)
    assert engine.registry.get("trained").a_init_seed == 7
    engine.registry.compress("moved", "trained", 0.3)
    write_adapter(tmp_path / "unseeded", config, trained.peft_tensors())
    assert engine.registry.get("unseeded").a_init_seed is None
    engine.registry.compress("whole", "unseeded", 0.3)

    start = TrainableAdapter(engine.runner.model, spec, seed=7).peft_tensors()
    weights = trained.peft_tensors()
    moved = module_tensors(engine.registry.get("moved"))
    whole = module_tensors(engine.registry.get("whole"))
    assert set(moved) == set(whole) == set(weights)
    for key, t in weights.items():
        if ".lora_A." in key:
            assert torch.equal(moved[key], start[key] + sparsified_ternary(t - start[key], 0.3)), key
        else:
            assert torch.equal(moved[key], coded_whole(t, 0.3)), key
        assert torch.equal(whole[key], coded_whole(t, 0.3)), key

    # Read back, the compressed adapter keeps its seed: compressed again, each A is still
    # draw + move (the move, already ternary, codes as itself), not the dense draw coded whole.
    assert engine.registry.get("moved").a_init_seed == 7
    engine.registry.compress("again", "moved", 0.3)
    again = module_tensors(engine.registry.get("again"))
    for key in weights:
        if ".lora_A." in key:
            torch.testing.assert_close(again[key], moved[key], rtol=0, atol=1e-6, msg=key)


def test_compress_writes_the_config_read_with_the_weights_it_compresses(tiny_hf_model, smollm2_tokenizer, tmp_path):
    """It read the config from disk and the weights from the cache: inside the refresh window
    after another replica republished the source (lora_alpha 32 for 16), it paired the old
    weights with the new scale, and served them so."""
    make_adapter(tiny_hf_model, tmp_path / "src", r=8, lora_alpha=16, seed=4)
    registry = engine_for(tiny_hf_model, smollm2_tokenizer, tmp_path, max_loras=2, adapter_refresh_seconds=3600).registry
    served = registry.get("src")
    make_adapter(tiny_hf_model, tmp_path / "src", r=8, lora_alpha=32, seed=4)  # republished meanwhile
    info = registry.compress("small", "src", 1.0)
    config = json.loads((tmp_path / "small" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == 16 and info.rank == 8
    assert served.config["lora_alpha"] == 16


def test_a_read_whose_folder_was_replaced_midway_reads_the_new_version(tiny_hf_model, smollm2_tokenizer, tmp_path, monkeypatch):
    """A compress under the adapter's own name replaced its PEFT folder between the read's
    look at the folder and its open of the weights: the read failed, "has no
    adapter_model.safetensors", and every request waiting on it with it."""
    make_adapter(tiny_hf_model, tmp_path / "x", r=4, seed=1)
    config = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    compressed = compressed_files(config, load_file(str(tmp_path / "x" / "adapter_model.safetensors")), 0.5)
    registry = engine_for(tiny_hf_model, smollm2_tokenizer, tmp_path, max_loras=2).registry
    read_adapter, replaced = registry_module.read_adapter, []

    def replaced_midway(*args, **kwargs):
        if not replaced:
            replaced.append(True)
            write_directory(tmp_path / "x", compressed)
        return read_adapter(*args, **kwargs)

    monkeypatch.setattr(registry_module, "read_adapter", replaced_midway)
    assert registry.load("x").format == "compeft" and replaced


def module_tensors(adapter) -> dict[str, torch.Tensor]:
    """An adapter's weights, unpacked, under PEFT's keys."""
    out = {}
    for ((layer, group), s), (a, b) in dense_slices(adapter).items():
        prefix = f"base_model.model.{module_path(layer, target_of(layer, group, s))}"
        out[f"{prefix}.lora_A.weight"], out[f"{prefix}.lora_B.weight"] = a, b
    return out


@pytest.mark.parametrize(
    "metadata, message",
    [
        ({"a_init_seed": "x1"}, "a_init_seed 'x1' is not a non-negative 64-bit integer of version 2 or later"),
        ({"version": "1", "a_init_seed": "3"}, "a_init_seed '3' is not a non-negative 64-bit integer of version 2"),
        ({"version": "4"}, "a version in 1, 2, 3"),
    ],
)
def test_a_bad_seed_or_version_is_refused(metadata, message):
    a_key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"  # a moved A: one code, as in every version
    tensors = parse_safetensors_parts(compressed_files({}, {a_key: torch.randn(4, 8)}, 0.5, a_init_seed=1)[WEIGHTS_FILE])
    with pytest.raises(ValueError, match=message):
        parse_compressed(save(tensors[0], tensors[1] | metadata))


def test_mask_bits_past_a_tensors_end_repeated_keys_before_version_3_and_codes_of_two_shapes_are_refused():
    tensors, metadata = parse_safetensors_parts(compressed_files({}, {"k": torch.randn(3, 5)}, 0.5)[WEIGHTS_FILE])
    tensors["masks"][-1] |= 1  # 15 entries: the last bit of the second byte is padding
    with pytest.raises(ValueError, match="sets mask bits past its 15 entries"):
        parse_compressed(save(tensors, metadata))
    tensors, metadata = parse_safetensors_parts(compressed_files({}, {"k": torch.randn(2, 8)}, 0.5)[WEIGHTS_FILE])
    assert json.loads(metadata["tensors"]) == [["k", 2, 8, 8], ["k", 2, 8, 8]]  # two codes of k
    with pytest.raises(ValueError, match="names a key twice, which only version 3 allows"):
        parse_compressed(save(tensors, metadata | {"version": "2"}))
    with pytest.raises(ValueError, match="gives 'k' two shapes"):
        parse_compressed(save(tensors, metadata | {"tensors": json.dumps([["k", 2, 8, 8], ["k", 8, 2, 8]])}))


@pytest.mark.parametrize("scale", [-1e38, -1.0, float("nan"), float("inf")])
def test_a_scale_that_is_not_a_finite_magnitude_is_refused(scale):
    """A negative scale made the bound on the tensor's entries negative, so an adapter that
    unpacks to NaN passed the overflow check (and served NaN)."""
    tensors, metadata = parse_safetensors_parts(compressed_files({}, {"k": torch.randn(2, 8)}, 0.5)[WEIGHTS_FILE])
    tensors["scales"][0] = scale
    with pytest.raises(ValueError, match=r"^it lists 2 tensors but holds 2 finite, non-negative scales$"):
        parse_compressed(save(tensors, metadata))


def parse_safetensors_parts(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors and metadata, to damage and save again."""
    return load(data), json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]


def _masks_as(dtype: str, data: bytes) -> bytes:
    """The file with its masks' dtype renamed (a one-byte dtype: the sizes still agree)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["masks"]["dtype"] = dtype
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: d[: len(d) // 2], "corrupt adapter_model.compeft: it is not a readable safetensors container"),
        # safetensors' parser takes this dtype, its torch table does not: a KeyError, INTERNAL.
        (lambda d: _masks_as("F8_E8M0", d), "corrupt adapter_model.compeft: it holds a tensor of dtype 'F8_E8M0', which no compressed adapter has"),
        (lambda d: d[:-3], "corrupt adapter_model.compeft"),
        (lambda d: b"\x00" * 4, "corrupt adapter_model.compeft"),
        (lambda d: d.replace(b'"compeft"', b'"compeff"'), "metadata must name format 'compeft'"),
    ],
    ids=["half", "f8-e8m0-dtype", "truncated", "tiny", "format"],
)
def test_corrupt_or_truncated_files_are_refused_with_the_reason(tiny_hf_model, smollm2_tokenizer, source_dir, tmp_path, damage, message):
    root = tmp_path / "adapters"
    shutil.copytree(source_dir, root)
    registry = engine_for(tiny_hf_model, smollm2_tokenizer, root, max_loras=4).registry
    registry.compress("small", "full", 0.2)
    path = root / "small" / WEIGHTS_FILE
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(IncompatibleAdapter, match=message):
        registry.load("small")


@pytest.mark.parametrize("rows, cols", [(4, 8), (8, 64)])  # masks counted byte by byte, and 8 bytes at a time
def test_a_kept_count_that_does_not_match_the_mask_is_refused(rows, cols):
    files = compressed_files({}, {"k": torch.randn(rows, cols)}, 0.5)
    kept = rows * cols // 2
    data = files[WEIGHTS_FILE].replace(f'[[\\"k\\", {rows}, {cols}, {kept}]'.encode(), f'[[\\"k\\", {rows}, {cols}, {kept + 1}]'.encode())
    assert data != files[WEIGHTS_FILE]
    with pytest.raises(ValueError, match=f"lists {kept + 1} kept entries but its mask sets {kept}"):
        parse_compressed(data)


@pytest.mark.parametrize("density", [0.0, 1.5, -0.1])
def test_density_out_of_range_is_refused(density, tiny_hf_model, smollm2_tokenizer, tmp_path):
    with pytest.raises(InvalidRequest, match=r"density must lie in \(0, 1\]"):
        compressed_files({}, {"k": torch.randn(2, 2)}, density)
    # Before the source is looked up: a NOT_FOUND said nothing of the density to fix.
    registry = engine_for(tiny_hf_model, smollm2_tokenizer, tmp_path, max_loras=2).registry
    with pytest.raises(InvalidRequest, match=r"density must lie in \(0, 1\]"):
        registry.compress("small", "no-such-adapter", density)


def test_an_adapters_directory_it_cannot_write_is_a_failed_precondition(tiny_hf_model, smollm2_tokenizer, source_dir, tmp_path, monkeypatch):
    """Kubernetes mounts the serving replicas' adapters read-only: a merge or compress there
    was an INTERNAL error with a trace, not a refusal saying where to publish."""
    import errno

    from tandem.server.adapters import registry as registry_module
    from tandem.server.adapters.merging import MergeSpec
    from tandem.server.errors import FailedPrecondition

    root = tmp_path / "adapters"
    shutil.copytree(source_dir, root)
    registry = engine_for(tiny_hf_model, smollm2_tokenizer, root, max_loras=4).registry

    def read_only(path, files, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(registry_module, "write_directory", read_only)
    for publish in (lambda: registry.compress("small", "full", 0.1), lambda: registry.merge("merged", MergeSpec(("full",), (), "linear"))):
        with pytest.raises(FailedPrecondition, match="cannot write adapter '.*' into the adapters directory \\(Read-only file system\\): publish"):
            publish()
