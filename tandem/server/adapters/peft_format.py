"""The one place that knows the adapter file layout: PEFT files on disk <-> our fused linears.

A PEFT LoRA adapter is `adapter_config.json` + `adapter_model.safetensors` with keys
`base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r]. Our model
fuses q/k/v and gate/up (server/model/lora_targets.py), so an adapter is grouped per (layer, group): the group's slices
share one shrink at the group's largest rank (a slot holds each slice's A rows, zero past
the slice's own rank), their B scaled by alpha / r (alpha / sqrt(r) with rsLoRA) as they
are copied into a slot, so the kernels never scale. The tensors are kept as read (views of
the bytes read) and copied once, into the slot: a second copy of a 20 MB adapter, or
scaling it in place, costs ~30-40 ms of page faults on our hosts. The server reads into its
host slab (host_slab.py), memory touched once, for the same reason.
"""

import functools
import hashlib
import json
import math
import os
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch

from tandem.server.adapters.patterns import MAX_ADAPTER_COST, MAX_PATTERN_KEYS, NotSimple, pattern_cost
from tandem.server.adapters.safetensors_bytes import safetensors_bytes
from tandem.server.atomic_files import write_directory
from tandem.server.errors import IncompatibleAdapter, NotFound, excerpt
from tandem.server.model.llama import LlamaModel
from tandem.server.model.lora_targets import TARGET_SLICES, linear_shapes, module_path

CONFIG_FILE = "adapter_config.json"
# Far past any real adapter's dimension, and below what torch's shapes hold (2^63); an
# adapter's tensors have 1 or 2 dimensions (a file may describe any number: a million of
# them, each near 2^40, took Python half an hour to multiply out, holding the GIL).
MAX_DIMENSION = 1 << 40
MAX_DIMENSIONS = 4
# An adapter_config.json is a few KB; and the room in a weights file for its header (every
# tensor's name, shape and offsets) and metadata, beyond its tensors' bytes.
MAX_CONFIG_BYTES = 1 << 20
HEADER_BYTES = 16 << 20
# Bytes read per system call, each hashed at once while it is still in the CPU's cache.
READ_PIECE_BYTES = 1 << 20
WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT LoraConfig fields that, when set, change what the adapter computes at inference:
# activated LoRA (only from invocation tokens on), a bias in B, replicated layers, trained
# embedding rows, LoRA on raw parameters, and the routing or decomposition variants.
FORWARD_VARIANTS = (
    "alora_invocation_tokens", "lora_bias", "layer_replication", "trainable_token_indices", "target_parameters",
    "arrow_config", "kasa_config", "use_bdlora", "monteclora_config",
)
# init_lora_weights values (prefixes, any case) whose init rewrites the base weights (W less
# the initial s·B·A, or W quantized): peft redoes it on load, so an adapter saved without
# converting it is right only on that rewritten base, and Tandem serves the unchanged one.
BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq")
# What peft targets where target_modules is unset, for every architecture Tandem serves.
DEFAULT_TARGET_MODULES = ["q_proj", "v_proj"]
# Weights held in the host cache as the file has them; any other float dtype as float32.
HELD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The safetensors metadata entry of a weights file that records its trainer's init seed.
A_INIT_SEED_KEY = "tandem.lora_a_init_seed"

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
    # The seed the trainer drew its initial A from (lora_init.py), when it was trained here
    # from one: its A is that draw plus what training moved, and compresses as the move.
    a_init_seed: int | None = None
    # Its adapter_config.json as read with these weights: what a compress or merge writes
    # from (the file on disk may be a newer version than this one).
    config: dict = field(default_factory=dict)

    @functools.cached_property
    def nbytes(self) -> int:
        """Bytes its weights hold in host memory (packed ones for a compressed adapter).
        Worked out once: the cache sums it over every adapter it holds at each read."""
        return sum(t.nbytes for g in self.groups.values() for a, b, _ in g.slices.values() for t in (a, b))

    @functools.cached_property
    def float32_bytes(self) -> int:
        """Bytes its weights would take as float32 PEFT tensors."""
        return sum(4 * t.shape[0] * t.shape[1] for g in self.groups.values() for a, b, _ in g.slices.values() for t in (a, b))

    def pin_memory(self) -> "LoRAAdapter":
        """The adapter in page-locked host memory, so its copies to a CUDA slot can overlap compute."""
        groups = {
            key: GroupDelta({s: (a.pin_memory(), b.pin_memory(), scale) for s, (a, b, scale) in g.slices.items()}, g.rank)
            for key, g in self.groups.items()
        }
        return replace(self, groups=groups)


