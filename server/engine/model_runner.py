"""Run one scheduled iteration through the model: build the ragged batch, return logits and,
for training rows, their loss.

The runner has no policy: the scheduler decided who runs and how many tokens each computes.
A chunk of one token is a decode (batched into one attention call); longer chunks are
prefills (one attention call each); training sequences come last and attend to their own
rows only. Only rows that finish a sequence's known tokens get logits, since only those
sample; training rows get logits only where a label asks for them.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.lora import LoRABatch
from server.adapters.slot_pool import SlotPool
from server.engine.iteration import IGNORE_INDEX, ModelRunnerOutput, SchedulerOutput, TrainingWork
from server.engine.kv_cache import KVCache
from server.engine.sequence import Sequence
from server.model.batch import AttentionMetadata, ForwardBatch, FreshChunk, LoRARows, PrefillChunk
from server.model.llama import LlamaModel


@dataclass
class _TrainingRows:
    """Where the training rows' loss comes from: hidden rows [M] predict targets [M]."""

    rows: torch.Tensor
    targets: torch.Tensor


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, block_size: int, device: torch.device, pool: SlotPool | None = None):
        self.model = model
        self.pool = pool
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = device

    def execute(self, scheduled: SchedulerOutput) -> ModelRunnerOutput:
        """One forward. Run it under inference_mode unless scheduled.training is set; then
        train_loss carries the graph back to the trained weights."""
        batch, sampled, training = self.prepare(scheduled)
        hidden = self.model(batch)
        logits = self.model.compute_logits(hidden[batch.logits_indices])
        if training is None:
            return ModelRunnerOutput(sampled, logits)
        train_logits = self.model.compute_logits(hidden[training.rows])
        loss = F.cross_entropy(train_logits, training.targets, reduction="sum")
        return ModelRunnerOutput(sampled, logits, loss, int(training.targets.numel()))

    def prepare(self, scheduled: SchedulerOutput) -> tuple[ForwardBatch, list[Sequence], _TrainingRows | None]:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        adapter_slots: list[int] = []
        logits_rows: list[int] = []
        sampled: list[Sequence] = []
        bs = self.block_size
        for chunk in scheduled.inference:
            seq, n = chunk.seq, chunk.num_tokens
            start = seq.num_computed
            input_ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            slots.extend(seq.block_table[p // bs] * bs + p % bs for p in range(start, start + n))
            adapter_slots.extend([-1 if seq.slot is None else seq.slot] * n)
            if start + n == len(seq.token_ids):
                logits_rows.append(len(input_ids) - 1)
                sampled.append(seq)
        attn = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long).to(self.device),
            num_decodes=len(scheduled.decodes),
            decode_slots=None,
            decode_mask=None,
            prefills=[],
            fresh=[],
        )
        if scheduled.decodes:
            self._decode_context(scheduled.decodes, attn)
        row = len(scheduled.decodes)
        for chunk in scheduled.prefills:
            attn.prefills.append(self._prefill_chunk(chunk.seq, chunk.num_tokens, row))
            row += chunk.num_tokens
        work = scheduled.training
        training = None if work is None else self._add_training(work, input_ids, positions, attn)
        num_cached = len(adapter_slots)
        batch = ForwardBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.long).to(self.device),
            positions=torch.tensor(positions, dtype=torch.long).to(self.device),
            attn=attn,
            kv_caches=self.kv_cache.layers,
            logits_indices=torch.tensor(logits_rows, dtype=torch.long).to(self.device),
            lora=self._served_lora(adapter_slots + [-1] * (len(input_ids) - num_cached)),
            train_lora=None if work is None else self._trained_lora(work, num_cached),
        )
        return batch, sampled, training

    def _decode_context(self, decodes: list, attn: AttentionMetadata) -> None:
        lens = torch.tensor([c.seq.num_computed + 1 for c in decodes])
        width = int(lens.max())
        ctx = torch.arange(width)
        valid = ctx[None, :] < lens[:, None]
        # Padding reads the null slot (zeros), never a stale slot: under the mask a score
        # of -inf still turns a NaN value into NaN (0 * NaN), so stale data must not be read.
        context = self._context_slots([c.seq.block_table for c in decodes], ctx)
        attn.decode_slots = torch.where(valid, context, self.kv_cache.null_slot).to(self.device)
        attn.decode_mask = valid.view(len(decodes), 1, 1, width).to(self.device)

    def _prefill_chunk(self, seq: Sequence, n: int, row: int) -> PrefillChunk:
        total = seq.num_computed + n
        ctx = torch.arange(total)
        query_pos = torch.arange(seq.num_computed, total)
        return PrefillChunk(
            start=row,
            end=row + n,
            context_slots=self._context_slots([seq.block_table], ctx)[0].to(self.device),
            mask=(ctx[None, :] <= query_pos[:, None]).to(self.device),
        )

    def _add_training(
        self, work: TrainingWork, input_ids: list[int], positions: list[int], attn: AttentionMetadata
    ) -> _TrainingRows:
        """Append the training sequences' rows; each row predicts the next token's label."""
        rows: list[int] = []
        targets: list[int] = []
        for seq in work.sequences:
            start, n = len(input_ids), seq.num_tokens
            input_ids.extend(seq.input_ids)
            positions.extend(range(n))
            ctx = torch.arange(n)
            attn.fresh.append(FreshChunk(start, start + n, (ctx[None, :] <= ctx[:, None]).to(self.device)))
            for i in range(n - 1):
                if seq.labels[i + 1] != IGNORE_INDEX:
                    rows.append(start + i)
                    targets.append(seq.labels[i + 1])
        return _TrainingRows(
            torch.tensor(rows, dtype=torch.long).to(self.device), torch.tensor(targets, dtype=torch.long).to(self.device)
        )

    def _served_lora(self, adapter_slots: list[int]) -> LoRARows | None:
        if not adapter_slots or max(adapter_slots) < 0:
            return None
        return LoRARows(LoRABatch.build(adapter_slots, self.pool.num_slots, self.device), self.pool.weights)

    def _trained_lora(self, work: TrainingWork, num_cached: int) -> LoRARows:
        token_slots = [-1] * num_cached + [seq.slot for seq in work.sequences for _ in range(seq.num_tokens)]
        num_slots = next(iter(work.weights.values())).num_slots
        return LoRARows(LoRABatch.build(token_slots, num_slots, self.device), work.weights, work.dropout, work.generator)

    def _context_slots(self, tables: list[list[int]], ctx: torch.Tensor) -> torch.Tensor:
        """[len(tables), len(ctx)] flat slots of positions ctx in each table (0 past a table's end)."""
        width = max(len(t) for t in tables)
        padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
        block_idx = (ctx // self.block_size).clamp(max=width - 1)
        return padded[:, block_idx] * self.block_size + ctx % self.block_size
