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

import functools
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from tandem.server.adapters.lora_init import initial_a, initial_a_bound
from tandem.server.adapters.peft_format import (
    CONFIG_FILE,
    LoRAAdapter,
    _own_file,
    adapter_of_modules,
    max_file_bytes,
    pair_tensors,
    read_config,
    read_hashed,
)
from tandem.server.adapters.safetensors_bytes import safetensors_bytes
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


class Listing:
    """What a file's tensors listing determines: the codes (code i is a ternary code of tensor
    code_keys[i], with its shape and kept count), where each one's bits lie in the packed
    arrays, and the tensors (in the order of their first code; a tensor is the sum of its
    codes). Validated once per distinct listing (listing_of): every compressed adapter of one
    base model at one density has the same listing, and a read would otherwise spend most of
    its time on these few thousand Python values."""

    def __init__(self, entries: list[tuple[str, int, int, int]]):
        self.code_keys = [key for key, *_ in entries]
        self.shapes = [(rows, cols) for _, rows, cols, _ in entries]
        self.kept = [kept for *_, kept in entries]
        self.sparse = [k < r * c for k, (r, c) in zip(self.kept, self.shapes)]
        self.mask_bytes = [math.ceil(r * c / 8) if sparse else 0 for sparse, (r, c) in zip(self.sparse, self.shapes)]
        self.sign_bytes = [math.ceil(k / 8) for k in self.kept]
        self.mask_at = _starts(self.mask_bytes)
        self.sign_at = _starts(self.sign_bytes)
        self.value_at = _starts(self.kept)
        index: dict[str, int] = {}
        self.code_tensor = [index.setdefault(key, len(index)) for key in self.code_keys]
        self.keys = list(index)
        self.tensor_shapes: list[tuple[int, int]] = [(0, 0)] * len(self.keys)
        self.nbytes = [0] * len(self.keys)
        for t, shape, m, sb in zip(self.code_tensor, self.shapes, self.mask_bytes, self.sign_bytes):
            self.tensor_shapes[t] = shape  # every code of a tensor has its shape (listing_of checks)
            self.nbytes[t] += m + sb + 4
        self.is_a = [key.endswith(".lora_A.weight") for key in self.keys]
        # The largest |entry| of an A's initial draw, for a seeded adapter's A (its move is coded).
        self.a_bounds = torch.tensor(
            [initial_a_bound(c) if is_a else 0.0 for is_a, (_, c) in zip(self.is_a, self.tensor_shapes)], dtype=torch.float64
        )
        # For _check_bits, as arrays: the masked codes, where their masks start, their last
        # byte, the padding bits of that byte, and their kept counts.
        self.masked = numpy.flatnonzero(numpy.array(self.sparse, dtype=bool))
        mask_at, mask_bytes = numpy.array(self.mask_at, dtype=numpy.int64), numpy.array(self.mask_bytes, dtype=numpy.int64)
        self.masked_at = mask_at[self.masked]
        self.masked_last = self.masked_at + mask_bytes[self.masked] - 1
        entries_of = numpy.array([r * c for r, c in self.shapes], dtype=numpy.int64)[self.masked]
        self.masked_padding = ((1 << (-entries_of % 8)) - 1).astype(numpy.uint8)
        self.masked_kept = numpy.array(self.kept, dtype=numpy.int64)[self.masked]
        # Masks that all start and end on 8-byte boundaries (every real LoRA shape: rank 8, 16,
        # ... times the width) are counted 8 bytes at a time.
        self.whole_words = (self.mask_at[-1] + self.mask_bytes[-1]) % 8 == 0 and not (self.masked_at % 8).any()
        self.code_tensor_index = torch.tensor(self.code_tensor, dtype=torch.int64)
        self.has_codes = torch.tensor([k > 0 for k in self.kept])


@functools.lru_cache(maxsize=64)
def listing_of(listing_json: str, repeats_allowed: bool) -> Listing:
    """The Listing of a tensors metadata string; ValueError saying what is wrong."""
    try:
        listing = json.loads(listing_json)
    except ValueError as exc:
        raise ValueError("its tensors metadata is not a JSON list") from exc
    if not isinstance(listing, list) or not listing:
        raise ValueError("it must hold a non-empty tensors list in its metadata and exactly the tensors masks, signs and scales")
    entries = [_entry(e) for e in listing]
    shapes: dict[str, tuple[int, int]] = {}
    for key, rows, cols, _ in entries:
        if shapes.setdefault(key, (rows, cols)) != (rows, cols):
            raise ValueError(f"its tensors list gives {excerpt(key)} two shapes; every code of a tensor has the tensor's shape")
    if len(shapes) != len(entries) and not repeats_allowed:
        raise ValueError("its tensors list names a key twice, which only version 3 allows")
    return Listing(entries)