# Writable memory for n bytes: a host slab's block (host_slab.py), or new memory.
Buffer = Callable[[int], "bytearray | memoryview"]


def content_hash(path: Path) -> str:
    """sha256 over the config and the weights: a re-uploaded adapter gets a new identity."""
    return hashlib.sha256((path / CONFIG_FILE).read_bytes() + (path / WEIGHTS_FILE).read_bytes()).hexdigest()


def max_file_bytes(model: LlamaModel, rank: int) -> int:
    """The most bytes a weights file for this base model can hold at `rank`: an A [rank, in]
    and a B [out, rank] for every projection, in float64 (the widest dtype read), and a
    header; a router's gates ([experts, in] per linear) at rank = its experts fit too. A
    larger file is refused before any memory is taken for it: a sparse 100 GB file was read
    into memory, after emptying the host cache to make room."""
    per_rank = sum(len(outs) * in_features + sum(outs) for in_features, outs in linear_shapes(model).values())
    return 8 * rank * per_rank + HEADER_BYTES


def read_small(path: Path, max_bytes: int = MAX_CONFIG_BYTES) -> bytes:
    """A config file's bytes; OSError when it cannot be read or holds more than max_bytes."""
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise OSError(f"it holds more than {max_bytes:,} bytes: not a config file")
    return data


def read_hashed(path: Path, prefix: bytes, max_bytes: int, buffer: Buffer = bytearray) -> tuple[bytearray | memoryview, str]:
    """The file's bytes, in memory from buffer(its size), and sha256(prefix + those bytes)."""
    data, digest = read_hashing(path, prefix, max_bytes, buffer)
    return data, digest()


def read_hashing(
    path: Path, prefix: bytes, max_bytes: int, buffer: Buffer = bytearray
) -> tuple[bytearray | memoryview, Callable[[], str]]:
    """The file's bytes, in memory from buffer(its size), and a function that returns
    sha256(prefix + those bytes), hashed meanwhile on a thread of its own (hashlib lets go of
    the GIL): a caller parses and checks the bytes while they are hashed, and a read takes
    about its hash's time instead of the hash's plus the parse's (a 19.6 MB adapter: SHA-256
    ~14 ms, the rest ~9). The bytes are ours: a file overwritten later leaves them as read.
    OSError when the file cannot be read, is larger than max_bytes (max_file_bytes), or
    changes size while being read."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise OSError(f"it is {size:,} bytes, more than a file of its kind holds for this base model ({max_bytes:,})")
        data = buffer(size)
        view = memoryview(data)
        done = 0
        while done < size:
            got = f.readinto(view[done : done + READ_PIECE_BYTES])
            if not got:
                break
            done += got
        if done != size or f.read(1):
            raise OSError(f"{path} changed size while being read")
    h = hashlib.sha256(prefix)
    hashing = threading.Thread(target=h.update, args=(view,), name="tandem-sha256", daemon=True)
    hashing.start()

    def digest() -> str:
        hashing.join()
        return h.hexdigest()

    return data, digest


def read_adapter(
    name: str, path: Path, model: LlamaModel, max_rank: int, slot_dtype: torch.dtype = torch.float32,
    buffer: Buffer = bytearray,
) -> LoRAAdapter:
    """Load and validate a PEFT LoRA adapter; every refusal says exactly why, and where in
    which file, but never quotes the file's bytes. Its tensors are views of buffer(file size).

    Every weight must be finite and fit slot_dtype once scaled: one NaN would turn its
    requests' output into garbage, so it is refused here, before any request uses it."""
    if not (path / CONFIG_FILE).is_file():
        raise NotFound(f"adapter {name!r} not found: {path} has no {CONFIG_FILE}")
    if not (path / WEIGHTS_FILE).is_file():
        raise IncompatibleAdapter(f"adapter {name!r} has no {WEIGHTS_FILE} (only safetensors adapters are served)")
    config_bytes, config = read_config(name, path)
    weights_path = _own_file(name, path, WEIGHTS_FILE)
    # One read into memory we own: the hash is of exactly the bytes parsed, and the tensors
    # are views of them (a mapping of the file would change under a cached adapter if the
    # file were overwritten in place; a copy per tensor costs another pass of page faults).
    try:
        weights, digest = read_hashing(weights_path, config_bytes, max_file_bytes(model, max_rank), buffer)
    except OSError as exc:
        raise IncompatibleAdapter(f"adapter {name!r} has an unreadable {WEIGHTS_FILE}: {exc}") from exc
    # Checked while hashed; the hash is waited for even when a check fails, so that no
    # thread still reads the bytes once their memory goes back to the slab.
    try:
        adapter = adapter_of_bytes(name, path, config, weights, model, max_rank, slot_dtype)
    finally:
        content = digest()
    return replace(adapter, content_hash=content)


