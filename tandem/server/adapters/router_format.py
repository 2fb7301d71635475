"""The one place that knows the router file layout (MeteoRA-style mixtures of LoRA experts).

A router is a folder of the adapters directory, named like an adapter, with two files:

router_config.json:
    {"format": "tandem-router", "version": 1,
     "experts": ["sql", "json", "summary"],   # adapters of the same directory, in gate order
     "top_k": 2,                              # experts mixed per token and linear (default 2)
     "temperature": 1.0}                      # gate logits are divided by it (default 1)
router_gates.safetensors:
    "layers.<i>.<group>.weight": [num_experts, in_features], one linear gate per routed linear,
    over that linear's input. <group> is one of our fused linears: qkv (the input of q/k/v_proj),
    o (o_proj), gate_up (gate/up_proj), down (down_proj). No bias.

At each gated linear, for each token: logits = gate @ x / temperature; the top_k experts are
mixed with weights softmax(their logits), y += sum_i w_i * B_i(A_i x). A linear without a
gate gets no expert delta. Every expert must adapt every gated linear.
"""

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tandem.server.adapters.peft_format import (
    LoRAAdapter,
    _json_object,
    _own_file,
    _parse_safetensors,
    _shown,
    max_file_bytes,
    read_hashed,
    read_small,
)
from tandem.server.adapters.safetensors_bytes import safetensors_bytes
from tandem.server.atomic_files import write_directory
from tandem.server.errors import IncompatibleAdapter, NotFound
from tandem.server.model.llama import LlamaModel
from tandem.server.model.lora_targets import TARGET_SLICES, group_linears

CONFIG_FILE = "router_config.json"
GATES_FILE = "router_gates.safetensors"
FORMAT = "tandem-router"
VERSION = 1
DEFAULT_TOP_K = 2
# At most 9 digits: int() refuses thousands (a ValueError, an INTERNAL), and no model has a
# billion layers; no leading zero: "layers.01" and "layers.1" would be one gate twice.
# The least temperature: gate logits are multiplied by 1 / temperature in float32, and at
# 1e-40 that is inf, every routed token's mixture NaN. At 1e-4 routing is already top-1.
MIN_TEMPERATURE = 1e-4
_GATE_KEY = re.compile(r"layers\.(?P<layer>0|[1-9]\d{0,8})\.(?P<group>qkv|o|gate_up|down)\.weight")


@dataclass
class Router:
    """A router read from disk and checked against the base model.

    gates: per (layer, group), [num_experts, in_features] float32.
    adapters: the experts' adapters (the versions this router runs with), in gate order;
        empty until the registry resolves them.
    """

    name: str
    path: Path
    content_hash: str
    experts: tuple[str, ...]
    top_k: int
    temperature: float
    gates: dict[tuple[int, str], torch.Tensor]
    adapters: tuple[LoRAAdapter, ...] = ()
    _device_gates: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def gates_on(self, device: torch.device) -> dict[tuple[int, str], torch.Tensor]:
        """The gates on device, copied there once per router version."""
        if device.type == "cpu":
            return self.gates
        if device not in self._device_gates:
            self._device_gates[device] = {key: g.to(device) for key, g in self.gates.items()}
        return self._device_gates[device]


def is_router(directory: Path) -> bool:
    return (directory / CONFIG_FILE).is_file()


def read_router(name: str, path: Path, model: LlamaModel, check_fits: Callable[[str, int], None]) -> Router:
    """Load and validate a router; every refusal says what is wrong and where. check_fits(name,
    num_experts): the server's refusal of more experts than its slots hold, run before the
    gates file is read: that file's size limit grows with the experts its config lists."""
    if not (path / CONFIG_FILE).is_file():
        raise NotFound(f"router {name!r} not found: {path} has no {CONFIG_FILE}")
    if not (path / GATES_FILE).is_file():
        raise IncompatibleAdapter(f"router {name!r} has no {GATES_FILE}")
    try:
        config_bytes = read_small(_own_file(name, path, CONFIG_FILE))
    except OSError as exc:
        raise IncompatibleAdapter(f"router {name!r} has an unreadable {CONFIG_FILE}: {exc}") from exc
    settings = router_settings(name, config_bytes, check_fits)
    try:
        data, digest = read_hashed(_own_file(name, path, GATES_FILE), config_bytes, max_file_bytes(model, len(settings[0])))
    except OSError as exc:
        raise IncompatibleAdapter(f"router {name!r} has an unreadable {GATES_FILE}: {exc}") from exc
    return router_of_bytes(name, path, settings, data, model, digest)


def router_settings(name: str, data: bytes, check_fits: Callable[[str, int], None]) -> tuple[tuple[str, ...], int, float]:
    """A router_config.json's bytes, checked (check_fits as read_router's): (experts, top_k, temperature)."""
    try:
        config = _json_object(data)
    except ValueError as exc:
        raise IncompatibleAdapter(f"router {name!r} has an unreadable {CONFIG_FILE}: {exc}") from exc
    settings = _check_config(name, config)
    check_fits(name, len(settings[0]))
    return settings


