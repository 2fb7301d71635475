"""The one place that knows the ComPEFT-compressed adapter layout (Yadav et al. 2023:
sparsify a fine-tuned residual, keep what remains as signs times one scale).

A compressed adapter is a folder of the adapters directory holding PEFT's own
`adapter_config.json` (so ranks, alphas and targets keep PEFT's meaning) and, instead of
`adapter_model.safetensors`, `adapter_model.compeft`: a safetensors container (readable by
the `safetensors` package) whose `__metadata__` is
    {"format": "compeft", "version": "1",
     "tensors": "[[<PEFT key>, rows, cols, kept], ...]"}   (a JSON string, in storage order)
for every PEFT tensor key K (`base_model.model.<module>.lora_A.weight`, ...), and which holds
three tensors, each the concatenation over those keys in that order:
    masks   U8 [sum ceil(rows * cols / 8)]  the kept entries, one bit each, row-major, most
                                           significant bit first (numpy.packbits), each
                                           tensor's bits padded to a whole byte
    signs   U8 [sum ceil(kept / 8)]         per kept entry in order, 1 = negative, padded alike
    scales  F32 [number of keys]            the magnitude of every kept entry of each tensor
so entry i of K is scale * (1 - 2 * sign) where its mask bit i is set, else 0.

Compressing keeps each tensor's ceil(density * numel) largest magnitudes (at least one) and
sets the scale to their mean magnitude, the one value that minimises the squared error of
the kept entries for those signs. About 32 / (1 + density) times smaller than float32.

The server reads these files directly: the host cache holds the packed bits (and counts
their bytes); a slot load unpacks them on the slot's device, with no dense copy on disk or
in the cache.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from tandem.server.adapters.peft_format import (
    CONFIG_FILE,
    LoRAAdapter,
    _json_object,
    _own_file,
    adapter_of_modules,
    pair_tensors,
    read_config,
    read_hashed,
)
from tandem.server.errors import IncompatibleAdapter, InvalidRequest, NotFound, excerpt
from tandem.server.model.llama import LlamaModel
from tandem.server.model.lora_targets import module_path, target_of

WEIGHTS_FILE = "adapter_model.compeft"
FORMAT = "compeft"
VERSION = "1"
_BIT_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)


@dataclass(frozen=True)
class TernaryTensor:
    """A [rows, cols] tensor kept as packed bits: scale * sign where mask is set, else 0."""

    shape: tuple[int, int]
    mask: torch.Tensor  # U8 [ceil(numel / 8)]
    signs: torch.Tensor  # U8 [ceil(kept / 8)]
    scale: float
    kept: int

    @property
    def nbytes(self) -> int:
        return self.mask.numel() + self.signs.numel() + 4

    def dim(self) -> int:
        return 2

    def pin_memory(self) -> "TernaryTensor":
        return TernaryTensor(self.shape, self.mask.pin_memory(), self.signs.pin_memory(), self.scale, self.kept)

    def dense(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The float32 tensor on device, unpacked there with no host sync."""
        numel = self.shape[0] * self.shape[1]
        mask = _unpack(self.mask.to(device, non_blocking=True), numel)
        if not self.kept:
            return torch.zeros(self.shape, dtype=torch.float32, device=device)
        negative = _unpack(self.signs.to(device, non_blocking=True), self.kept)
        values = self.scale * (1.0 - 2.0 * negative.to(torch.float32))
        index = (torch.cumsum(mask, 0) - 1).clamp(min=0)
        return torch.where(mask.bool(), values[index], 0.0).view(self.shape)

    @classmethod
    def compress(cls, t: torch.Tensor, density: float) -> "TernaryTensor":
        """Keep t's ceil(density * numel) largest magnitudes as their signs times their mean magnitude."""
        flat = t.detach().to("cpu", torch.float32).flatten()
        kept = min(flat.numel(), max(1, math.ceil(density * flat.numel())))
        top = flat.abs().argsort(descending=True, stable=True)[:kept]
        mask = torch.zeros(flat.numel(), dtype=torch.bool)
        mask[top] = True
        values = flat[mask]
        scale = float(values.abs().mean())
        return cls(tuple(t.shape), _pack(mask), _pack(values < 0), scale, kept)


def _pack(bits: torch.Tensor) -> torch.Tensor:
    """bool [n] -> U8 [ceil(n / 8)], most significant bit first (numpy.packbits' order)."""
    padded = torch.zeros(math.ceil(bits.numel() / 8) * 8, dtype=torch.uint8)
    padded[: bits.numel()] = bits.to(torch.uint8)
    return (padded.view(-1, 8) << _BIT_SHIFTS).sum(1, dtype=torch.uint8)


def _unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """U8 [ceil(n / 8)] -> int64 [n] of 0/1."""
    shifts = _BIT_SHIFTS.to(packed.device)
    return ((packed[:, None] >> shifts) & 1).flatten()[:n].to(torch.int64)


def as_dense(t: "torch.Tensor | TernaryTensor", device: torch.device | str = "cpu") -> torch.Tensor:
    """A slice weight as a dense tensor: a TernaryTensor unpacked on device, a tensor as it is."""
    return t.dense(device) if isinstance(t, TernaryTensor) else t


def is_compressed(directory: Path) -> bool:
    return (directory / WEIGHTS_FILE).is_file()


