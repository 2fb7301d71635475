"""The one table of what LoRA may adapt: PEFT's projection names <-> our fused linears.

Our model fuses q/k/v into one linear and gate/up into another, so a PEFT module is a
slice of a group: (layer, group) names a fused linear, the slice index its part. The
adapter reader, the slot pool, the trainer and the PEFT writer all go through here.
"""

import weakref
from collections.abc import Callable

from tandem.server.model.linear import FusedLinear
from tandem.server.model.llama import LlamaModel

# PEFT module name -> (our fused group, slice index within it), in PEFT's usual order.
TARGET_SLICES: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv", 0),
    "k_proj": ("qkv", 1),
    "v_proj": ("qkv", 2),
    "o_proj": ("o", 0),
    "gate_proj": ("gate_up", 0),
    "up_proj": ("gate_up", 1),
    "down_proj": ("down", 0),
}
TARGETS = tuple(TARGET_SLICES)
# group -> (the attribute path inside a decoder layer, its PEFT parent module).
_GROUPS = {
    "qkv": (("attn", "qkv"), "self_attn"),
    "o": (("attn", "o_proj"), "self_attn"),
    "gate_up": (("mlp", "gate_up"), "mlp"),
    "down": (("mlp", "down"), "mlp"),
}


def group_linears(model: LlamaModel) -> dict[tuple[int, str], FusedLinear]:
    """Every LoRA-able linear of the model, by (layer, group)."""
    out = {}
    for i, layer in enumerate(model.layers):
        for group, ((block, attr), _) in _GROUPS.items():
            out[(i, group)] = getattr(getattr(layer, block), attr)
    return out


_SHAPES: "weakref.WeakKeyDictionary[LlamaModel, dict[tuple[int, str], tuple[int, tuple[int, ...]]]]" = weakref.WeakKeyDictionary()


def linear_shapes(model: LlamaModel) -> dict[tuple[int, str], tuple[int, tuple[int, ...]]]:
    """(layer, group) -> (in_features, out_slices) of every LoRA-able linear, worked out once
    per model (a linear swapped by replace_linears keeps its shape): every adapter read
    checks its ~200 modules against these, and module attribute lookups cost microseconds."""
    shapes = _SHAPES.get(model)
    if shapes is None:
        shapes = _SHAPES[model] = {key: (linear.in_features, linear.out_slices) for key, linear in group_linears(model).items()}
    return shapes


def replace_linears(model: LlamaModel, wrap: Callable[[tuple[int, str], FusedLinear], FusedLinear]) -> None:
    """Swap every LoRA-able linear for wrap(key, linear): how LoRA attaches after the model is built."""
    for i, layer in enumerate(model.layers):
        for group, ((block, attr), _) in _GROUPS.items():
            parent = getattr(layer, block)
            setattr(parent, attr, wrap((i, group), getattr(parent, attr)))


def target_of(layer: int, group: str, slice_idx: int) -> str:
    """The PEFT module name of one slice of a group, e.g. (3, "qkv", 2) -> "v_proj"."""
    return next(t for t, where in TARGET_SLICES.items() if where == (group, slice_idx))


def module_path(layer: int, target: str) -> str:
    """The module's path inside a PEFT model, e.g. "model.layers.3.self_attn.v_proj"."""
    return f"model.layers.{layer}.{_GROUPS[TARGET_SLICES[target][0]][1]}.{target}"
