"""The one place that knows the adapter file layout: PEFT files on disk <-> our fused linears.

A PEFT LoRA adapter is `adapter_config.json` + `adapter_model.safetensors` with keys
`base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r]. Our model
fuses q/k/v and gate/up (server/model/lora_targets.py), so an adapter is grouped per (layer, group): the group's slices
share one shrink at the group's largest rank (a slot holds each slice's A rows, zero past
the slice's own rank), their B scaled by alpha / r (alpha / sqrt(r) with rsLoRA) as they
are copied into a slot, so the kernels never scale. The tensors are kept as read (views of
the file's mapping) and copied once, into the slot: a second copy of a 20 MB adapter, or
scaling it in place, costs ~30-40 ms of page faults on our hosts.
"""

import hashlib
import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from server.errors import IncompatibleAdapter, NotFound
from server.model.llama import LlamaModel
from server.model.lora_targets import TARGET_SLICES, group_linears

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")
_LAYER_MODULE = re.compile(r"model\.layers\.(?P<layer>\d+)\.(self_attn|mlp)\.(?P<name>\w+)")
# PEFT saves embedding LoRA as lora_embedding_A/B (no .weight) and, beside it, the base layer.
_EMBEDDING_KEY = re.compile(r"base_model\.model\.(?P<module>(.+\.)?(embed_tokens|lm_head))\..+")


@dataclass
class GroupDelta:
    """One adapter's weights for one fused linear, per slice s of it that the adapter adapts:
    slices[s] = (a [r_s, in], b [out_s, r_s], scale), b unscaled as read. rank: the largest
    r_s, the rank the group runs at in a slot."""

    slices: dict[int, tuple[torch.Tensor, torch.Tensor, float]]
    rank: int


@dataclass
class LoRAAdapter:
    """An adapter read from disk and checked against the base model, ready for a slot."""

    name: str
    path: Path
    content_hash: str
    rank: int
    targets: list[str]
    groups: dict[tuple[int, str], GroupDelta]

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for g in self.groups.values() for a, b, _ in g.slices.values() for t in (a, b)
        )

    def pin_memory(self) -> "LoRAAdapter":
        """The adapter in page-locked host memory, so its copies to a CUDA slot can overlap compute."""
        groups = {
            key: GroupDelta({s: (a.pin_memory(), b.pin_memory(), scale) for s, (a, b, scale) in g.slices.items()}, g.rank)
            for key, g in self.groups.items()
        }
        return replace(self, groups=groups)


def content_hash(path: Path) -> str:
    """sha256 over the config and the weights: a re-uploaded adapter gets a new identity."""
    return _digest((path / CONFIG_FILE).read_bytes(), _read_all(path / WEIGHTS_FILE))


def _digest(config: bytes, weights: bytes) -> str:
    h = hashlib.sha256(config)
    h.update(weights)
    return h.hexdigest()


def read_adapter(
    name: str, path: Path, model: LlamaModel, max_rank: int, slot_dtype: torch.dtype = torch.float32
) -> LoRAAdapter:
    """Load and validate a PEFT LoRA adapter; every refusal says exactly why.

    Every weight must be finite and fit slot_dtype once scaled: one NaN would turn its
    requests' output into garbage, so it is refused here, before any request uses it."""
    if not (path / CONFIG_FILE).is_file():
        raise NotFound(f"adapter {name!r} not found: {path} has no {CONFIG_FILE}")
    if not (path / WEIGHTS_FILE).is_file():
        raise IncompatibleAdapter(f"adapter {name!r} has no {WEIGHTS_FILE} (only safetensors adapters are served)")
    try:
        config_bytes = (path / CONFIG_FILE).read_bytes()
        config = json.loads(config_bytes)
    except (OSError, ValueError) as exc:
        raise IncompatibleAdapter(f"adapter {name!r} has an unreadable {CONFIG_FILE}: {exc}") from exc
    _check_config(name, config)
    try:
        weights = _read_all(path / WEIGHTS_FILE)
    except OSError as exc:
        raise IncompatibleAdapter(f"adapter {name!r} has an unreadable {WEIGHTS_FILE}: {exc}") from exc
    # One read into memory we own: the hash is of exactly the bytes parsed, and the tensors
    # are views of them (a mapping of the file would change under a cached adapter if the
    # file were overwritten in place; a copy per tensor costs another pass of page faults).
    # Hash on a second thread while this one parses (hashlib releases the GIL).
    with ThreadPoolExecutor(1, thread_name_prefix="adapter-hash") as hasher:
        digest = hasher.submit(_digest, config_bytes, weights)
        try:
            tensors = _parse_safetensors(weights)
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise IncompatibleAdapter(f"adapter {name!r} has a corrupt {WEIGHTS_FILE}: {exc}") from exc
        modules = _pair_tensors(name, tensors)
    linears = group_linears(model)
    per_group: dict[tuple[int, str], dict[int, tuple[torch.Tensor, torch.Tensor, float]]] = {}
    targets = set()
    for module, (a, b) in modules.items():
        layer, kind = _locate(name, module, len(model.layers))
        group, slice_idx = TARGET_SLICES[kind]
        linear = linears[(layer, group)]
        r = a.shape[0]
        want_in, want_out = linear.in_features, linear.out_slices[slice_idx]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != r or a.shape[1] != want_in or b.shape[0] != want_out:
            raise IncompatibleAdapter(
                f"adapter {name!r} does not fit the base model: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                f"the base layer needs A [r, {want_in}] and B [{want_out}, r]"
            )
        if r > max_rank:
            raise IncompatibleAdapter(
                f"adapter {name!r} has rank {r} on {module}, the server's maximum is {max_rank} (--max-lora-rank)"
            )
        scale = _scale(name, config, module, r)
        _check_finite(name, module, a, b, scale, slot_dtype)
        per_group.setdefault((layer, group), {})[slice_idx] = (a, b, scale)
        targets.add(kind)
    groups = {key: GroupDelta(slices, max(a.shape[0] for a, _, _ in slices.values())) for key, slices in per_group.items()}
    return LoRAAdapter(
        name=name,
        path=path,
        content_hash=digest.result(),
        rank=max(g.rank for g in groups.values()),
        targets=sorted(targets, key=list(TARGET_SLICES).index),
        groups=groups,
    )