class PackedAdapter:
    """A compressed adapter's three packed arrays and its Listing, as its file holds them.

    Its tensors (TernaryTensor) are views of it, so the whole adapter unpacks in one pass of
    a few vectorised operations (unpacked) rather than a handful per tensor."""

    def __init__(self, listing: Listing, masks: torch.Tensor, signs: torch.Tensor, scales: torch.Tensor, a_init_seed: int | None):
        self.listing = listing
        self.masks, self.signs, self.scales = masks, signs, scales
        self.a_init_seed = a_init_seed
        self.residual = [a_init_seed is not None and is_a for is_a in listing.is_a]
        # The largest |entry| each tensor can unpack to, for the checks every read runs (as a
        # list: indexing a tensor per check costs microseconds, and a read checks ~400).
        per_code = torch.where(listing.has_codes, scales, 0.0).double()
        largest = torch.zeros(len(listing.keys), dtype=torch.float64).index_add_(0, listing.code_tensor_index, per_code)
        self.magnitudes = (largest if a_init_seed is None else largest + listing.a_bounds).tolist()
        self._pinned: PackedAdapter | None = None

    def tensors(self) -> dict[str, "TernaryTensor"]:
        return {key: TernaryTensor(self, i) for i, key in enumerate(self.listing.keys)}

    def unpacked(self, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """Every tensor, dense float32 on device, in the order of the listing's keys."""
        listing = self.listing
        signs = F.embedding(self.signs.to(device, non_blocking=True).long(), _SIGNS.to(device)).flatten()
        values = torch.cat([signs[8 * at : 8 * at + k] for at, k in zip(listing.sign_at, listing.kept)])
        counts = torch.tensor(listing.kept, device=device)
        values *= self.scales.to(device, non_blocking=True).repeat_interleave(counts, output_size=values.numel())
        value_at = listing.value_at
        if any(listing.sparse):  # their kept values scatter through their masks, one pass for all
            kept = F.embedding(self.masks.to(device, non_blocking=True).long(), _BITS.to(device)).view(torch.bool).flatten()
            scattered = values if all(listing.sparse) else torch.cat(
                [values[at : at + k] for at, k, sparse in zip(value_at, listing.kept, listing.sparse) if sparse]
            )
            flat = torch.zeros(kept.numel(), dtype=torch.float32, device=device).masked_scatter_(kept, scattered)
        out: list[torch.Tensor | None] = [None] * len(listing.keys)
        for t, sparse, m, v, (r, c) in zip(listing.code_tensor, listing.sparse, listing.mask_at, value_at, listing.shapes):
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
                self.listing, self.masks.pin_memory(), self.signs.pin_memory(), self.scales.pin_memory(), self.a_init_seed
            )
        return self._pinned


class TernaryTensor:
    """One [rows, cols] tensor of a PackedAdapter: tensor-like enough for the checks a PEFT
    tensor goes through (shape, dim, magnitude), unpacked with its whole adapter
    (dense_slices). A plain slotted class: a read makes ~400 of them."""

    __slots__ = ("packed", "index")

    def __init__(self, packed: PackedAdapter, index: int):
        self.packed, self.index = packed, index

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.listing.tensor_shapes[self.index]

    @property
    def nbytes(self) -> int:
        return self.packed.listing.nbytes[self.index]

    def dim(self) -> int:
        return 2

    def float(self) -> "TernaryTensor":
        """Itself: its entries are float32 once unpacked."""
        return self

    def magnitude(self) -> float:
        """The largest |entry| it can unpack to (without reading its bits)."""
        return self.packed.magnitudes[self.index]

    def pin_memory(self) -> "TernaryTensor":
        return TernaryTensor(self.packed.pin_memory(), self.index)


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


def check_density(density: float) -> None:
    """InvalidRequest unless 0 < density <= 1 (the share of each tensor's entries a code keeps)."""
    if not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise InvalidRequest(f"density must lie in (0, 1], got {density}")


def compressed_files(config: dict, tensors: dict[str, torch.Tensor], density: float, a_init_seed: int | None = None) -> dict[str, bytes]:
    """The two files of the compressed form of a PEFT adapter (config and PEFT-keyed tensors).
    With a_init_seed (the adapter was trained here from that seed), tensors must list the
    lora_A keys in the trainer's draw order (lora_init.draw_order), and each A is stored as
    its move from its initial draw. A tensor coded whole (every B; an A without a seed) gets
    a second code, of what its first one left (see the module's docstring)."""
    check_density(density)
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
    return {CONFIG_FILE: json.dumps(config, indent=2).encode(), WEIGHTS_FILE: safetensors_bytes(packed, metadata)}


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
        data, digest = read_hashed(_own_file(name, path, WEIGHTS_FILE), config_bytes, max_file_bytes(model, max_rank))
    except OSError as exc:
        raise IncompatibleAdapter(f"adapter {name!r} has a corrupt {WEIGHTS_FILE}: {exc}") from exc
    return replace(compressed_of_bytes(name, path, config, data, model, max_rank, slot_dtype), content_hash=digest)


