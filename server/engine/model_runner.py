"""Run one scheduled iteration through the model: build the ragged batch, return logits.

The runner has no policy: the scheduler decided who runs and how many tokens each computes.
A chunk of one token is a decode (batched into one attention call); longer chunks are
prefills (one attention call each). Only rows that finish a sequence's known tokens get
logits, since only those sample.
"""

import torch

from kernels.lora import LoRABatch
from server.adapters.slot_pool import SlotPool
from server.engine.kv_cache import KVCache
from server.engine.scheduler import ScheduledBatch
from server.engine.sequence import Sequence
from server.model.batch import AttentionMetadata, ForwardBatch, PrefillChunk
from server.model.llama import LlamaModel


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, block_size: int, device: torch.device, pool: SlotPool | None = None):
        self.model = model
        self.pool = pool
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = device

    def execute(self, scheduled: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor]:
        """Returns the sequences that sample this step and their float32 logits [N, vocab]."""
        batch, sampling = self.prepare(scheduled)
        hidden = self.model(batch)
        return sampling, self.model.compute_logits(hidden[batch.logits_indices])

    def prepare(self, scheduled: ScheduledBatch) -> tuple[ForwardBatch, list[Sequence]]:
        decodes = [(s, n) for s, n in scheduled.chunks if n == 1]
        prefills = [(s, n) for s, n in scheduled.chunks if n > 1]
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        adapter_slots: list[int] = []
        logits_rows: list[int] = []
        sampling: list[Sequence] = []
        bs = self.block_size
        for seq, n in decodes + prefills:
            start = seq.num_computed
            input_ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            slots.extend(seq.block_table[p // bs] * bs + p % bs for p in range(start, start + n))
            adapter_slots.extend([-1 if seq.slot is None else seq.slot] * n)
            if start + n == len(seq.token_ids):
                logits_rows.append(len(input_ids) - 1)
                sampling.append(seq)
        attn = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long).to(self.device),
            num_decodes=len(decodes),
            decode_slots=None,
            decode_mask=None,
            prefills=[],
        )
        if decodes:
            lens = torch.tensor([s.num_computed + 1 for s, _ in decodes])
            width = int(lens.max())
            ctx = torch.arange(width)
            valid = ctx[None, :] < lens[:, None]
            # Padding reads the null slot (zeros), never a stale slot: under the mask a score
            # of -inf still turns a NaN value into NaN (0 * NaN), so stale data must not be read.
            context = self._context_slots([s.block_table for s, _ in decodes], ctx)
            attn.decode_slots = torch.where(valid, context, self.kv_cache.null_slot).to(self.device)
            attn.decode_mask = valid.view(len(decodes), 1, 1, width).to(self.device)
        row = len(decodes)
        for seq, n in prefills:
            total = seq.num_computed + n
            ctx = torch.arange(total)
            query_pos = torch.arange(seq.num_computed, total)
            attn.prefills.append(
                PrefillChunk(
                    start=row,
                    end=row + n,
                    context_slots=self._context_slots([seq.block_table], ctx)[0].to(self.device),
                    mask=(ctx[None, :] <= query_pos[:, None]).to(self.device),
                )
            )
            row += n
        batch = ForwardBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.long).to(self.device),
            positions=torch.tensor(positions, dtype=torch.long).to(self.device),
            attn=attn,
            kv_caches=self.kv_cache.layers,
            logits_indices=torch.tensor(logits_rows, dtype=torch.long).to(self.device),
            lora=None if max(adapter_slots) < 0 else LoRABatch.build(adapter_slots, self.pool.num_slots, self.device),
        )
        return batch, sampling

    def _context_slots(self, tables: list[list[int]], ctx: torch.Tensor) -> torch.Tensor:
        """[len(tables), len(ctx)] flat slots of positions ctx in each table (0 past a table's end)."""
        width = max(len(t) for t in tables)
        padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
        block_idx = (ctx // self.block_size).clamp(max=width - 1)
        return padded[:, block_idx] * self.block_size + ctx % self.block_size