def router_of_bytes(
    name: str, path: Path, settings: tuple[tuple[str, ...], int, float], gates: bytearray | memoryview, model: LlamaModel,
    digest: str = "",
) -> Router:
    """The router a gates file's bytes hold with its checked settings (router_settings'),
    refused as read_router refuses it. A publish checks its files by it before they take the
    router's name."""
    experts, top_k, temperature = settings
    try:
        tensors = _parse_safetensors(gates).tensors
    except ValueError as exc:
        raise IncompatibleAdapter(f"router {name!r} has an unreadable {GATES_FILE}: {exc}") from exc
    return Router(
        name=name,
        path=path,
        content_hash=digest,
        experts=experts,
        top_k=top_k,
        temperature=temperature,
        gates=_check_gates(name, tensors, len(experts), model),
    )


def _check_config(name: str, config: dict) -> tuple[tuple[str, ...], int, float]:
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise IncompatibleAdapter(
            f"router {name!r}: {CONFIG_FILE} must have format {FORMAT!r} and version {VERSION}, "
            f"got {_shown(config.get('format'))} and {_shown(config.get('version'))}"
        )
    experts = config.get("experts")
    if not isinstance(experts, list) or not experts or not all(isinstance(e, str) and e for e in experts):
        raise IncompatibleAdapter(f"router {name!r}: experts must be a non-empty list of adapter names, got {_shown(experts)}")
    if len(set(experts)) != len(experts):
        raise IncompatibleAdapter(f"router {name!r} lists an expert twice: {_shown(experts)}")
    top_k = config.get("top_k", min(DEFAULT_TOP_K, len(experts)))
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= len(experts):
        raise IncompatibleAdapter(f"router {name!r} has top_k {_shown(top_k)}; it must lie in [1, {len(experts)}] (its experts)")
    temperature = config.get("temperature", 1.0)
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not _finite_at_least(temperature, MIN_TEMPERATURE):
        raise IncompatibleAdapter(
            f"router {name!r} has temperature {_shown(temperature)}; it must be a finite number of at least {MIN_TEMPERATURE:g}"
        )
    return tuple(experts), top_k, float(temperature)


def _finite_at_least(value: int | float, least: float) -> bool:
    try:
        return math.isfinite(value) and value >= least
    except OverflowError:  # a JSON integer past any float: it was INTERNAL for every request
        return False


def _check_gates(name: str, tensors: dict[str, torch.Tensor], num_experts: int, model: LlamaModel) -> dict[tuple[int, str], torch.Tensor]:
    linears = group_linears(model)
    gates = {}
    for key, tensor in tensors.items():
        match = _GATE_KEY.fullmatch(key)
        if match is None:
            raise IncompatibleAdapter(f"router {name!r} has an unexpected tensor {key[:64]!r}: gates are layers.<i>.<qkv|o|gate_up|down>.weight")
        where = (int(match["layer"]), match["group"])
        if where not in linears:
            raise IncompatibleAdapter(f"router {name!r} gates layer {where[0]}; the base model has {len(model.layers)} layers")
        want = (num_experts, linears[where].in_features)
        if tuple(tensor.shape) != want:
            raise IncompatibleAdapter(
                f"router {name!r} does not fit the base model: {key} is {list(tensor.shape)}, "
                f"the base layer needs [{want[0]} experts, {want[1]} inputs]"
            )
        gate = tensor.to(torch.float32).clone()
        if not torch.isfinite(gate).all():
            raise IncompatibleAdapter(f"router {name!r} has NaN or infinite values in {key}")
        gates[where] = gate
    if not gates:
        raise IncompatibleAdapter(f"router {name!r} has no gates in {GATES_FILE}")
    return gates


def check_experts(router: Router, adapters: list[LoRAAdapter]) -> None:
    """Refuse experts that cannot serve under this router: one that leaves a gated linear alone."""
    for adapter in adapters:
        for layer, group in sorted(router.gates):
            if (layer, group) not in adapter.groups:
                modules = "/".join(t for t, (g, _) in TARGET_SLICES.items() if g == group)
                raise IncompatibleAdapter(
                    f"router {router.name!r} gates layer {layer} {group} ({modules}), "
                    f"which its expert {adapter.name!r} does not adapt: every expert must adapt every gated linear"
                )


def router_config(experts: list[str], top_k: int = DEFAULT_TOP_K, temperature: float = 1.0) -> dict:
    return {"format": FORMAT, "version": VERSION, "experts": list(experts), "top_k": top_k, "temperature": temperature}


def gate_key(layer: int, group: str) -> str:
    return f"layers.{layer}.{group}.weight"


def router_files(config: dict, gates: dict[tuple[int, str], torch.Tensor]) -> dict[str, bytes]:
    """The two files of a router, as bytes: what write_router and gate-training checkpoints store."""
    tensors = {gate_key(*key): g.detach().to("cpu", torch.float32).contiguous() for key, g in gates.items()}
    return {CONFIG_FILE: json.dumps(config, indent=2).encode(), GATES_FILE: safetensors_bytes(tensors, {"format": "pt"})}


def gates_of(tensors: dict[str, torch.Tensor]) -> dict[tuple[int, str], torch.Tensor]:
    """Gate tensors by (layer, group), from their file keys (as written here; not validated)."""
    out = {}
    for key, tensor in tensors.items():
        match = _GATE_KEY.fullmatch(key)
        if match is not None:
            out[(int(match["layer"]), match["group"])] = tensor
    return out


def write_router(directory: Path, config: dict, gates: dict[tuple[int, str], torch.Tensor]) -> None:
    """Write a router atomically: readers see the old version or the new, never a mix."""
    write_directory(directory, router_files(config, gates))
