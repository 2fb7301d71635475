"""tandem.v1.FineTuningService messages <-> fine-tuning job types. Proto3 zeros mean "the default":
only the fields a request sets reach the dataclasses, whose defaults are the one source."""

from tandem.server.api.convert import float32_as_sent
from tandem.server.finetune.job import Job, JobStatus
from tandem.server.finetune.jobs import JobRequest
from tandem.server.finetune.trainable_gates import RouterSpec
from tandem.server.finetune.trainer import Hyperparameters
from tandem.v1 import finetuning_pb2

_STATUS = {
    JobStatus.VALIDATING_FILES: finetuning_pb2.JOB_STATUS_VALIDATING_FILES,
    JobStatus.QUEUED: finetuning_pb2.JOB_STATUS_QUEUED,
    JobStatus.RUNNING: finetuning_pb2.JOB_STATUS_RUNNING,
    JobStatus.SUCCEEDED: finetuning_pb2.JOB_STATUS_SUCCEEDED,
    JobStatus.FAILED: finetuning_pb2.JOB_STATUS_FAILED,
    JobStatus.CANCELLED: finetuning_pb2.JOB_STATUS_CANCELLED,
}


def job_request(request: finetuning_pb2.CreateJobRequest) -> JobRequest:
    return JobRequest(
        adapter=request.adapter,
        hyperparameters=_hyperparameters(request.hyperparameters),
        training_file=request.training_file,
        training_data=request.training_data,
        base_adapter=request.base_adapter,
        lora=_lora(request.lora),
        router=_router(request.router) if request.HasField("router") else None,
    )


def _router(router: finetuning_pb2.RouterTraining) -> RouterSpec:
    """The gate-training spec; unset fields take RouterSpec's defaults."""
    return RouterSpec(
        tuple(router.experts),
        **_given(
            top_k=router.top_k or None,
            temperature=_optional(router, "temperature", float32_as_sent),
            routing_loss_weight=_optional(router, "routing_loss_weight", float32_as_sent),
        ),
    )


def _given(**fields) -> dict:
    return {name: value for name, value in fields.items() if value is not None}


def _optional(message, name: str, read=lambda value: value):
    """The field's value through read, None where it is unset."""
    return read(getattr(message, name)) if message.HasField(name) else None


def _lora(lora: finetuning_pb2.LoraConfig) -> dict:
    """The LoRASpec fields the request sets."""
    return _given(
        r=lora.r or None,
        lora_alpha=_optional(lora, "lora_alpha", float32_as_sent),
        target_modules=tuple(lora.target_modules) or None,
        use_rslora=lora.use_rslora or None,
        lora_dropout=float32_as_sent(lora.lora_dropout) or None,
    )


def _hyperparameters(hp: finetuning_pb2.Hyperparameters) -> Hyperparameters:
    return Hyperparameters(
        **_given(
            learning_rate=_optional(hp, "learning_rate"),
            lr_scheduler=hp.lr_scheduler or None,
            warmup_steps=hp.warmup_steps,
            n_epochs=hp.n_epochs or None,
            max_steps=hp.max_steps,
            tokens_per_step=hp.tokens_per_step or None,
            max_seq_length=hp.max_seq_length or None,
            weight_decay=hp.weight_decay,
            max_grad_norm=_optional(hp, "max_grad_norm"),
            eval_fraction=hp.eval_fraction,
            checkpoint_interval=hp.checkpoint_interval or None,
            seed=hp.seed,
        )
    )


def job(job: Job) -> finetuning_pb2.Job:
    spec, hp = job.lora, job.hyperparameters
    message = finetuning_pb2.Job(
        id=job.id,
        adapter=job.adapter,
        base_adapter=job.base_adapter,
        status=_STATUS[job.status],
        created_at=int(job.created_at),
        started_at=int(job.started_at),
        finished_at=int(job.finished_at),
        step=job.step,
        total_steps=job.total_steps,
        num_examples=job.num_examples,
        num_eval_examples=job.num_eval_examples,
        trained_tokens=job.trained_tokens,
        tokens_per_second=job.tokens_per_second,
        estimated_finish=int(job.estimated_finish),
        content_hash=job.content_hash,
        mode=job.mode,
        finetune_share=job.finetune_share,
        step_iteration_tokens=job.step_iteration_tokens,
        lora=finetuning_pb2.LoraConfig(
            r=spec.r, lora_alpha=spec.lora_alpha, use_rslora=spec.use_rslora,
            target_modules=list(spec.target_modules), lora_dropout=spec.lora_dropout,
        ),
        hyperparameters=finetuning_pb2.Hyperparameters(
            learning_rate=hp.learning_rate, lr_scheduler=hp.lr_scheduler, warmup_steps=hp.warmup_steps,
            n_epochs=hp.n_epochs, max_steps=hp.max_steps, tokens_per_step=hp.tokens_per_step,
            max_seq_length=hp.max_seq_length, weight_decay=hp.weight_decay, max_grad_norm=hp.max_grad_norm,
            eval_fraction=hp.eval_fraction, checkpoint_interval=hp.checkpoint_interval, seed=hp.seed,
        ),
    )
    if job.train_loss is not None:
        message.train_loss = job.train_loss
    if job.eval_loss is not None:
        message.eval_loss = job.eval_loss
    if job.error is not None:
        message.error.CopyFrom(finetuning_pb2.JobError(code=job.error.code, message=job.error.message, param=job.error.param))
    return message