def adapter_of_bytes(
    name: str, path: Path, config: dict, weights: bytearray | memoryview, model: LlamaModel, max_rank: int,
    slot_dtype: torch.dtype = torch.float32,
) -> LoRAAdapter:
    """The adapter a weights file's bytes hold with its checked config (config_of_bytes'), its
    tensors views of them, refused as read_adapter refuses it; no content hash. A publish
    checks its files by it before they take the adapter's name."""
    try:
        parsed = _parse_safetensors(weights)
        seed = _a_init_seed(parsed.metadata)
    except ValueError as exc:
        raise IncompatibleAdapter(f"adapter {name!r} has a corrupt {WEIGHTS_FILE}: {exc}") from exc
    modules = pair_tensors(name, parsed.tensors)
    adapter = adapter_of_modules(name, path, config, modules, "", model, max_rank, slot_dtype, parsed.magnitude())
    return replace(adapter, a_init_seed=seed)


def read_config(name: str, path: Path) -> tuple[bytes, dict]:
    """An adapter's adapter_config.json, as bytes and checked (IncompatibleAdapter otherwise)."""
    try:
        config_bytes = read_small(_own_file(name, path, CONFIG_FILE))
    except OSError as exc:
        raise IncompatibleAdapter(f"adapter {name!r} has an unreadable {CONFIG_FILE}: {exc}") from exc
    return config_bytes, config_of_bytes(name, config_bytes)


def config_of_bytes(name: str, data: bytes) -> dict:
    """An adapter_config.json's bytes as a config, checked (IncompatibleAdapter otherwise)."""
    try:
        config = _json_object(data)
    except ValueError as exc:
        raise IncompatibleAdapter(f"adapter {name!r} has an unreadable {CONFIG_FILE}: {exc}") from exc
    _check_config(name, config)
    return config


def adapter_of_modules(
    name: str, path: Path, config: dict, modules: dict[str, tuple[torch.Tensor, torch.Tensor]], digest: str,
    model: LlamaModel, max_rank: int, slot_dtype: torch.dtype, magnitude: float | None = None,
) -> LoRAAdapter:
    """The adapter of PEFT module path -> (A, B), checked against the base model and the config.
    magnitude: the largest |value| of every A and B, when one pass over the file found it
    (NaN if any is NaN): a module's own pass is needed only where that bound, scaled, could
    overflow slot_dtype or is not finite (then it finds the module to name)."""
    check_targeted(name, config, modules)
    alphas, ranks = _patterns(config, "alpha_pattern"), _patterns(config, "rank_pattern")
    # Looked up once per read, not per module (an adapter has ~200 modules).
    shapes, num_layers, limit = linear_shapes(model), len(model.layers), torch.finfo(slot_dtype).max
    scale_of = _scales(name, config, alphas)
    per_group: dict[tuple[int, str], dict[int, tuple[torch.Tensor, torch.Tensor, float]]] = {}
    targets = set()
    for module, (a, b) in modules.items():
        layer, kind = _locate(name, module, num_layers)
        group, slice_idx = TARGET_SLICES[kind]
        want_in, out_slices = shapes[(layer, group)]
        want_out = out_slices[slice_idx]
        a_shape, b_shape = tuple(a.shape), tuple(b.shape)
        if len(a_shape) != 2 or len(b_shape) != 2 or b_shape[1] != a_shape[0] or a_shape[1] != want_in or b_shape[0] != want_out:
            raise IncompatibleAdapter(
                f"adapter {name!r} does not fit the base model: {module} has A {a_shape} and B {b_shape}, "
                f"the base layer needs A [r, {want_in}] and B [{want_out}, r]"
            )
        r = a_shape[0]
        if r == 0:
            raise IncompatibleAdapter(f"adapter {name!r} has rank 0 on {module}; a LoRA rank is at least 1")
        stated = next((value for pattern, value in ranks if pattern.match(module)), config["r"])
        if r != stated:
            raise IncompatibleAdapter(
                f"adapter {name!r} has rank {r} on {module}, where its config says {stated} (r, or rank_pattern): "
                "its scale alpha/r would not be the one it was trained with, and peft refuses the file too"
            )
        if r > max_rank:
            raise IncompatibleAdapter(
                f"adapter {name!r} has rank {r} on {module}, the server's maximum is {max_rank} (--max-lora-rank)"
            )
        scale = scale_of(module, r)
        if not (magnitude is not None and magnitude * max(1.0, abs(scale)) <= limit):
            _check_finite(name, module, a, b, scale, slot_dtype, limit)
        per_group.setdefault((layer, group), {})[slice_idx] = (a, b, scale)
        targets.add(kind)
    groups = {key: GroupDelta(slices, max(a.shape[0] for a, _, _ in slices.values())) for key, slices in per_group.items()}
    return LoRAAdapter(
        name=name,
        path=path,
        content_hash=digest,
        rank=max(g.rank for g in groups.values()),
        targets=sorted(targets, key=list(TARGET_SLICES).index),
        groups=groups,
        config=config,
    )


