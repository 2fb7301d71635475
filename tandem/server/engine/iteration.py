"""The named types one engine iteration passes along: scheduler -> model runner -> engine.

An iteration carries up to three kinds of work in one ragged batch, in this row order:
decode tokens, prefill chunks, then training sequences. Inference rows sample tokens;
training rows return a loss whose gradient flows into the trained adapters' weights.
"""

from collections.abc import Mapping, Sequence as Seq
from dataclasses import dataclass, field

import torch

from tandem.kernels.lora import LoRAWeights
from tandem.server.engine.sequence import Sequence
from tandem.server.model.kept_activations import KeptActivations, KeptGraph
from tandem.server.model.routing import RoutedRows

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
    routing: when a router's gates train (server/finetune/trainable_gates.py), its rows (the
        sequences' rows in order, from 0) over the experts in weights; then only it trains.
    """

    sequences: list[TrainingSequence]
    weights: Mapping[tuple[int, str], LoRAWeights]
    dropout: float = 0.0
    generator: torch.Generator | None = None
    routing: RoutedRows | None = None

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.sequences)


@dataclass(frozen=True)
class TrainingChunk:
    """Tokens [start, start + num_tokens) of a co-served training sequence, forwarded like a
    prefill chunk through the paged cache (block_table holds blocks only training uses).

    input_row: where the chunk's first token sits in its micro-batch's kept activations."""

    seq: TrainingSequence
    start: int
    num_tokens: int
    block_table: list[int]
    input_row: int


@dataclass
class TrainingForward:
    """Forward chunks of co-served training sequences, in the same forward as inference and
    without a graph: each layer's input and each frozen linear's output for the chunks' rows
    go into the micro-batch's kept activations, from which the head and the backward slices
    start."""

    chunks: list[TrainingChunk]
    weights: Mapping[tuple[int, str], LoRAWeights]
    kept: KeptActivations

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


@dataclass
class TrainingGraph:
    """A co-served micro-batch's whole forward, in an iteration with no inference: with
    autograd, each layer's graph kept for its backward slices (KeptGraph), and the same
    activations kept as a forward chunk keeps (for a slice over some of a layer's sequences,
    which replays)."""

    sequences: list[TrainingSequence]
    weights: Mapping[tuple[int, str], LoRAWeights]
    kept: KeptActivations

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.sequences)


# A head block's rows, where a deadline stops the head between blocks: on SmolLM2 (2-core
# EPYC, bf16) a row is ~0.3 ms of lm_head GEMM and its dX, so a block ~20 ms, a layer's worth.
HEAD_BLOCK_ROWS = 64


@dataclass
class TrainingHead:
    """Where a co-served micro-batch's backward starts, for its rows [start, stop): final norm,
    lm_head and loss_scale * summed cross-entropy from the stored top-layer output, back to
    that output. A row's loss and gradient depend on that row only, so the head (as costly as
    several layers: a vocabulary-wide GEMM and its dX) splits over iterations by rows.
    deadline: a time.perf_counter() instant, or None. With one, rows [start, stop) are the
    most it runs, in blocks of HEAD_BLOCK_ROWS: it stops before a block that the time of the
    one before says would end past the deadline; BackwardResult.grad's rows say how far it
    got. The first block always runs, unless block_seconds (what a block is expected to take)
    says it would end past the deadline too: a head that fills what a forward chunk left of
    its iteration may run no row at all."""

    sequences: list[TrainingSequence]
    output: torch.Tensor
    start: int
    stop: int
    loss_scale: float
    deadline: float | None = None
    block_seconds: float | None = None

    @property
    def num_tokens(self) -> int:
        return self.stop - self.start


@dataclass
class TrainingBackward:
    """Backward through layers [first, last] (top down, last first) of a co-served micro-batch:
    each layer's graph is rebuilt from its kept input, replaying its frozen linears' kept
    outputs, then backpropagated; or, with graph, the graph its forward kept is.

    grad: the gradient at the output of layer `last` (from the head, for the top layer).
    deadline: a time.perf_counter() instant, or None. With one, layers first..last are the
    most the slice runs: it stops before a layer that the time of the one before says would
    end past the deadline (layer `last` always runs, unless first_seconds, what it is expected
    to take, says it would end past the deadline too: then BackwardResult.first is last + 1);
    BackwardResult.first says where."""

    sequences: list[TrainingSequence]
    weights: Mapping[tuple[int, str], LoRAWeights]
    kept: KeptActivations
    first: int
    last: int
    grad: torch.Tensor
    deadline: float | None = None
    graph: KeptGraph | None = None
    first_seconds: float | None = None

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.sequences)


@dataclass(frozen=True)
class BackwardResult:
    """What a head or backward slice leaves: the gradient at its input (the head's rows of the
    top-layer output, or the first layer's input), and for the head the summed token loss
    and target count of its rows; for a slice, the lowest layer it backpropagated."""

    grad: torch.Tensor
    loss_sum: float | None
    num_targets: int
    first: int | None = None


@dataclass
class SchedulerOutput:
    """The work of one iteration. decodes: one token each, that samples; prefills: prompt
    chunks (one token long too, where the budget or the free blocks cut it); training:
    whole sequences trained in their own iteration (time-sliced fine-tuning); train_forward /
    train_head / train_backward: co-served fine-tuning work that shares the iteration with
    inference; train_graph: a co-served micro-batch's whole forward, with no inference.
    block_copies: (source, destination) KV blocks to copy before the forward: a completion
    forking from its group's first sequence takes the shared prompt's keys and values."""

    decodes: list[ScheduledChunk] = field(default_factory=list)
    prefills: list[ScheduledChunk] = field(default_factory=list)
    training: TrainingWork | None = None
    train_forward: TrainingForward | None = None
    train_head: TrainingHead | None = None
    train_backward: TrainingBackward | None = None
    train_graph: TrainingGraph | None = None
    block_copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def inference(self) -> list[ScheduledChunk]:
        """The inference chunks in batch row order."""
        return self.decodes + self.prefills

    @property
    def num_tokens(self) -> int:
        """Tokens that run the forward pass in this iteration's batch."""
        train = sum(w.num_tokens for w in (self.training, self.train_forward) if w is not None)
        return sum(c.num_tokens for c in self.inference) + train

    def drop_coserved(self) -> None:
        """Forget the co-served work planned: its micro-batch was dropped."""
        self.train_forward = self.train_head = self.train_backward = self.train_graph = None

    def __bool__(self) -> bool:
        training = (self.training, self.train_forward, self.train_head, self.train_backward, self.train_graph)
        return bool(self.decodes or self.prefills or any(w is not None for w in training))


@dataclass
class ModelRunnerOutput:
    """What one forward produced.

    sampled: the sequences that sample a token this iteration, in logits row order.
    logits: [len(sampled), vocab] float32.
    train_loss: the summed cross-entropy over every target token of the training rows, with
        its graph (None when the iteration trains nothing); train_targets counts those tokens.
    prompt_rows: (sequence, count) for sequences that asked for prompt log-probabilities:
        prompt_logits [sum of counts, vocab] holds, in that order, the logits of each one's next
        `count` prompt positions (each predicting the prompt token after it).
    """

    sampled: list[Sequence]
    logits: torch.Tensor
    train_loss: torch.Tensor | None = None
    train_targets: int = 0
    prompt_rows: list[tuple[Sequence, int]] = field(default_factory=list)
    prompt_logits: torch.Tensor | None = None


@dataclass(frozen=True)
class TrainingResult:
    """What one training forward/backward did: the summed token loss (a float, the graph is
    gone), how many target tokens it covers, and how many tokens ran."""

    loss_sum: float
    num_targets: int
    num_tokens: int
