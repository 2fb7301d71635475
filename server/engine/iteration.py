"""The named types one engine iteration passes along: scheduler -> model runner -> engine.

An iteration carries up to three kinds of work in one ragged batch, in this row order:
decode tokens, prefill chunks, then training sequences. Inference rows sample tokens;
training rows return a loss whose gradient flows into the trained adapters' weights.
"""

from collections.abc import Mapping, Sequence as Seq
from dataclasses import dataclass, field

import torch

from kernels.lora import LoRAWeights
from server.engine.sequence import Sequence

# A label that asks for no loss (Hugging Face's convention).
IGNORE_INDEX = -100


@dataclass(frozen=True)
class ScheduledChunk:
    """seq computes its next num_tokens uncomputed tokens this iteration."""

    seq: Sequence
    num_tokens: int


@dataclass(frozen=True)
class TrainingSequence:
    """A whole sequence to train on (its K/V live only inside the iteration).

    input_ids: [n] token ids. labels: [n], labels[i] = input_ids[i] where the loss applies to
    token i (predicted from the tokens before it), IGNORE_INDEX elsewhere.
    slot: the index of its adapter in TrainingWork.weights' stacked slots.
    """

    input_ids: Seq[int]
    labels: Seq[int]
    slot: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


@dataclass
class TrainingWork:
    """Training sequences for one iteration and the weights they train.

    weights: per (layer, group) the trained adapters stacked as slots, built from float32
        master weights with autograd (server/finetune); a group absent is not trained.
    dropout / generator: lora_dropout and the randomness it draws from (None = global).
    """

    sequences: list[TrainingSequence]
    weights: Mapping[tuple[int, str], LoRAWeights]
    dropout: float = 0.0
    generator: torch.Generator | None = None

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.sequences)


@dataclass
class SchedulerOutput:
    """The work of one iteration. decodes: one token each; prefills: longer chunks."""

    decodes: list[ScheduledChunk] = field(default_factory=list)
    prefills: list[ScheduledChunk] = field(default_factory=list)
    training: TrainingWork | None = None

    @property
    def inference(self) -> list[ScheduledChunk]:
        """The inference chunks in batch row order."""
        return self.decodes + self.prefills

    @property
    def num_tokens(self) -> int:
        train = 0 if self.training is None else self.training.num_tokens
        return sum(c.num_tokens for c in self.inference) + train

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills or self.training)


@dataclass
class ModelRunnerOutput:
    """What one forward produced.

    sampled: the sequences that sample a token this iteration, in logits row order.
    logits: [len(sampled), vocab] float32.
    train_loss: the summed cross-entropy over every target token of the training rows, with
        its graph (None when the iteration trains nothing); train_targets counts those tokens.
    """

    sampled: list[Sequence]
    logits: torch.Tensor
    train_loss: torch.Tensor | None = None
    train_targets: int = 0


@dataclass(frozen=True)
class TrainingResult:
    """What one training forward/backward did: the summed token loss (a float, the graph is
    gone), how many target tokens it covers, and how many tokens ran."""

    loss_sum: float
    num_targets: int
    num_tokens: int