def _own_file(name: str, directory: Path, file: str) -> Path:
    """The real path of directory/file; refused when a symlink leads out of the adapter's
    directory, so that an adapter folder cannot make the server read other files."""
    real = (directory / file).resolve()
    if not real.is_relative_to(directory.resolve()):
        raise IncompatibleAdapter(f"adapter {name!r} has a {file} that links outside its directory")
    return real


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class _TensorEntry(NamedTuple):
    """One tensor of a safetensors header: its bytes are data[begin:end] of the data section."""

    key: str
    dtype: torch.dtype
    shape: list[int]
    begin: int
    end: int


@dataclass(frozen=True)
class _Safetensors:
    """A safetensors file held in memory: its tensors (views of the bytes), its header's
    __metadata__ ({} without one), and its data section."""

    tensors: dict[str, torch.Tensor]
    metadata: dict
    # The data section in its tensors' dtype, when they share one (they tile the section).
    section: torch.Tensor | None

    def magnitude(self) -> float | None:
        """The largest |value| of every tensor, NaN if one holds a NaN, in one pass over the
        section; None when the tensors have several dtypes."""
        return None if self.section is None else _magnitude(self.section)


def _parse_safetensors(data: bytearray | memoryview) -> _Safetensors:
    """A safetensors file held in data, its tensors as views of it: an 8-byte little-endian
    header length, a JSON header {name: {dtype, shape, data_offsets}}, then the data. Raises
    ValueError saying what is wrong and where."""
    if len(data) < 8:
        raise ValueError(f"the file has {len(data)} bytes, fewer than a header")
    header_len = int.from_bytes(data[:8], "little")
    if 8 + header_len > len(data):
        raise ValueError(f"its header length points past the end of the file ({len(data)} bytes)")
    try:
        header = _json_object(bytes(data[8 : 8 + header_len]))
    except ValueError as exc:
        raise ValueError(f"its header: {exc}") from exc
    base = 8 + header_len
    entries = [_tensor_entry(key, info) for key, info in header.items() if key != "__metadata__"]
    _check_layout(entries, len(data) - base)
    metadata = header.get("__metadata__")
    dtypes = {e.dtype for e in entries}
    section = None
    if len(dtypes) <= 1:
        dtype = dtypes.pop() if dtypes else torch.float32
        count = (len(data) - base) // dtype.itemsize
        section = torch.frombuffer(data, dtype=dtype, count=count, offset=base) if count else torch.empty(0, dtype=dtype)
    return _Safetensors(
        {e.key: _view(data, base, e, section) for e in entries}, metadata if isinstance(metadata, dict) else {}, section
    )


def _a_init_seed(metadata: dict) -> int | None:
    """The trainer's init seed a weights file records in its safetensors metadata, or None.
    PEFT ignores the entry."""
    seed = metadata.get(A_INIT_SEED_KEY)
    if seed is None:
        return None
    if not (isinstance(seed, str) and seed.isdigit() and int(seed) < 1 << 63):
        raise ValueError(f"its metadata's {A_INIT_SEED_KEY} {excerpt(seed)} is not a non-negative 64-bit integer")
    return int(seed)


