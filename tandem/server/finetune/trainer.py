"""One job's optimisation: a fixed plan of steps, AdamW on the float32 masters, run through
the serving engine one micro-batch at a time.

The plan is a pure function of the examples and the hyperparameters (epochs in seeded
orders, packed greedily into steps of up to tokens_per_step tokens), so a job resumed from
the checkpoint after step k runs exactly the steps an uninterrupted job would. A step's
loss is the mean over all its target tokens (Hugging Face's), whatever its micro-batches:
each micro-batch's summed loss is scaled by 1 / (the step's target tokens).

`Trainer.run` is a generator that yields after every micro-batch, so the engine thread can
run inference iterations in between: inference waits at most one micro-batch.
"""

import bisect
import concurrent.futures
import dataclasses
import itertools
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from time import monotonic

import torch

from tandem.server.engine.iteration import TrainingWork
from tandem.server.engine.llm_engine import Engine
from tandem.server.errors import InvalidRequest, TandemError
from tandem.server.finetune.dataset import TrainingExample
from tandem.server.finetune.trainable_adapter import TrainableAdapter
from tandem.server.finetune.trainable_gates import TrainableGates

log = logging.getLogger(__name__)

LR_SCHEDULERS = ("linear", "cosine", "constant")
# Runs of a step whose engine iterations failed, before the job fails: a co-served
# micro-batch shares its iterations with inference, whose failures (out of memory on a
# burst of prompts) are not the job's.
STEP_ATTEMPTS = 3
# While inference runs, a step run again waits this long times the attempts made so far:
# the burst of prompts that ran the host out of memory is still there an iteration later,
# and the three attempts went in well under a second. With no inference it runs at once.
RETRY_PAUSE_SECONDS = 1.0
# OpenAI's limit on epochs; a million steps is weeks of CPU time.
MAX_EPOCHS = 50
MAX_STEPS = 1_000_000


class TrainingDiverged(TandemError):
    """The loss, a gradient or a weight became NaN or infinite: the job fails, nothing is published."""


