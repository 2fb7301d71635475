"""The one place that knows the ComPEFT-compressed adapter layout (Yadav et al. 2023:
sparsify a fine-tuned residual, keep what remains as signs times one scale).

A compressed adapter is a folder of the adapters directory holding PEFT's own
`adapter_config.json` (so ranks, alphas and targets keep PEFT's meaning) and, instead of
`adapter_model.safetensors`, `adapter_model.compeft`: a safetensors container (readable by
the `safetensors` package) whose `__metadata__` is
    {"format": "compeft", "version": "3",
     "tensors": "[[<PEFT key>, rows, cols, kept], ...]",   (a JSON string: the codes, in storage order)
     "a_init_seed": "<integer>"}                            (optional)
where every PEFT tensor key K (`base_model.model.<module>.lora_A.weight`, ...) is listed
once per code of K (each code with K's shape), and which holds three tensors, each the
concatenation over the codes in that order:
    masks   U8 [sum ceil(rows * cols / 8)]  the kept entries, one bit each, row-major, most
                                           significant bit first (numpy.packbits), each
                                           code's bits padded with zeros to a whole byte;
                                           none for a code that keeps every entry
    signs   U8 [sum ceil(kept / 8)]         per kept entry in order, 1 = negative, padded alike
    scales  F32 [number of codes]           the magnitude of every kept entry of each code
so entry i of a code is scale * (1 - 2 * sign) where its mask bit i is set (or the code
keeps every entry), else 0, and tensor K is the sum of its codes. With a_init_seed, each
lora_A tensor stores its fine-tuned residual, and entry i of it is that plus entry i of the
trainer's initial A for the seed (lora_init.py), drawn for the lora_A keys in the order of
their first code, which the writer makes the trainer's draw order. Version 2 is version 3
with one code per key; version 1 is version 2 without a_init_seed; all three are read.

ComPEFT compresses the update training made, not the weights: a trained A is mostly its
random initial draw, which no sparse sign code keeps (an adapter compressed whole lost most
of its task accuracy at density 0.3), while the move is small and sign-like (Adam's steps).
B starts at zero, so B is its own residual. An adapter whose start is unknown (not trained
here from a seed) is compressed whole.

Compressing keeps each code's ceil(density * numel) largest magnitudes (at least one) and
sets the scale to their mean magnitude, the one value that minimises the squared error of
the kept entries for those signs. A code of A's move leaves ~8% of the adapter's product
B·A in error, but one code of a tensor coded whole (B) leaves ~40%, which cost the task
adapters 6-13% of their accuracy at density 0.5 (bench/algebra_eval.py): so a tensor coded
whole gets a second code, of what the first left (residual coding, as in multi-stage vector
quantisers), which brings the product's error to ~19% and the accuracy back within 5%.
About 32 / (1 + density) times smaller than float32 per code: ~14x at density 0.5 overall.

The server reads these files directly: the host cache holds the packed bits (and counts
their bytes); a slot load unpacks the whole adapter in one pass on the slot's device, with
no dense copy on disk or in the cache.
"""

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from tandem.server.adapters.lora_init import initial_a, initial_a_bound
from tandem.server.adapters.peft_format import (
    CONFIG_FILE,
    LoRAAdapter,
    _own_file,
    adapter_of_modules,
    pair_tensors,
    read_config,
    read_hashed,
)
from tandem.server.errors import IncompatibleAdapter, InvalidRequest, NotFound, excerpt
from tandem.server.model.llama import LlamaModel

WEIGHTS_FILE = "adapter_model.compeft"
FORMAT = "compeft"
VERSION = "3"
_READ_VERSIONS = ("1", "2", "3")
_BIT_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)
# Byte -> its 8 bits (most significant first), as 0/1 and as the sign +1 (0) / -1 (1): an
# unpack is one table lookup per byte.
_BITS = ((torch.arange(256)[:, None] >> torch.arange(7, -1, -1)) & 1).to(torch.uint8)
_SIGNS = 1.0 - 2.0 * _BITS.float()


