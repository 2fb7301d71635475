"""ComPEFT-compressed adapters: the packed file round-trips to exactly the sparsified ternary
tensors, is ~32 / (1 + density) times smaller than float32, serves exactly like the same
tensors written as a PEFT adapter, counts its packed bytes in the host cache, shows its
format and ratio, and is refused with the reason when corrupt or truncated."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tandem.server.adapters.compeft_format import WEIGHTS_FILE, TernaryTensor, compressed_files, parse_compressed
from tandem.server.adapters.peft_format import write_adapter
from tandem.server.errors import IncompatibleAdapter, InvalidRequest
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


@pytest.mark.parametrize("shape, density", [((8, 64), 0.1), ((96, 4), 0.05), ((3, 5), 0.3), ((7, 9), 1.0)])
def test_decompression_equals_the_sparsified_ternary_tensor_exactly(shape, density):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    files = compressed_files({}, {"k": t}, density)
    restored = parse_compressed(files[WEIGHTS_FILE])["k"].dense()
    assert torch.equal(restored, sparsified_ternary(t, density))
    assert torch.equal(TernaryTensor.compress(t, density).dense(), restored)


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
    write_adapter(root / "twin", config, {k: sparsified_ternary(t, 0.1) for k, t in peft.items()})

    float32_bytes = sum(t.numel() * 4 for t in peft.values())
    data = (root / "small" / WEIGHTS_FILE).read_bytes()
    packed_bytes = len(data) - 8 - int.from_bytes(data[:8], "little")
    assert float32_bytes / packed_bytes > 25  # ~32 / 1.1; the tiny model's header is as large again
    cached = registry.get("small")
    assert cached.nbytes == sum(math.ceil(t.numel() / 8) + math.ceil(math.ceil(0.1 * t.numel()) / 8) + 4 for t in peft.values())
    listed = {i.name: i for i in registry.list()}
    assert listed["small"].compression_ratio == pytest.approx(float32_bytes / cached.nbytes) and listed["small"].compression_ratio > 25
    assert listed["full"].format == "peft" and listed["full"].compression_ratio == 1.0

    seen = record_logits(engine)
    prompt = [5, 17, 300, 42, 9]
    outputs = run(engine, {0: [("c", prompt, greedy(), registry.get("small")), ("p", prompt, greedy(), registry.get("twin")),
                               ("f", prompt, greedy(), registry.get("full"))]})
    assert outputs["c"] == outputs["p"]
    torch.testing.assert_close(torch.stack(seen["c"]), torch.stack(seen["p"]), rtol=0, atol=1e-6)
    # Compression changed the adapter: the comparison is not of one tensor with itself.
    assert (torch.stack(seen["c"]) - torch.stack(seen["f"])).abs().max() > 1e-3


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: d[: len(d) // 2], "corrupt adapter_model.compeft: it is not a readable safetensors container"),
        (lambda d: d[:-3], "corrupt adapter_model.compeft"),
        (lambda d: b"\x00" * 4, "corrupt adapter_model.compeft"),
        (lambda d: d.replace(b'"compeft"', b'"compeff"'), "metadata must name format 'compeft'"),
    ],
    ids=["half", "truncated", "tiny", "format"],
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


def test_a_kept_count_that_does_not_match_the_mask_is_refused():
    files = compressed_files({}, {"k": torch.randn(4, 8)}, 0.5)
    data = files[WEIGHTS_FILE].replace(b'[[\\"k\\", 4, 8, 16]]', b'[[\\"k\\", 4, 8, 17]]')
    assert data != files[WEIGHTS_FILE]
    with pytest.raises(ValueError, match="lists 17 kept entries but its mask sets 16"):
        parse_compressed(data)


@pytest.mark.parametrize("density", [0.0, 1.5, -0.1])
def test_density_out_of_range_is_refused(density):
    with pytest.raises(InvalidRequest, match=r"density must lie in \(0, 1\]"):
        compressed_files({}, {"k": torch.randn(2, 2)}, density)