@dataclass(frozen=True)
class Hyperparameters:
    """How a job trains. max_steps 0 trains n_epochs over the data; max_seq_length 0 is the
    server's context limit; warmup is linear from 0; max_grad_norm 0 turns clipping off;
    checkpoint_interval counts optimizer steps."""

    learning_rate: float = 2e-4
    lr_scheduler: str = "linear"
    warmup_steps: int = 0
    n_epochs: int = 1
    max_steps: int = 0
    tokens_per_step: int = 4096
    max_seq_length: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_fraction: float = 0.0
    checkpoint_interval: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            ("learning_rate", math.isfinite(self.learning_rate) and 0 < self.learning_rate <= 1, "in (0, 1]"),
            ("lr_scheduler", self.lr_scheduler in LR_SCHEDULERS, f"one of {', '.join(LR_SCHEDULERS)}"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            # With max_steps set n_epochs is unused (Hugging Face's rule), and nothing to bound.
            ("n_epochs", self.n_epochs >= 1 and (self.max_steps > 0 or self.n_epochs <= MAX_EPOCHS),
             f"in [1, {MAX_EPOCHS}] (any count >= 1 with max_steps set)"),
            ("max_steps", 0 <= self.max_steps <= MAX_STEPS, f"in [0, {MAX_STEPS}] (0: n_epochs over the data)"),
            ("tokens_per_step", self.tokens_per_step >= 1, ">= 1"),
            ("max_seq_length", self.max_seq_length >= 2 or self.max_seq_length == 0, ">= 2 (0: the context limit)"),
            ("weight_decay", math.isfinite(self.weight_decay) and self.weight_decay >= 0, "a finite number >= 0"),
            ("max_grad_norm", math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0, "a finite number >= 0 (0: no clipping)"),
            ("eval_fraction", 0 <= self.eval_fraction <= 0.5, "in [0, 0.5]"),
            ("checkpoint_interval", self.checkpoint_interval >= 1, ">= 1"),
            ("seed", 0 <= self.seed < 2**63, "in [0, 2^63)"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise InvalidRequest(f"hyperparameters.{name} must be {allowed}, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class StepReport:
    """One optimizer step done: its mean token loss, the gradient norm before clipping, the
    learning rate it used, its tokens, and the eval loss when it was an eval point. resumed:
    the step was trained before a restart and only its eval ran since (its tokens and time
    are not this run's)."""

    step: int
    total_steps: int
    train_loss: float
    grad_norm: float
    learning_rate: float
    tokens: int
    eval_loss: float | None = None
    resumed: bool = False


# One thread packs the epoch after the one being read, for every plan.
_PACKER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tandem-step-plan")


class StepPlan:
    """The example indices of every optimizer step, in order: each epoch's examples in a
    seeded order, packed greedily into steps of up to tokens_per_step tokens.

    Built an epoch at a time as steps are read (a plan of a million steps costs seconds
    and memory when built whole), straight from the epoch a step is in: where each epoch
    starts is counted once (packing each epoch), for n_epochs when the plan is made and up
    to a step by locate(), so make a plan, and locate a resumed job's step, off the engine
    thread. Read in order, the next epoch is packed on a thread of its own meanwhile (a
    shuffle of 200k examples took 0.3 s: every request would have waited for it)."""

    def __init__(self, examples: list[TrainingExample], hp: Hyperparameters):
        self._tokens = [e.num_tokens for e in examples]
        self._hp = hp
        self._epoch, self._steps = 0, self._pack(0)
        self._starts = [0, len(self._steps)]  # the first step of each epoch counted so far, and the next's
        if not hp.max_steps and len(self._steps) * hp.n_epochs > MAX_STEPS:
            # Before the other epochs are packed (each a shuffle of the whole dataset), and
            # within the step count checkpoints are numbered for.
            raise InvalidRequest(
                f"{hp.n_epochs} epochs of about {len(self._steps)} steps each is more than the {MAX_STEPS} steps a job "
                "may take: raise hyperparameters.tokens_per_step, lower n_epochs, or set max_steps"
            )
        self._len = hp.max_steps or self.locate(math.inf, hp.n_epochs)
        self._ahead: tuple[int, concurrent.futures.Future] | None = None

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, step: int) -> list[int]:
        if not 0 <= step < self._len:
            raise IndexError(f"step {step} is outside the plan of {self._len} steps")
        if step >= self._starts[-1] and self._ahead is not None and self._ahead[0] == len(self._starts) - 1:
            # The epoch packed ahead is the next one to count: counted from it, not packed again here.
            epoch, steps = self._ahead[0], self._ahead[1].result()
            self._starts.append(self._starts[-1] + len(steps))
            self._epoch, self._steps, self._ahead = epoch, steps, None
        self.locate(step)
        epoch = bisect.bisect_right(self._starts, step) - 1
        if epoch != self._epoch:
            ahead = self._ahead[1].result() if self._ahead is not None and self._ahead[0] == epoch else None
            self._epoch, self._steps, self._ahead = epoch, ahead or self._pack(epoch), None
        if self._ahead is None and self._starts[epoch] + len(self._steps) < self._len:
            self._ahead = (epoch + 1, _PACKER.submit(self._pack, epoch + 1))
        return self._steps[step - self._starts[epoch]]

    def locate(self, step: float, epochs: float = math.inf) -> int:
        """Count epochs (packing each) until the one holding `step` is known, or `epochs` of
        them are; returns the steps they hold."""
        while self._starts[-1] <= step and len(self._starts) - 1 < epochs and self._tokens:
            self._starts.append(self._starts[-1] + len(self._pack(len(self._starts) - 1)))
        return self._starts[-1]

    def _pack(self, epoch: int) -> list[list[int]]:
        order = list(range(len(self._tokens)))
        random.Random(self._hp.seed * 1_000_003 + epoch).shuffle(order)
        ends = list(itertools.accumulate(map(self._tokens.__getitem__, order)))
        steps, start, before = [], 0, 0
        while start < len(order):
            # As many of the next examples as fit (at least one), found by bisection: a
            # Python loop over every example cost ~2.4 us each on the engine thread.
            stop = max(start + 1, bisect.bisect_right(ends, before + self._hp.tokens_per_step, lo=start))
            steps.append(order[start:stop])
            before, start = ends[stop - 1], stop
        return steps


def plan_steps(examples: list[TrainingExample], hp: Hyperparameters) -> list[list[int]]:
    """The whole plan as a list (for a short plan: a test's or a benchmark's)."""
    return list(StepPlan(examples, hp))


def micro_batches(examples: list[TrainingExample], max_tokens: int) -> list[list[TrainingExample]]:
    """Consecutive groups of up to max_tokens tokens (a longer example runs alone)."""
    groups: list[list[TrainingExample]] = []
    tokens = 0
    for example in examples:
        if not groups or tokens + example.num_tokens > max_tokens:
            groups.append([])
            tokens = 0
        groups[-1].append(example)
        tokens += example.num_tokens
    return groups


def _pause(engine: Engine, seconds: float) -> Iterator[None]:
    """Yield to the engine (it serves meanwhile) until `seconds` have passed, or at once once
    no inference request is running or waiting."""
    until = monotonic() + seconds
    yield None
    while engine.serving and monotonic() < until:
        yield None


class Trainer:
    def __init__(
        self,
        adapter: TrainableAdapter | TrainableGates,
        hp: Hyperparameters,
        train: list[TrainingExample],
        evaluation: list[TrainingExample],
        micro_batch_tokens: int,
        plan: StepPlan | None = None,
    ):
        self.adapter = adapter
        self.hp = hp
        self.train = train
        self.evaluation = evaluation
        self.micro_batch_tokens = micro_batch_tokens
        self.plan = StepPlan(train, hp) if plan is None else plan
        self.step = 0
        # Tokens of the steps done: a resumed job counts from its checkpoint, not from what
        # the job record said when the server stopped, which may be steps past it.
        self.tokens = 0
        # The report of the last step while its eval runs: a checkpoint taken then (at a
        # shutdown) keeps it, and the resumed trainer runs that eval first (it was lost).
        self._unevaluated: StepReport | None = None
        # fused: one kernel over all the masters. The per-tensor loop took ~150 ms for a rank-16
        # all-linear SmolLM2 adapter on CPU, between two co-served iterations (the ITL tail).
        self.optimizer = torch.optim.AdamW(
            adapter.parameters(), lr=hp.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=hp.weight_decay, fused=True
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)

    @property
    def total_steps(self) -> int:
        return len(self.plan)

    @property
    def done(self) -> bool:
        """Every step trained, and the last one's eval run."""
        return self.step >= self.total_steps and self._unevaluated is None

    def state_dict(self) -> dict:
        """What a checkpoint needs beyond the adapter's weights to resume exactly."""
        unevaluated = None if self._unevaluated is None else dataclasses.asdict(self._unevaluated)
        return {
            "step": self.step, "tokens": self.tokens, "unevaluated": unevaluated,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        # A checkpoint written before the count was kept resumes counting from 0.
        self.tokens = state.get("tokens", 0)
        unevaluated = state.get("unevaluated")
        self._unevaluated = None if unevaluated is None else StepReport(**unevaluated | {"resumed": True})
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def run(self, engine: Engine, coserve: bool = False) -> Iterator[StepReport | None]:
        """Train to the end of the plan; yields None after every micro-batch (co-served: after
        every engine iteration that works on one) and a StepReport after every optimizer step.
        A step whose engine iteration failed runs again, up to STEP_ATTEMPTS times. Raises
        TrainingDiverged on a non-finite loss or weight."""
        while not self.done:
            report = self._unevaluated or (yield from self._step(engine, coserve))
            if self._unevaluated is not None or self._eval_point():
                self._unevaluated = report
                eval_loss = yield from self._evaluate(engine)
                report, self._unevaluated = dataclasses.replace(report, eval_loss=eval_loss), None
            yield report

    def _eval_point(self) -> bool:
        """Whether the step just done is evaluated: at every checkpoint interval, and the last."""
        return bool(self.evaluation) and (self.step % self.hp.checkpoint_interval == 0 or self.step >= self.total_steps)

    def _step(self, engine: Engine, coserve: bool) -> Iterator[None]:
        """The next optimizer step, its engine iterations run again after a failure; returns its report."""
        examples = [self.train[i] for i in self.plan[self.step]]
        targets = sum(e.num_target_tokens for e in examples)
        for attempt in range(1, STEP_ATTEMPTS + 1):
            try:
                loss_sum = yield from self._gradients(engine, examples, targets, coserve)
                break
            except TandemError:
                raise  # a refusal (a micro-batch over the activation cap): the same every time
            except Exception:
                # An iteration that failed (out of memory on a burst of prompts beside it)
                # drops its micro-batch and whatever gradients it had added: the step runs
                # again from its first micro-batch, the same (its randomness is reseeded).
                self.optimizer.zero_grad(set_to_none=True)
                if attempt == STEP_ATTEMPTS:
                    raise
                log.warning("step %d failed in an engine iteration; running it again (attempt %d of %d)",
                            self.step + 1, attempt + 1, STEP_ATTEMPTS, exc_info=True)
                yield from _pause(engine, RETRY_PAUSE_SECONDS * attempt)
        return self._optimizer_step(loss_sum / targets, sum(e.num_tokens for e in examples))

    def _gradients(self, engine: Engine, examples: list[TrainingExample], targets: int, coserve: bool) -> Iterator[None]:
        """The step's gradients, accumulated micro-batch by micro-batch; returns its summed loss."""
        generator = torch.Generator(device=engine.device).manual_seed((self.hp.seed * 1_000_003 + self.step) % 2**63)
        loss_sum = 0.0
        for group in micro_batches(examples, self.micro_batch_tokens):
            work = self.adapter.work(group, self.adapter.dropout, generator, examples)
            loss_sum += yield from self._micro_batch(engine, work, 1 / targets, coserve)
        return loss_sum

    @staticmethod
    def _micro_batch(engine: Engine, work: TrainingWork, loss_scale: float, coserve: bool) -> Iterator[None]:
        """Forward and backward of one micro-batch; returns its summed token loss. Time-sliced:
        in one call of the engine. Co-served: inside the engine's iterations, waited for."""
        if not coserve:
            loss_sum = engine.train(work, loss_scale).loss_sum
            yield None
            return loss_sum
        batch = engine.coserve.submit(work, loss_scale)
        while not batch.done:
            if batch.error is not None:
                raise batch.error
            yield None
        return batch.loss_sum

    def _optimizer_step(self, loss: float, tokens: int) -> StepReport:
        params = list(self.adapter.parameters())
        max_norm = self.hp.max_grad_norm or math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))
        step = self.step + 1
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            raise TrainingDiverged(f"training diverged at step {step}: loss {loss:.4g}, gradient norm {grad_norm:.4g}")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        # The fused step writes the masters without bumping their version counters; bump them,
        # so that what was built from the old values (the adapter's slots) is built again.
        for p in params:
            torch.autograd.graph.increment_version(p)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if not self.adapter.all_finite():
            raise TrainingDiverged(f"training diverged at step {step}: a weight became NaN or infinite")
        self.step = step
        self.tokens += tokens
        return StepReport(step, self.total_steps, loss, grad_norm, lr, tokens)

    def _evaluate(self, engine: Engine) -> Iterator[None]:
        """Mean token loss over the eval examples, no gradient; yields between micro-batches."""
        loss_sum = 0.0
        targets = sum(e.num_target_tokens for e in self.evaluation)
        for group in micro_batches(self.evaluation, self.micro_batch_tokens):
            loss_sum += engine.loss(self.adapter.work(group)).loss_sum
            yield None
        return loss_sum / targets

    def _lr_factor(self, step: int) -> float:
        """transformers' schedules: linear warm-up, then linear or cosine decay to 0, or constant."""
        warmup = self.hp.warmup_steps
        if step < warmup:
            return step / warmup
        if self.hp.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, self.total_steps - warmup)
        if self.hp.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
