"""The trainer's LoRA init, redrawn from its seed: a compressed adapter's A depends on the
redraw being exactly what the trainer drew (PEFT's kaiming-uniform init)."""

import math

import torch
from torch import nn

from tandem.server.adapters.lora_init import draw_order, initial_a, initial_a_bound


def test_initial_a_is_kaiming_uniform_drawn_in_order_from_the_seed():
    shapes = [(8, 576), (8, 576), (4, 1536), (16, 192)]
    generator = torch.Generator().manual_seed(12)
    expected = []
    for shape in shapes:
        a = torch.empty(shape)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        expected.append(a)
    for got, want in zip(initial_a(shapes, 12), expected, strict=True):
        assert torch.equal(got, want)
        assert got.abs().max() <= initial_a_bound(got.shape[1])


def test_draw_order_is_layer_then_peft_projection_order():
    modules = [(1, "down_proj"), (0, "v_proj"), (1, "q_proj"), (0, "gate_proj"), (0, "q_proj")]
    assert draw_order(modules) == [(0, "q_proj"), (0, "v_proj"), (0, "gate_proj"), (1, "q_proj"), (1, "down_proj")]
