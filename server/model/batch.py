"""The data that crosses from the model runner into the model for one forward pass."""

from dataclasses import dataclass

import torch

from kernels.lora import LoRABatch


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
class AttentionMetadata:
    """How the ragged batch maps onto the paged KV cache.

    The batch holds decode tokens first (one per sequence), then prefill chunks.
    slot_mapping: [T] flat KV slot each token's key/value is written to.
    decode_slots: [Nd, Lmax] flat KV slots of each decode sequence's context, padded.
    decode_mask: [Nd, 1, 1, Lmax] bool, False on padding.
    """

    slot_mapping: torch.Tensor
    num_decodes: int
    decode_slots: torch.Tensor | None
    decode_mask: torch.Tensor | None
    prefills: list[PrefillChunk]


@dataclass
class ForwardBatch:
    """A flattened, unpadded batch of tokens from many sequences.

    input_ids, positions: [T].
    kv_caches: per layer a (key, value) pair, each [num_slots, num_kv_heads, head_dim].
    logits_indices: [N] rows whose next-token logits are needed (last token of a sequence).
    lora: each token's adapter slot, grouped for the LoRA kernels; None when no token has one.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionMetadata
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    logits_indices: torch.Tensor
    lora: LoRABatch | None = None