def _tensor_entry(key: str, info: object) -> _TensorEntry:
    if not isinstance(info, dict):
        raise ValueError(f"tensor {excerpt(key)} is described by {_json_type(info)}, not an object")
    dtype_name = info.get("dtype")
    dtype = _SAFETENSORS_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise ValueError(f"tensor {excerpt(key)} has dtype {_shown(dtype_name)}; adapters must be F32, F16, BF16 or F64")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (_is_size_list(shape) and _is_size_list(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
        raise ValueError(f"tensor {excerpt(key)} needs a shape and data_offsets [begin, end] of non-negative integers")
    if len(shape) > MAX_DIMENSIONS:
        raise ValueError(f"tensor {excerpt(key)} has {len(shape)} dimensions; an adapter's tensors have at most {MAX_DIMENSIONS}")
    if any(d >= MAX_DIMENSION for d in shape):
        raise ValueError(f"tensor {excerpt(key)} has a dimension of {max(shape)}, more than any adapter has")
    if math.prod(max(d, 1) for d in shape) >= 1 << 62:  # an empty tensor's strides must still fit torch's int64
        raise ValueError(f"tensor {excerpt(key)} has a shape {shape} past any adapter's")
    begin, end = offsets
    if end - begin != math.prod(shape) * dtype.itemsize:
        needed = math.prod(shape) * dtype.itemsize  # sizes from the file: any length, so quoted cut
        raise ValueError(f"tensor {excerpt(key)} has {excerpt(end - begin)} bytes, its shape {excerpt(shape)} needs {excerpt(needed)}")
    return _TensorEntry(key, dtype, shape, begin, end)


def _is_size_list(value: object) -> bool:
    # type() is int: a JSON true is a bool, which isinstance(d, int) lets through.
    return type(value) is list and all(type(d) is int and d >= 0 for d in value)


def _check_layout(entries: list[_TensorEntry], data_bytes: int) -> None:
    """The format's rule: the tensors tile the data section, each at an offset aligned to its
    dtype. An overlap, or bytes no tensor owns, would let one file read as two different ones."""
    position = 0
    for e in sorted(entries, key=lambda e: (e.begin, e.end)):
        if e.begin < position:
            raise ValueError(f"tensor {excerpt(e.key)} overlaps the tensor before it in the data section")
        if e.begin > position:
            raise ValueError(f"the data section has {e.begin - position} bytes that no tensor owns before tensor {excerpt(e.key)}")
        if e.begin % e.dtype.itemsize:
            raise ValueError(
                f"tensor {excerpt(e.key)} starts at byte {e.begin} of the data section, not a multiple of its dtype's {e.dtype.itemsize} bytes"
            )
        position = e.end
    if position != data_bytes:
        raise ValueError(f"the data section has {data_bytes - position} bytes after its last tensor")


def _view(data: bytearray | memoryview, base: int, e: _TensorEntry, section: torch.Tensor | None) -> torch.Tensor:
    """The tensor as a view of data: of the section in one call where it has the tensor's
    dtype (_check_layout has put the tensor inside it, aligned), else of the bytes."""
    if section is not None:
        strides, size = [], 1
        for d in reversed(e.shape):
            strides.append(size)
            size *= d
        return section.as_strided(e.shape, strides[::-1], e.begin // e.dtype.itemsize)
    count = math.prod(e.shape)
    flat = torch.frombuffer(data, dtype=e.dtype, count=count, offset=base + e.begin) if count else torch.empty(0, dtype=e.dtype)
    return flat.view(e.shape)


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}


def _json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), "null")


def _shown(value: object) -> str:
    """A file's value as an error message may show it: short names and numbers as written,
    anything else only by its JSON type (messages must not carry a file's contents)."""
    plain = isinstance(value, (str, int, float)) or (isinstance(value, list) and all(isinstance(v, (str, int)) for v in value))
    text = repr(value) if plain else ""
    return text if 0 < len(text) <= 64 else _json_type(value)


def _json_object(data: bytes) -> dict:
    """The JSON object in data. Errors say where the text is malformed, never what it holds."""
    try:
        value = json.loads(data)
    except json.JSONDecodeError as exc:
        raise ValueError(f"it is not valid JSON (line {exc.lineno}, column {exc.colno})") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"it is not UTF-8 text (byte {exc.start})") from exc
    except (ValueError, RecursionError) as exc:
        raise ValueError("it holds a number too long or nesting too deep to read") from exc
    if not isinstance(value, dict):
        raise ValueError(f"it holds {_json_type(value)}, not a JSON object")
    return value


