"""A Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) over a ragged token batch.

Reads like the architecture: embed -> N x (RMSNorm, attention, RMSNorm, gated MLP) -> norm
-> lm_head. Every projection is a FusedLinear, so batched LoRA attaches without touching
this file. Numerics follow `transformers` (RMSNorm in float32, RoPE cos/sin cast to the
model dtype) so float32 logits match it to rounding.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tandem.kernels.linear_cross_entropy import linear_cross_entropy
from tandem.kernels.packed_linear import Prepacked
from tandem.kernels import fused_elementwise
from tandem.kernels.rms_norm import add_rms_norm, rms_norm
from tandem.server.model.attention import attention
from tandem.server.model.batch import ForwardBatch
from tandem.server.model.linear import FusedLinear


@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers the engine sizes its caches and batches by."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position: int


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + delta), x + delta): the residual add before this norm, fused where it can be."""
        return add_rms_norm(x, delta, self.weight, self.eps)


class Rotary(nn.Module):
    """Rotate-half RoPE from a precomputed cos/sin table indexed by position."""

    def __init__(self, inv_freq: torch.Tensor, scaling: float, max_position: int, dtype: torch.dtype):
        super().__init__()
        freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", (emb.cos() * scaling).to(dtype), persistent=False)
        self.register_buffer("sin", (emb.sin() * scaling).to(dtype), persistent=False)

    def table(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for each token, [T, 1, D]; looked up once per forward, used by every layer."""
        return self.cos.index_select(0, positions).unsqueeze(1), self.sin.index_select(0, positions).unsqueeze(1)

    @staticmethod
    def apply_qk(
        qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], num_heads: int, num_kv_heads: int, split: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotated q [T, H, D] and k [T, Hkv, D] of a fused qkv output, split its (q, k, v)."""
        cos, sin = rope
        if (fused := fused_elementwise.rope(qkv, cos, sin, num_heads, num_kv_heads)) is not None:
            return fused
        t, head_dim = qkv.shape[0], cos.shape[-1]
        return Rotary.apply(split[0].view(t, num_heads, head_dim), rope), Rotary.apply(split[1].view(t, num_kv_heads, head_dim), rope)

    @staticmethod
    def apply(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x: [T, heads, D]."""
        cos, sin = rope
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, layer_idx: int, shape: ModelShape, qkv: FusedLinear, o_proj: FusedLinear):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = shape.num_heads
        self.num_kv_heads = shape.num_kv_heads
        self.head_dim = shape.head_dim
        self.qkv = qkv
        self.o_proj = o_proj

    def forward(self, x: torch.Tensor, batch: ForwardBatch, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        qkv = self.qkv(x, batch)
        split = self.qkv.split(qkv)
        q, k = Rotary.apply_qk(qkv, rope, self.num_heads, self.num_kv_heads, split)
        v = split[2].view(x.shape[0], self.num_kv_heads, self.head_dim)
        k_cache, v_cache = batch.kv_caches[self.layer_idx]
        return self.o_proj(attention(q, k, v, k_cache, v_cache, batch.attn), batch)


class MLP(nn.Module):
    def __init__(self, gate_up: FusedLinear, down: FusedLinear):
        super().__init__()
        self.gate_up = gate_up
        self.down = down

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        gate_up = self.gate_up(x, batch)
        act = fused_elementwise.silu_mul(gate_up)
        if act is None:
            gate, up = self.gate_up.split(gate_up)
            act = F.silu(gate) * up
        return self.down(act, batch)


class DecoderLayer(nn.Module):
    def __init__(self, input_norm: RMSNorm, attn: Attention, post_norm: RMSNorm, mlp: MLP):
        super().__init__()
        self.input_norm = input_norm
        self.attn = attn
        self.post_norm = post_norm
        self.mlp = mlp

    def forward(self, x: torch.Tensor, batch: ForwardBatch, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h, x = self.post_norm.add(x, self.attn(self.input_norm(x), batch, rope))
        return x + self.mlp(h, batch)


class LlamaModel(nn.Module):
    def __init__(
        self, shape: ModelShape, embed: torch.Tensor, rotary: Rotary, layers: list[DecoderLayer], norm: RMSNorm, lm_head: torch.Tensor | None
    ):
        super().__init__()
        self.shape = shape
        self.rotary = rotary
        self.embed = nn.Parameter(embed, requires_grad=False)
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        # lm_head None means tied embeddings: the output projection is the embedding itself.
        self.lm_head = self.embed if lm_head is None else nn.Parameter(lm_head, requires_grad=False)
        self.lm_head_packed = Prepacked()

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm, for every token of the batch."""
        x = F.embedding(batch.input_ids, self.embed)
        rope = self.rotary.table(batch.positions)
        for layer in self.layers:
            x = layer(x, batch, rope)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> float32 logits [N, vocab]."""
        return self.lm_head_packed.linear(hidden, self.lm_head).float()

    def token_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The summed cross-entropy of hidden [N, hidden] against targets [N], float32,
        differentiable in hidden; the logits are never materialised whole."""
        packed, weight = self.lm_head_packed, self.lm_head
        return linear_cross_entropy(
            hidden, weight, targets, lambda h: packed.linear(h, weight), lambda g: packed.transposed_linear(g, weight)
        )

    def prepack(self, for_training: bool = False) -> None:
        """Reorder every frozen weight for oneDNN now (for_training: also the transposes that a
        backward multiplies by) rather than on first use, inside an iteration someone waits for."""
        for module in self.modules():
            if isinstance(module, FusedLinear):
                module.packed.prepare(module.weight, for_training)
        self.lm_head_packed.prepare(self.lm_head, for_training)