def compressed_files(config: dict, tensors: dict[str, torch.Tensor], density: float) -> dict[str, bytes]:
    """The two files of the compressed form of a PEFT adapter (config and PEFT-keyed tensors)."""
    if not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise InvalidRequest(f"density must lie in (0, 1], got {density}")
    ternary = {key: TernaryTensor.compress(t, density) for key, t in tensors.items()}
    packed = {
        "masks": torch.cat([t.mask for t in ternary.values()]),
        "signs": torch.cat([t.signs for t in ternary.values()]),
        "scales": torch.tensor([t.scale for t in ternary.values()], dtype=torch.float32),
    }
    listing = [[key, *t.shape, t.kept] for key, t in ternary.items()]
    metadata = {"format": FORMAT, "version": VERSION, "tensors": json.dumps(listing)}
    return {CONFIG_FILE: json.dumps(config, indent=2).encode(), WEIGHTS_FILE: save_safetensors(packed, metadata)}


def read_compressed(name: str, path: Path, model: LlamaModel, max_rank: int, slot_dtype: torch.dtype = torch.float32) -> LoRAAdapter:
    """Load and validate a compressed adapter: checked like a PEFT adapter (on its unpacked
    tensors, once), kept packed. Corrupt or truncated files are refused with the reason."""
    if not (path / WEIGHTS_FILE).is_file():
        raise NotFound(f"adapter {name!r} not found: {path} has no {WEIGHTS_FILE}")
    config_bytes, config = read_config(name, path)
    try:
        data, digest = read_hashed(_own_file(name, path, WEIGHTS_FILE), config_bytes)
        ternary = parse_compressed(bytes(data))
    except (OSError, ValueError) as exc:
        raise IncompatibleAdapter(f"adapter {name!r} has a corrupt {WEIGHTS_FILE}: {exc}") from exc
    modules = pair_tensors(name, {key: t.dense() for key, t in ternary.items()})
    adapter = adapter_of_modules(name, path, config, modules, digest, model, max_rank, slot_dtype)
    for (layer, group), g in adapter.groups.items():
        for s, (_, _, scale) in list(g.slices.items()):
            key = f"base_model.model.{module_path(layer, target_of(layer, group, s))}"
            g.slices[s] = (ternary[f"{key}.lora_A.weight"], ternary[f"{key}.lora_B.weight"], scale)
    return adapter


def parse_compressed(data: bytes) -> dict[str, TernaryTensor]:
    """The tensors of an adapter_model.compeft, packed; ValueError saying what is wrong."""
    try:
        tensors = load_safetensors(data)
        metadata = _metadata(data)
    except (SafetensorError, ValueError) as exc:
        raise ValueError(f"it is not a readable safetensors container ({exc})") from exc
    if metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
        raise ValueError(f"its metadata must name format {FORMAT!r} version {VERSION!r}")
    try:
        listing = json.loads(metadata.get("tensors", ""))
    except ValueError as exc:
        raise ValueError("its tensors metadata is not a JSON list") from exc
    if not isinstance(listing, list) or set(tensors) != {"masks", "signs", "scales"}:
        raise ValueError("it must hold a tensors list in its metadata and exactly the tensors masks, signs and scales")
    for part, dtype in (("masks", torch.uint8), ("signs", torch.uint8), ("scales", torch.float32)):
        if tensors[part].dtype != dtype or tensors[part].dim() != 1:
            raise ValueError(f"its {part} must be a 1-d {str(dtype).removeprefix('torch.')} tensor")
    if tensors["scales"].numel() != len(listing) or not torch.isfinite(tensors["scales"]).all():
        raise ValueError(f"it lists {len(listing)} tensors but holds {tensors['scales'].numel()} finite scales")
    out, mask_at, sign_at = {}, 0, 0
    for i, entry in enumerate(listing):
        key, rows, cols, kept = _entry(entry)
        numel = rows * cols
        mask = tensors["masks"][mask_at : mask_at + math.ceil(numel / 8)]
        if mask.numel() != math.ceil(numel / 8):
            raise ValueError(f"tensor {excerpt(key)} runs past the end of the packed masks")
        if (marked := int(_unpack(mask, numel).sum())) != kept:
            raise ValueError(f"tensor {excerpt(key)} lists {kept} kept entries but its mask sets {marked}")
        signs = tensors["signs"][sign_at : sign_at + math.ceil(kept / 8)]
        if signs.numel() != math.ceil(kept / 8):
            raise ValueError(f"tensor {excerpt(key)} runs past the end of the packed signs")
        out[key] = TernaryTensor((rows, cols), mask.clone(), signs.clone(), float(tensors["scales"][i]), kept)
        mask_at, sign_at = mask_at + mask.numel(), sign_at + signs.numel()
    if mask_at != tensors["masks"].numel() or sign_at != tensors["signs"].numel():
        raise ValueError("it holds packed bytes that no listed tensor owns")
    return out


def _metadata(data: bytes) -> dict:
    header_len = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}


def _entry(entry: object) -> tuple[str, int, int, int]:
    ok = isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], str)
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 31 for v in entry[1:])
    if not ok or entry[1] == 0 or entry[2] == 0 or entry[3] > entry[1] * entry[2]:
        raise ValueError(f"its tensors list holds {excerpt(entry)}; each entry is [key, rows, cols, kept <= rows * cols]")
    return entry[0], entry[1], entry[2], entry[3]