def compressed_of_bytes(
    name: str, path: Path, config: dict, data: bytes | bytearray, model: LlamaModel, max_rank: int,
    slot_dtype: torch.dtype = torch.float32,
) -> LoRAAdapter:
    """The compressed adapter a weights file's bytes hold with its checked config
    (config_of_bytes'), refused as read_compressed refuses it; no content hash. A publish
    checks its files by it before they take the adapter's name."""
    try:
        packed = parse_compressed(bytes(data))
    except ValueError as exc:
        raise IncompatibleAdapter(f"adapter {name!r} has a corrupt {WEIGHTS_FILE}: {exc}") from exc
    adapter = adapter_of_modules(name, path, config, pair_tensors(name, packed.tensors()), "", model, max_rank, slot_dtype)
    # The seed stays the adapter's: compressing it again codes its A as the move once more
    # (without it, each A's dense seeded draw was coded whole and lost).
    return replace(adapter, a_init_seed=packed.a_init_seed)


def parse_compressed(data: bytes) -> PackedAdapter:
    """An adapter_model.compeft's tensors, packed, and its seed; ValueError saying what is wrong."""
    try:
        tensors = load_safetensors(data)
        metadata = _metadata(data)
    except (SafetensorError, ValueError) as exc:
        raise ValueError(f"it is not a readable safetensors container ({exc})") from exc
    except KeyError as exc:  # a dtype safetensors' parser takes and its torch table lacks (F8_E8M0, F4, F6_*)
        raise ValueError(f"it holds a tensor of dtype {exc}, which no compressed adapter has") from exc
    if metadata.get("format") != FORMAT or metadata.get("version") not in _READ_VERSIONS:
        raise ValueError(f"its metadata must name format {FORMAT!r} and a version in {', '.join(_READ_VERSIONS)}")
    if set(tensors) != {"masks", "signs", "scales"}:
        raise ValueError("it must hold a non-empty tensors list in its metadata and exactly the tensors masks, signs and scales")
    listing_json = metadata.get("tensors")
    listing = listing_of(listing_json if isinstance(listing_json, str) else "", metadata["version"] == "3")
    for part, dtype in (("masks", torch.uint8), ("signs", torch.uint8), ("scales", torch.float32)):
        if tensors[part].dtype != dtype or tensors[part].dim() != 1:
            raise ValueError(f"its {part} must be a 1-d {str(dtype).removeprefix('torch.')} tensor")
    masks, signs, scales = tensors["masks"], tensors["signs"], tensors["scales"]
    # Magnitudes (the signs are their own array): a negative one made the bound on every
    # entry, a sum of scales, negative or zero, and an overflow to NaN passed the check.
    if scales.numel() != len(listing.kept) or not (torch.isfinite(scales) & (scales >= 0)).all():
        raise ValueError(f"it lists {len(listing.kept)} tensors but holds {scales.numel()} finite, non-negative scales")
    packed = PackedAdapter(listing, masks, signs, scales, _seed(metadata))
    _check_bits(packed)
    return packed


def _check_bits(packed: PackedAdapter) -> None:
    """Every code's mask and signs lie inside the arrays, which hold nothing else; each mask
    sets exactly its kept count of bits and none in its padding."""
    listing = packed.listing
    _check_size("masks", listing.mask_at[-1] + listing.mask_bytes[-1], packed.masks)
    if listing.masked.size:
        # Bits set per mask from a per-byte count summed per code: one vectorised pass over
        # the masks (a read's largest cost when done with a lookup table and a cumsum).
        masks = packed.masks.numpy()
        for j in numpy.flatnonzero(masks[listing.masked_last] & listing.masked_padding)[:1].tolist():
            i = int(listing.masked[j])
            (rows, cols), key = listing.shapes[i], listing.code_keys[i]
            raise ValueError(f"tensor {excerpt(key)} sets mask bits past its {rows * cols} entries")
        if listing.whole_words and masks.ctypes.data % 8 == 0:
            marked = numpy.add.reduceat(numpy.bitwise_count(masks.view(numpy.uint64)), listing.masked_at // 8, dtype=numpy.int64)
        else:
            marked = numpy.add.reduceat(numpy.bitwise_count(masks), listing.masked_at, dtype=numpy.int64)
        for j in numpy.flatnonzero(marked != listing.masked_kept)[:1].tolist():
            i = int(listing.masked[j])
            raise ValueError(f"tensor {excerpt(listing.code_keys[i])} lists {listing.kept[i]} kept entries but its mask sets {marked[j]}")
    _check_size("signs", listing.sign_at[-1] + math.ceil(listing.kept[-1] / 8), packed.signs)


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