def _check_config(name: str, config: dict) -> None:
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        kind = peft_type if isinstance(peft_type, str) and len(peft_type) <= 64 else f"non-LoRA ({_json_type(peft_type)})"
        raise IncompatibleAdapter(f"adapter {name!r} is a {kind} adapter; only LoRA is served")
    if config.get("use_dora"):
        raise IncompatibleAdapter(f"adapter {name!r} uses DoRA, which Tandem does not serve")
    variants = [field for field in FORWARD_VARIANTS if config.get(field)]
    if variants:
        raise IncompatibleAdapter(
            f"adapter {name!r} sets {', '.join(variants)}, a LoRA variant whose forward pass differs from plain LoRA's: "
            "Tandem serves plain LoRA (with rsLoRA and rank or alpha patterns)"
        )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        raise IncompatibleAdapter(
            f"adapter {name!r} was initialised with init_lora_weights {_shown(init)}, which rewrites the base weights it "
            "trains against, and Tandem serves the unchanged base: save it from peft with "
            "path_initial_model_for_weight_conversion, which turns it into a plain LoRA"
        )
    if config.get("modules_to_save"):
        raise IncompatibleAdapter(
            f"adapter {name!r} has modules_to_save {_shown(config['modules_to_save'])}: full-weight modules are not served"
        )
    if config.get("bias", "none") != "none":
        raise IncompatibleAdapter(f"adapter {name!r} trains biases (bias={_shown(config['bias'])}), which Tandem does not serve")
    if config.get("r") is None or "lora_alpha" not in config:
        raise IncompatibleAdapter(f"adapter {name!r} has no r or lora_alpha in {CONFIG_FILE}")
    if not _is_rank(config["r"]):
        raise IncompatibleAdapter(f"adapter {name!r} has r {_shown(config['r'])}; a LoRA rank is an integer of at least 1")
    _check_patterns(name, config)


