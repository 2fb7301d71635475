"""A fine-tuning job as users see it: OpenAI's job vocabulary, PEFT's LoRA names.

status: validating_files -> queued -> running -> succeeded | failed | cancelled. A job
killed with the server is queued again at restart and resumes from its last checkpoint.
"""

import dataclasses
from dataclasses import dataclass, field
from enum import Enum

from tandem.server.finetune.trainable_adapter import LoRASpec
from tandem.server.finetune.trainable_gates import RouterSpec
from tandem.server.finetune.trainer import Hyperparameters


class JobStatus(str, Enum):
    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


@dataclass(frozen=True)
class JobError:
    """Why a job failed: a stable code (e.g. training_diverged), a message to act on, and the
    request field it concerns, if one."""

    code: str
    message: str
    param: str = ""


@dataclass(frozen=True)
class Job:
    """A snapshot of one job; the manager replaces it as the job progresses.

    Times are Unix seconds (0 = not yet). train_loss / eval_loss: of the last step and the
    last eval point (None before). content_hash: of the adapter version it published.
    step_iteration_tokens: the engine's tokens by kind of work over the job's last step
    (Engine.iteration_tokens' kinds): inference served beside it and its own training.
    router: set for a gate-training job: it trains the gates of a router named `adapter`
    over frozen experts (lora is then unused).
    """

    id: str
    adapter: str
    base_adapter: str
    lora: LoRASpec
    hyperparameters: Hyperparameters
    status: JobStatus = JobStatus.VALIDATING_FILES
    created_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    step: int = 0
    total_steps: int = 0
    num_examples: int = 0
    num_eval_examples: int = 0
    trained_tokens: int = 0
    train_loss: float | None = None
    eval_loss: float | None = None
    tokens_per_second: float = 0.0
    estimated_finish: float = 0.0
    error: JobError | None = None
    content_hash: str = ""
    mode: str = ""
    finetune_share: float = 0.0
    step_iteration_tokens: dict[str, float] = field(default_factory=dict)
    router: RouterSpec | None = None
    # The content hash of base_adapter's version the job started from: a resume before the
    # first checkpoint needs that version (after it, the checkpoint holds every weight).
    base_hash: str = ""
    # That version's init seed (LoRAAdapter.a_init_seed): its A is that draw plus a move, and
    # so is the continuation's, which publishes the seed, after a resume from a checkpoint too.
    base_a_init_seed: int | None = None
    # A gate-training job's experts' content hashes when it was created: its checkpoints hold
    # only gates, fitted to those versions, so a resume needs them still.
    expert_hashes: tuple[str, ...] = ()

    def replace(self, **changes) -> "Job":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        record = dataclasses.asdict(self)
        record["status"] = self.status.value
        record["lora"]["target_modules"] = list(self.lora.target_modules)
        if self.router is not None:
            record["router"]["experts"] = list(self.router.experts)
        return record

    @classmethod
    def from_dict(cls, record: dict) -> "Job":
        record = dict(record)
        record["status"] = JobStatus(record["status"])
        lora = dict(record["lora"])
        lora["target_modules"] = tuple(lora["target_modules"])
        record["lora"] = LoRASpec(**lora)
        record["hyperparameters"] = Hyperparameters(**record["hyperparameters"])
        record["error"] = None if record["error"] is None else JobError(**record["error"])
        record["router"] = None if record.get("router") is None else RouterSpec(**record["router"])
        record["expert_hashes"] = tuple(record.get("expert_hashes", ()))
        return cls(**record)