def _read_all(path: Path) -> bytearray:
    data = bytearray(path.stat().st_size)
    with open(path, "rb") as f:
        if f.readinto(data) != len(data) or f.read(1):
            raise OSError(f"{path} changed size while being read")
    return data


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _parse_safetensors(data: bytearray) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file held in data, as views of it: an 8-byte little-endian
    header length, a JSON header {name: {dtype, shape, data_offsets}}, then the data."""
    if len(data) < 8:
        raise ValueError(f"the file has {len(data)} bytes, fewer than a header")
    header_len = int.from_bytes(data[:8], "little")
    if 8 + header_len > len(data):
        raise ValueError(f"the header claims {header_len} bytes, the file has {len(data) - 8} after its length")
    header = json.loads(bytes(data[8 : 8 + header_len]))
    base = 8 + header_len
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"tensor {key!r} has dtype {info['dtype']}; adapters must be F32, F16, BF16 or F64")
        shape, (begin, end) = [int(d) for d in info["shape"]], info["data_offsets"]
        count = math.prod(shape)
        if not 0 <= begin <= end <= len(data) - base or end - begin != count * dtype.itemsize:
            raise ValueError(f"tensor {key!r} lies outside the file or does not match its shape {shape}")
        flat = torch.frombuffer(data, dtype=dtype, count=count, offset=base + begin) if count else torch.empty(0, dtype=dtype)
        tensors[key] = flat.view(shape)
    return tensors


def _check_config(name: str, config: dict) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise IncompatibleAdapter(f"adapter {name!r} is a {config.get('peft_type')} adapter; only LoRA is served")
    if config.get("use_dora"):
        raise IncompatibleAdapter(f"adapter {name!r} uses DoRA, which Tandem does not serve")
    if config.get("modules_to_save"):
        raise IncompatibleAdapter(
            f"adapter {name!r} has modules_to_save {config['modules_to_save']}: full-weight modules are not served"
        )
    if config.get("bias", "none") != "none":
        raise IncompatibleAdapter(f"adapter {name!r} trains biases (bias={config['bias']!r}), which Tandem does not serve")
    if not config.get("r") or "lora_alpha" not in config:
        raise IncompatibleAdapter(f"adapter {name!r} has no r or lora_alpha in {CONFIG_FILE}")


def _pair_tensors(name: str, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.fullmatch(key)
        # The substring test first: the regex backtracks, and an adapter has ~400 keys.
        embedding = _EMBEDDING_KEY.fullmatch(key) if "embed_tokens" in key or "lm_head" in key else None
        if embedding is not None:
            module = embedding["module"]
            raise IncompatibleAdapter(f"adapter {name!r} adapts {module}: LoRA on embeddings or lm_head is not served")
        if m is None:
            raise IncompatibleAdapter(f"adapter {name!r} has an unexpected tensor {key!r}: only LoRA A/B weights are served")
        found.setdefault(m["module"], {})[m["ab"]] = tensor.float()
    if not found:
        raise IncompatibleAdapter(f"adapter {name!r} has no LoRA weights")
    pairs = {}
    for module, ab in found.items():
        if set(ab) != {"A", "B"}:
            raise IncompatibleAdapter(f"adapter {name!r} has lora_A without lora_B (or the reverse) for {module}")
        pairs[module] = (ab["A"], ab["B"])
    return pairs


def _locate(name: str, module: str, num_layers: int) -> tuple[int, str]:
    m = _LAYER_MODULE.fullmatch(module)
    if m is None or m["name"] not in TARGET_SLICES:
        raise IncompatibleAdapter(
            f"adapter {name!r} targets {module}, which is not one of the projections {', '.join(TARGET_SLICES)}"
        )
    layer = int(m["layer"])
    if layer >= num_layers:
        raise IncompatibleAdapter(f"adapter {name!r} targets layer {layer}; the base model has {num_layers} layers")
    return layer, m["name"]


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's rule: a pattern key matches a module name by its dotted suffix."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _scale(name: str, config: dict, module: str, r: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
    if not _is_finite_number(alpha):
        raise IncompatibleAdapter(f"adapter {name!r} has lora_alpha {alpha!r} for {module}; it must be a finite number")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_finite(name: str, module: str, a: torch.Tensor, b: torch.Tensor, scale: float, slot_dtype: torch.dtype) -> None:
    """Refuse NaN/inf weights, and weights that overflow slot_dtype as a slot holds them (B scaled)."""
    for label, t in (("lora_A", a), ("lora_B", b)):
        if not bool(torch.isfinite(t).all()):
            raise IncompatibleAdapter(f"adapter {name!r} has NaN or infinite values in {module}.{label}")
    largest = max(float(a.abs().amax()) if a.numel() else 0.0, float(b.abs().amax()) * abs(scale) if b.numel() else 0.0)
    limit = torch.finfo(slot_dtype).max
    if not largest <= limit:
        raise IncompatibleAdapter(
            f"adapter {name!r} overflows {str(slot_dtype).removeprefix('torch.')} in {module}: "
            f"its largest scaled weight is {largest:.3g}, the limit {limit:.3g}"
        )
