"""Adapter files to break: the base model they are read against, and a fresh copy of a good
adapter per test."""

import shutil
from pathlib import Path

import pytest
import torch

from tandem.server.model.loader import build_from_hf
from tests.adapters.make_adapters import make_adapter


@pytest.fixture(scope="module")
def base(tiny_hf_model):
    """Our model built from the tiny Llama: what read_adapter checks adapters against."""
    return build_from_hf(tiny_hf_model, torch.float32, torch.device("cpu"))


@pytest.fixture(scope="module")
def template(tiny_hf_model, tmp_path_factory) -> Path:
    """A good rank-4 q_proj adapter; tests change copies of it."""
    return make_adapter(tiny_hf_model, tmp_path_factory.mktemp("template") / "t", r=4, target_modules=["q_proj"])


@pytest.fixture
def adapter(template, tmp_path) -> Path:
    return Path(shutil.copytree(template, tmp_path / "x"))
