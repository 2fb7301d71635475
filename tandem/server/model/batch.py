"""The data that crosses from the model runner into the model for one forward pass."""

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from tandem.kernels.lora import LoRABatch, LoRAWeights
from tandem.server.model.kept_activations import KeptActivations
from tandem.server.model.mixed_rows import MixedRows
from tandem.server.model.routing import RoutedRows


@dataclass
class PrefillChunk:
    """One sequence's run of new tokens that attends to its cached context plus itself.

    start, end: the chunk's rows in the flattened batch.
    context_slots: [L] flat KV slots of every token the chunk attends to (cached + new).
    mask: [n, L] bool, True where query i may attend key j (causal, offset by the cache).
    """

    start: int
    end: int
    context_slots: torch.Tensor
    mask: torch.Tensor


@dataclass
class FreshChunk:
    """A whole sequence that attends causally to its own rows only, never to the KV cache,
    and writes nothing there: a training sequence, whose gradient the cache would cut.

    start, end: the sequence's rows in the flattened batch (positions 0 .. end - start - 1).
    mask: [n, n] bool, causal.
    """

    start: int
    end: int
    mask: torch.Tensor


@dataclass
class AttentionMetadata:
    """How the ragged batch maps onto the paged KV cache.

    The batch holds decode tokens first (one per sequence), then prefill chunks, then fresh
    chunks; the first len(slot_mapping) rows (decodes and prefills) use the cache.
    slot_mapping: [Tc] flat KV slot each cached row's key/value is written to.
    decode_slots: [Nd, Lmax] flat KV slots of each decode sequence's context, padded with
        the cache's null slot.
    decode_mask: [Nd, 1, 1, Lmax] bool, False on padding.
    decode_lens: [Nd] int32, each decode sequence's context length (its unpadded slots).
    """

    slot_mapping: torch.Tensor
    num_decodes: int
    decode_slots: torch.Tensor | None
    decode_mask: torch.Tensor | None
    prefills: list[PrefillChunk]
    fresh: list[FreshChunk]
    decode_lens: torch.Tensor | None = None

    @property
    def num_cached_rows(self) -> int:
        return self.slot_mapping.shape[0]


@dataclass(frozen=True)
class LoRARows:
    """Which rows of the batch get which adapter slot, and the slots' weights.

    tokens: the step's token -> slot grouping, built once and shared by every layer.
    weights: per (layer, group) of server/model/lora_targets.py, the stacked slot weights;
        a group absent here is not adapted by any slot.
    dropout: probability of zeroing an element of a linear's input before its LoRA shrink
        (training only; PEFT's lora_dropout), with generator the randomness it draws from.
    routing: the rows whose experts a router picks per linear (served only); their slot in
        tokens is -1.
    mixed: the step's fixed-weight pairs when it serves a per-request mixture (served only):
        plain tokens' and mixture tokens' pairs; mixture rows' slot in tokens is -1.
    """

    tokens: LoRABatch
    weights: Mapping[tuple[int, str], LoRAWeights]
    dropout: float = 0.0
    generator: torch.Generator | None = None
    routing: RoutedRows | None = None
    mixed: MixedRows | None = None


@dataclass
class ForwardBatch:
    """A flattened, unpadded batch of tokens from many sequences.

    input_ids, positions: [T].
    kv_caches: per layer a (key, value) pair, each [num_slots, num_kv_heads, head_dim].
    logits_indices: [N] rows whose next-token logits are needed (last token of a sequence).
    lora: the served adapters' rows (device slots, no autograd); None when no row has one.
    train_lora: the rows of adapters being trained, whose weights carry autograd; None when
        the batch trains nothing.
    kept: a co-served micro-batch's activations: kept from its rows by a forward chunk, or
        replayed by its backward slice; None otherwise.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionMetadata
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    logits_indices: torch.Tensor
    lora: LoRARows | None = None
    train_lora: LoRARows | None = None
    kept: KeptActivations | None = None