def _is_rank(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_names(value: object) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


def _check_patterns(name: str, config: dict) -> None:
    """PEFT's regexes (alpha_pattern and rank_pattern keys, a string target_modules or
    exclude_modules, layers_pattern) must be simple (server/adapters/patterns.py): a
    pathological one would hold the GIL for hours."""
    patterns = []
    for field in ("alpha_pattern", "rank_pattern"):
        given = config.get(field) or {}
        if not isinstance(given, dict) or len(given) > MAX_PATTERN_KEYS:
            raise IncompatibleAdapter(
                f"adapter {name!r} has {field} {_shown(given)}; it must be an object of at most {MAX_PATTERN_KEYS} pattern keys"
            )
        patterns += [(f"{field} key", key) for key in given]
    bad_ranks = [key for key, r in (config.get("rank_pattern") or {}).items() if not _is_rank(r)]
    if bad_ranks:
        raise IncompatibleAdapter(
            f"adapter {name!r} has rank_pattern key {_shown(bad_ranks[0])} with a rank that is not an integer of at least 1"
        )
    for field in ("target_modules", "exclude_modules", "layers_pattern"):
        value = config.get(field)
        if value is not None and not _is_names(value):
            raise IncompatibleAdapter(f"adapter {name!r} has {field} {_shown(value)}; it must be a string (a regex) or a list of names")
        if field == "layers_pattern" and isinstance(value, list):
            patterns += [(field, p) for p in value]
        elif isinstance(value, str):
            patterns.append((field, value))
    layers = config.get("layers_to_transform")
    if layers is not None and not (_is_index(layers) or (isinstance(layers, list) and all(_is_index(i) for i in layers))):
        raise IncompatibleAdapter(f"adapter {name!r} has layers_to_transform {_shown(layers)}; it must be a layer index or a list of them")
    cost = 0
    for field, pattern in patterns:
        try:
            cost += pattern_cost(pattern)
        except NotSimple as exc:
            raise IncompatibleAdapter(f"adapter {name!r} has {field} {_shown(pattern)}, which {exc}") from exc
    if cost > MAX_ADAPTER_COST:
        raise IncompatibleAdapter(
            f"adapter {name!r} has patterns that could backtrack {cost} ways on a module name together, more than "
            f"{MAX_ADAPTER_COST} (server/adapters/patterns.py): use fewer quantifiers"
        )


def pair_tensors(name: str, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT tensor key -> tensor, paired per module path as (A, B); refused when unpaired or unexpected."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.fullmatch(key)
        # The substring test first: the regex backtracks, and an adapter has ~400 keys.
        embedding = _EMBEDDING_KEY.fullmatch(key) if "embed_tokens" in key or "lm_head" in key else None
        if embedding is not None:
            module = embedding["module"]
            raise IncompatibleAdapter(f"adapter {name!r} adapts {excerpt(module)}: LoRA on embeddings or lm_head is not served")
        if m is None:
            raise IncompatibleAdapter(f"adapter {name!r} has an unexpected tensor {excerpt(key)}: only LoRA A/B weights are served")
        # Half precision stays as it is, a view of the buffer read: a float32 copy was new
        # memory twice the file's, beside the slab block the file was read into.
        held = tensor if getattr(tensor, "dtype", None) in HELD_DTYPES else tensor.float()  # (a compressed one's is its own)
        found.setdefault(m["module"], {})[m["ab"]] = held
    if not found:
        raise IncompatibleAdapter(f"adapter {name!r} has no LoRA weights")
    pairs = {}
    for module, ab in found.items():
        if set(ab) != {"A", "B"}:
            raise IncompatibleAdapter(f"adapter {name!r} has lora_A without lora_B (or the reverse) for {excerpt(module)}")
        pairs[module] = (ab["A"], ab["B"])
    return pairs


def check_targeted(name: str, config: dict, modules: Iterable[str]) -> None:
    """Refuse weights for a module the config does not target: peft builds LoRA layers only
    where target_modules (without it, the model type's defaults), layers_to_transform and
    exclude_modules say, and ignores any other tensor of the file, so serving it would not be
    the adapter peft serves."""
    for module in modules:
        if not _targeted(config, module):
            fields = {f: config[f] for f in ("target_modules", "layers_to_transform", "exclude_modules") if config.get(f) is not None}
            raise IncompatibleAdapter(
                f"adapter {name!r} has weights for {excerpt(module)}, which its config does not target "
                f"({', '.join(f'{f} {_shown(v)}' for f, v in fields.items())}): peft would not load them"
            )


def _targeted(config: dict, module: str) -> bool:
    """peft's rule (check_target_module_exists and the exclusions): a string is a regex the
    whole module path must match; a list names a module by its whole path, or by its dotted
    suffix (as all-linear's names do), and only then does layers_to_transform (a non-empty
    one) apply: the first layer index in the path, after layers_pattern or any component."""
    if _names_module(config.get("exclude_modules"), module):
        return False
    targets = config.get("target_modules") or DEFAULT_TARGET_MODULES
    if isinstance(targets, str) and targets != "all-linear":
        return re.fullmatch(targets, module) is not None
    if targets != "all-linear":
        if module in targets:
            return True
        if not any(module.endswith(f".{t}") for t in targets):
            return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    patterns = config.get("layers_pattern")
    if not patterns:
        found = re.match(r".*?\.[^.]*\.(\d+)\.", module)
    else:
        patterns = [patterns] if isinstance(patterns, str) else patterns
        found = next((m for m in (re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", module) for p in patterns) if m), None)
    if found is None:
        return False
    digits = found.group(1)
    if len(digits) > 9:  # int() refuses thousands of digits: _locate refuses any layer past the model's, naming it
        return True
    index = int(digits)
    return index == layers if isinstance(layers, int) else index in layers


def _names_module(names: str | list | None, module: str) -> bool:
    if not names:
        return False
    if isinstance(names, str):
        return re.fullmatch(names, module) is not None
    return module in names or any(module.endswith(f".{n}") for n in names)


def _locate(name: str, module: str, num_layers: int) -> tuple[int, str]:
    m = _LAYER_MODULE.fullmatch(module)
    if m is None or m["name"] not in TARGET_SLICES:
        raise IncompatibleAdapter(
            f"adapter {name!r} targets {excerpt(module)}, which is not one of the projections {', '.join(TARGET_SLICES)}"
        )
    digits = m["layer"]
    # int() refuses thousands of digits (and is slow on them): no model has a billion layers.
    layer = int(digits) if len(digits) <= 9 else num_layers
    if layer >= num_layers:
        shown = digits if len(digits) <= 9 else f"index of {len(digits)} digits"
        raise IncompatibleAdapter(f"adapter {name!r} targets layer {shown}; the base model has {num_layers} layers")
    # One spelling per module ("layers.07", or q_proj under mlp, named one already named, and
    # the last read replaced the other's weights in silence).
    if module != module_path(layer, m["name"]):
        raise IncompatibleAdapter(
            f"adapter {name!r} targets {excerpt(module)}, which is no module of the base model: did you mean "
            f"{module_path(layer, m['name'])}?"
        )
    return layer, m["name"]


def _patterns(config: dict, field: str) -> list[tuple[re.Pattern, object]]:
    """alpha_pattern or rank_pattern compiled once per adapter, in PEFT's rule: a key matches
    a module name by its dotted suffix, and the first key that matches wins."""
    return [(re.compile(rf"(.*\.)?({key})$"), value) for key, value in (config.get(field) or {}).items()]


def _scales(name: str, config: dict, alphas: list[tuple[re.Pattern, object]]) -> Callable[[str, int], float]:
    """(module, rank) -> its B scale; without alpha_pattern the scale depends on the rank
    alone and is worked out once per rank, not once per module."""
    if alphas:
        return lambda module, r: _scale(name, config, alphas, module, r)
    per_rank: dict[int, float] = {}

    def scale(module: str, r: int) -> float:
        if r not in per_rank:
            per_rank[r] = _scale(name, config, alphas, module, r)
        return per_rank[r]

    return scale


def _scale(name: str, config: dict, alphas: list[tuple[re.Pattern, object]], module: str, r: int) -> float:
    alpha = next((value for pattern, value in alphas if pattern.match(module)), config["lora_alpha"])
    if not _is_finite_number(alpha):
        raise IncompatibleAdapter(f"adapter {name!r} has lora_alpha {_shown(alpha)} for {module}; it must be a finite number")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _is_finite_number(value: object) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # a JSON integer past float's range
        return False


def _check_finite(
    name: str, module: str, a: torch.Tensor, b: torch.Tensor, scale: float, slot_dtype: torch.dtype, limit: float
) -> None:
    """Refuse NaN/inf weights, and weights that overflow slot_dtype (whose largest value is
    limit) as a slot holds them (B scaled)."""
    a_max, b_max = _magnitude(a), _magnitude(b)
    for label, magnitude in (("lora_A", a_max), ("lora_B", b_max)):
        if not math.isfinite(magnitude):
            raise IncompatibleAdapter(f"adapter {name!r} has NaN or infinite values in {module}.{label}")
    largest = max(a_max, b_max * abs(scale))
    if not largest <= limit:
        raise IncompatibleAdapter(
            f"adapter {name!r} overflows {str(slot_dtype).removeprefix('torch.')} in {module}: "
            f"its largest scaled weight is {largest:.3g}, the limit {limit:.3g}"
        )


def _magnitude(t: torch.Tensor) -> float:
    """The largest |value| of t, NaN when t holds one, in one pass that writes nothing: a
    temporary the size of the adapter (t.abs(), isfinite(t)) is new memory, faulted in
    page by page on every read. A compressed tensor (compeft_format) states its bound."""
    if not isinstance(t, torch.Tensor):
        return t.magnitude()
    if not t.numel():
        return 0.0
    lo, hi = (float(v) for v in torch.aminmax(t))
    return math.nan if math.isnan(lo) or math.isnan(hi) else max(-lo, hi)


def peft_config(
    r: int, lora_alpha: float, target_modules: list[str], use_rslora: bool, lora_dropout: float, base_model: str
) -> dict:
    """adapter_config.json of a LoRA adapter trained here, as peft writes it for a causal LM."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": lora_alpha,
        "target_modules": target_modules,
        "use_rslora": use_rslora,
        "lora_dropout": lora_dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
    }


def adapter_files(config: dict, tensors: dict[str, torch.Tensor], a_init_seed: int | None = None) -> dict[str, bytes]:
    """The two files of a PEFT adapter, as bytes: what write_adapter and checkpoints store;
    a_init_seed (LoRAAdapter's) goes into the weights file's safetensors metadata."""
    metadata = {"format": "pt"} | ({} if a_init_seed is None else {A_INIT_SEED_KEY: str(a_init_seed)})
    weights = safetensors_bytes({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}, metadata)
    return {CONFIG_FILE: json.dumps(config, indent=2).encode(), WEIGHTS_FILE: weights}


def write_adapter(directory: Path, config: dict, tensors: dict[str, torch.Tensor], a_init_seed: int | None = None) -> None:
    """Write a PEFT adapter atomically: readers see the old version or the new, never a mix."""
    write_directory(directory, adapter_files(config, tensors, a_init_seed))