class PackedAdapter:
    """A compressed adapter's three packed arrays and its listing, as its file holds them.

    The listing holds codes: code i is a ternary code of tensor code_keys[i]; a tensor is the
    sum of its codes (one, or a refinement after the first). Its tensors (TernaryTensor) are
    views of it, so the whole adapter unpacks in one pass of a few vectorised operations
    (unpacked) rather than a handful per tensor."""

    def __init__(
        self, code_keys: list[str], shapes: list[tuple[int, int]], kept: list[int],
        masks: torch.Tensor, signs: torch.Tensor, scales: torch.Tensor, a_init_seed: int | None,
    ):
        self.code_keys, self.shapes, self.kept = code_keys, shapes, kept
        self.masks, self.signs, self.scales = masks, signs, scales
        self.a_init_seed = a_init_seed
        self.sparse = [k < r * c for k, (r, c) in zip(kept, shapes)]
        self.mask_bytes = [math.ceil(r * c / 8) if sparse else 0 for sparse, (r, c) in zip(self.sparse, shapes)]
        sign_bytes = [math.ceil(k / 8) for k in kept]
        self.mask_at = _starts(self.mask_bytes)
        self.sign_at = _starts(sign_bytes)
        # Tensors in the order of their first code; each code's tensor index.
        index: dict[str, int] = {}
        self.code_tensor = [index.setdefault(key, len(index)) for key in code_keys]
        self.keys = list(index)
        self.tensor_shapes: list[tuple[int, int]] = [(0, 0)] * len(self.keys)
        for t, shape in zip(self.code_tensor, shapes):
            self.tensor_shapes[t] = shape  # every code of a tensor has its shape (parse_compressed checks)
        self.residual = [a_init_seed is not None and key.endswith(".lora_A.weight") for key in self.keys]
        self.nbytes = [0] * len(self.keys)
        # The largest |entry| each tensor can unpack to, for the checks every read runs (as a
        # list: indexing a tensor per check costs microseconds, and a read checks ~400).
        self.magnitudes = [initial_a_bound(c) if residual else 0.0 for (_, c), residual in zip(self.tensor_shapes, self.residual)]
        for t, m, sb, scale, k in zip(self.code_tensor, self.mask_bytes, sign_bytes, scales.tolist(), kept):
            self.nbytes[t] += m + sb + 4
            self.magnitudes[t] += scale if k else 0.0
        self._pinned: PackedAdapter | None = None

    def tensors(self) -> dict[str, "TernaryTensor"]:
        return {key: TernaryTensor(self, i) for i, key in enumerate(self.keys)}

    def unpacked(self, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """Every tensor, dense float32 on device, in the order of keys."""
        signs = F.embedding(self.signs.to(device, non_blocking=True).long(), _SIGNS.to(device)).flatten()
        values = torch.cat([signs[8 * at : 8 * at + k] for at, k in zip(self.sign_at, self.kept)])
        counts = torch.tensor(self.kept, device=device)
        values *= self.scales.to(device, non_blocking=True).repeat_interleave(counts, output_size=values.numel())
        value_at = _starts(self.kept)
        if any(self.sparse):  # their kept values scatter through their masks, one pass for all
            kept = F.embedding(self.masks.to(device, non_blocking=True).long(), _BITS.to(device)).view(torch.bool).flatten()
            scattered = values if all(self.sparse) else torch.cat(
                [values[at : at + k] for at, k, sparse in zip(value_at, self.kept, self.sparse) if sparse]
            )
            flat = torch.zeros(kept.numel(), dtype=torch.float32, device=device).masked_scatter_(kept, scattered)
        out: list[torch.Tensor | None] = [None] * len(self.keys)
        for t, sparse, m, v, (r, c) in zip(self.code_tensor, self.sparse, self.mask_at, value_at, self.shapes):
            code = (flat[8 * m : 8 * m + r * c] if sparse else values[v : v + r * c]).view(r, c)
            out[t] = code if out[t] is None else out[t] + code
        if self.a_init_seed is not None:
            moved = [t for t, residual in zip(out, self.residual) if residual]
            for t, start in zip(moved, initial_a([tuple(t.shape) for t in moved], self.a_init_seed)):
                t += start.to(device, non_blocking=True)
        return out

    def pin_memory(self) -> "PackedAdapter":
        """The same adapter with its arrays in page-locked memory (made once)."""
        if self._pinned is None:
            self._pinned = PackedAdapter(
                self.code_keys, self.shapes, self.kept, self.masks.pin_memory(), self.signs.pin_memory(), self.scales.pin_memory(),
                self.a_init_seed,
            )
        return self._pinned


@dataclass(frozen=True)
class TernaryTensor:
    """One [rows, cols] tensor of a PackedAdapter: tensor-like enough for the checks a PEFT
    tensor goes through (shape, dim, magnitude), unpacked with its whole adapter
    (dense_slices)."""

    packed: PackedAdapter
    index: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.tensor_shapes[self.index]

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes[self.index]

    def dim(self) -> int:
        return 2

    def float(self) -> "TernaryTensor":
        """Itself: its entries are float32 once unpacked."""
        return self

    def magnitude(self) -> float:
        """The largest |entry| it can unpack to (without reading its bits)."""
        return self.packed.magnitudes[self.index]

    def pin_memory(self) -> "TernaryTensor":
        return replace(self, packed=self.packed.pin_memory())


def _starts(sizes: list[int]) -> list[int]:
    out, at = [], 0
    for size in sizes:
        out.append(at)
        at += size
    return out


def _pack(bits: torch.Tensor) -> torch.Tensor:
    """bool [n] -> U8 [ceil(n / 8)], most significant bit first (numpy.packbits' order)."""
    padded = torch.zeros(math.ceil(bits.numel() / 8) * 8, dtype=torch.uint8)
    padded[: bits.numel()] = bits.to(torch.uint8)
    return (padded.view(-1, 8) << _BIT_SHIFTS).sum(1, dtype=torch.uint8)


def sparsify(t: torch.Tensor, density: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """ComPEFT's code of t: the mask of its ceil(density * numel) largest magnitudes (at least
    one), their signs (True = negative) and their mean magnitude."""
    flat = t.detach().to("cpu", torch.float32).flatten()
    kept = min(flat.numel(), max(1, math.ceil(density * flat.numel())))
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[flat.abs().argsort(descending=True, stable=True)[:kept]] = True
    values = flat[mask]
    return mask, values < 0, float(values.abs().mean())


def dense_slices(adapter: LoRAAdapter, device: torch.device | str = "cpu") -> dict[tuple[tuple[int, str], int], tuple[torch.Tensor, torch.Tensor]]:
    """(group key, slice) -> (A, B) dense of every slice of an adapter: a compressed one's
    unpacked on device in one pass, a PEFT one's tensors as they are."""
    packed = next(
        (a.packed for g in adapter.groups.values() for a, _, _ in g.slices.values() if isinstance(a, TernaryTensor)), None
    )
    dense = packed.unpacked(device) if packed is not None else []

    def one(t: "torch.Tensor | TernaryTensor") -> torch.Tensor:
        return dense[t.index] if isinstance(t, TernaryTensor) else t

    return {(key, s): (one(a), one(b)) for key, g in adapter.groups.items() for s, (a, b, _) in g.slices.items()}


def is_compressed(directory: Path) -> bool:
    return (directory / WEIGHTS_FILE).is_file()


def compressed_files(config: dict, tensors: dict[str, torch.Tensor], density: float, a_init_seed: int | None = None) -> dict[str, bytes]:
    """The two files of the compressed form of a PEFT adapter (config and PEFT-keyed tensors).
    With a_init_seed (the adapter was trained here from that seed), tensors must list the
    lora_A keys in the trainer's draw order (lora_init.draw_order), and each A is stored as
    its move from its initial draw. A tensor coded whole (every B; an A without a seed) gets
    a second code, of what its first one left (see the module's docstring)."""
    if not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise InvalidRequest(f"density must lie in (0, 1], got {density}")
    tensors = {k: t.detach().to("cpu", torch.float32) for k, t in tensors.items()}
    moved = set()
    if a_init_seed is not None:
        a_keys = [k for k in tensors if k.endswith(".lora_A.weight")]
        for key, start in zip(a_keys, initial_a([tuple(tensors[k].shape) for k in a_keys], a_init_seed)):
            tensors[key] = tensors[key] - start
        moved = set(a_keys)
    codes: list[tuple[str, torch.Tensor, torch.Tensor, float]] = []
    for key, t in tensors.items():
        codes.append((key, *sparsify(t, density)))
        if key not in moved:
            codes.append((key, *sparsify(t - _decoded(*codes[-1][1:]).view_as(t), density)))
    packed = {
        "masks": torch.cat([_pack(mask) for _, mask, _, _ in codes if not mask.all()] or [torch.zeros(0, dtype=torch.uint8)]),
        "signs": torch.cat([_pack(negative) for _, _, negative, _ in codes]),
        "scales": torch.tensor([scale for *_, scale in codes], dtype=torch.float32),
    }
    listing = [[key, *tensors[key].shape, int(mask.sum())] for key, mask, _, _ in codes]
    metadata = {"format": FORMAT, "version": VERSION, "tensors": json.dumps(listing)}
    if a_init_seed is not None:
        metadata["a_init_seed"] = str(a_init_seed)
    return {CONFIG_FILE: json.dumps(config, indent=2).encode(), WEIGHTS_FILE: save_safetensors(packed, metadata)}


def _decoded(mask: torch.Tensor, negative: torch.Tensor, scale: float) -> torch.Tensor:
    """The flat float32 tensor a code (sparsify's) stands for."""
    out = torch.zeros(mask.numel(), dtype=torch.float32)
    out[mask] = scale * (1.0 - 2.0 * negative.float())
    return out


def read_compressed(name: str, path: Path, model: LlamaModel, max_rank: int, slot_dtype: torch.dtype = torch.float32) -> LoRAAdapter:
    """Load and validate a compressed adapter: checked like a PEFT adapter (shapes, ranks,
    scales, magnitudes: the packed code bounds every entry without unpacking it), kept
    packed. Corrupt or truncated files are refused with the reason."""
    if not (path / WEIGHTS_FILE).is_file():
        raise NotFound(f"adapter {name!r} not found: {path} has no {WEIGHTS_FILE}")
    config_bytes, config = read_config(name, path)
    try:
        data, digest = read_hashed(_own_file(name, path, WEIGHTS_FILE), config_bytes)
        ternary = parse_compressed(bytes(data))
    except (OSError, ValueError) as exc:
        raise IncompatibleAdapter(f"adapter {name!r} has a corrupt {WEIGHTS_FILE}: {exc}") from exc
    return adapter_of_modules(name, path, config, pair_tensors(name, ternary), digest, model, max_rank, slot_dtype)


def parse_compressed(data: bytes) -> dict[str, TernaryTensor]:
    """The tensors of an adapter_model.compeft, packed; ValueError saying what is wrong."""
    try:
        tensors = load_safetensors(data)
        metadata = _metadata(data)
    except (SafetensorError, ValueError) as exc:
        raise ValueError(f"it is not a readable safetensors container ({exc})") from exc
    if metadata.get("format") != FORMAT or metadata.get("version") not in _READ_VERSIONS:
        raise ValueError(f"its metadata must name format {FORMAT!r} and a version in {', '.join(_READ_VERSIONS)}")
    try:
        listing = json.loads(metadata.get("tensors", ""))
    except ValueError as exc:
        raise ValueError("its tensors metadata is not a JSON list") from exc
    if not isinstance(listing, list) or not listing or set(tensors) != {"masks", "signs", "scales"}:
        raise ValueError("it must hold a non-empty tensors list in its metadata and exactly the tensors masks, signs and scales")
    for part, dtype in (("masks", torch.uint8), ("signs", torch.uint8), ("scales", torch.float32)):
        if tensors[part].dtype != dtype or tensors[part].dim() != 1:
            raise ValueError(f"its {part} must be a 1-d {str(dtype).removeprefix('torch.')} tensor")
    masks, signs, scales = tensors["masks"], tensors["signs"], tensors["scales"]
    if scales.numel() != len(listing) or not torch.isfinite(scales).all():
        raise ValueError(f"it lists {len(listing)} tensors but holds {scales.numel()} finite scales")
    entries = [_entry(e) for e in listing]
    shapes: dict[str, tuple[int, int]] = {}
    for key, rows, cols, _ in entries:
        if shapes.setdefault(key, (rows, cols)) != (rows, cols):
            raise ValueError(f"its tensors list gives {excerpt(key)} two shapes; every code of a tensor has the tensor's shape")
    if len(shapes) != len(entries) and metadata["version"] != "3":
        raise ValueError(f"its tensors list names a key twice, which only version 3 allows (it is version {metadata['version']})")
    packed = PackedAdapter(
        [key for key, *_ in entries], [(rows, cols) for _, rows, cols, _ in entries], [kept for *_, kept in entries],
        masks, signs, scales, _seed(metadata),
    )
    _check_bits(packed)
    return packed.tensors()


def _check_bits(packed: PackedAdapter) -> None:
    """Every tensor's mask and signs lie inside the arrays, which hold nothing else; each mask
    sets exactly its kept count of bits and none in its padding."""
    _check_size("masks", packed.mask_at[-1] + packed.mask_bytes[-1], packed.masks)
    sparse = [i for i, s in enumerate(packed.sparse) if s]
    # Bits set per mask from a per-byte count summed per tensor: one vectorised pass over
    # the masks (a read's largest cost when done with a lookup table and a cumsum).
    masks = packed.masks.numpy()
    starts = [packed.mask_at[i] for i in sparse]
    marked = numpy.add.reduceat(numpy.bitwise_count(masks), starts, dtype=numpy.int64).tolist() if sparse else []
    # A mask's last byte holds (entries % 8 or 8) of its bits, high first; the rest is padding.
    last = masks[[packed.mask_at[i] + packed.mask_bytes[i] - 1 for i in sparse]]
    padding = (1 << ((-numpy.array([packed.shapes[i][0] * packed.shapes[i][1] for i in sparse], dtype=numpy.int64)) % 8)) - 1
    for j in numpy.flatnonzero(last & padding).tolist()[:1]:
        (rows, cols), key = packed.shapes[sparse[j]], packed.code_keys[sparse[j]]
        raise ValueError(f"tensor {excerpt(key)} sets mask bits past its {rows * cols} entries")
    for i, set_bits in zip(sparse, marked):
        if set_bits != packed.kept[i]:
            raise ValueError(f"tensor {excerpt(packed.code_keys[i])} lists {packed.kept[i]} kept entries but its mask sets {set_bits}")
    _check_size("signs", packed.sign_at[-1] + math.ceil(packed.kept[-1] / 8), packed.signs)


def _check_size(part: str, needed: int, array: torch.Tensor) -> None:
    if needed != array.numel():
        raise ValueError(f"its listed tensors need {needed} bytes of packed {part}, it holds {array.numel()}")


def _metadata(data: bytes) -> dict:
    header_len = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}


def _seed(metadata: dict) -> int | None:
    seed = metadata.get("a_init_seed")
    if seed is None:
        return None
    if metadata.get("version") == "1" or not (isinstance(seed, str) and seed.isdigit() and int(seed) < 1 << 63):
        raise ValueError(f"its a_init_seed {excerpt(seed)} is not a non-negative 64-bit integer of version 2 or later")
    return int(seed)


def _entry(entry: object) -> tuple[str, int, int, int]:
    ok = isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], str)
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 31 for v in entry[1:])
    if not ok or entry[1] == 0 or entry[2] == 0 or entry[3] > entry[1] * entry[2]:
        raise ValueError(f"its tensors list holds {excerpt(entry)}; each entry is [key, rows, cols, kept <= rows * cols]")
    return entry[0], entry[1], entry[2], entry[3]
