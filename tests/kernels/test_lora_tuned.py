"""Tuned decode configs (kernels/lora/tuned/<device>.json): each kind of config computes what
the reference does, the table is looked up by shape and step size, and a fused entry yields
to the untuned choice where the slots' ranks do not fit on chip."""

import json

import pytest
import torch

from tandem.kernels.lora import reference
from tests.kernels.test_lora_kernels import DEVICE, Case, assert_close, needs_triton, triton_sgmv

CONFIGS = {
    "fused-default": dict(fused=True),
    "fused-wide-k": dict(fused=True, block_k=128, num_n_groups=3, num_warps=8, num_stages=2),
    "two-launch-split-4": dict(fused=False, split_k=4, block_n=32, num_warps=2),
    "two-launch-split-64": dict(fused=False, split_k=64, block_n=64),
}


@needs_triton
@pytest.mark.parametrize("fields", CONFIGS.values(), ids=CONFIGS.keys())
def test_every_kind_of_config_matches_the_reference(fields):
    case = Case(7, 13, 96, (48, 16, 16), [8, 16, 3, 0], 16, device=DEVICE)
    y, y_ref = case.y.clone(), case.y.clone()
    triton_sgmv.DecodeConfig(**fields).run(case.x, case.w, case.batch, y)
    reference.lora_delta(case.x, case.w, case.batch, y_ref)
    assert_close(y, y_ref, torch.float32)


@needs_triton
def test_the_table_is_read_by_shape_and_the_smallest_step_size_that_fits(monkeypatch, tmp_path):
    case = Case(1, 4, 96, (48, 16, 16), [8, 16], 16)
    key = triton_sgmv.shape_key(96, (48, 16, 16))
    entries = [
        triton_sgmv.config_entry(triton_sgmv.DecodeConfig(False, split_k=8), 8),
        triton_sgmv.config_entry(triton_sgmv.DecodeConfig(True, block_k=128), 32),
    ]
    (tmp_path / "GPU_X.json").write_text(json.dumps({"configs": {key: entries}}))
    monkeypatch.setattr(triton_sgmv, "tuned_table_path", lambda device: tmp_path / "GPU_X.json")
    triton_sgmv._tuned_tables.cache_clear()
    try:
        cuda = torch.device("cuda")
        assert triton_sgmv.decode_config(cuda, case.w, 1).split_k == 8
        assert triton_sgmv.decode_config(cuda, case.w, 9).block_k == 128
        assert triton_sgmv.decode_config(cuda, case.w, 33) is None  # past the table: untuned
        assert triton_sgmv.decode_config(torch.device("cpu"), case.w, 1) is None
        high = Case(1, 4, 96, (48, 16, 16), [8, 200], 256)
        assert triton_sgmv.decode_config(cuda, high.w, 9) is None  # rank 200 does not fuse
        other = Case(1, 4, 64, (48, 16, 16), [8, 16], 16)
        assert triton_sgmv.decode_config(cuda, other.w, 1) is None  # another shape
    finally:
        triton_sgmv._tuned_tables.cache_clear()


@needs_triton
def test_the_committed_tables_parse_into_configs():
    for path in triton_sgmv.TUNED_DIR.glob("*.json"):
        configs = json.loads(path.read_text())["configs"]
        assert configs, path
        for entries in configs.values():
            sizes = [e["max_tokens"] for e in entries]
            assert sizes == sorted(sizes)
            for e in entries:
                triton_sgmv.DecodeConfig(**{k: v for k, v in e.items() if k != "max_tokens"})
