"""Fine-tuning jobs: validated in full at creation, queued, trained one at a time in the engine
thread between inference iterations, checkpointed, and published as a new adapter version.

Threads: API calls (create, get, list, cancel, watch) run on worker threads; `run_once`
runs on the engine thread, one micro-batch per call, so inference waits at most one
micro-batch; checkpoints are copied there and written on a thread of their own
(checkpoints.Writer). One lock guards the job table; every change is saved to the job store first,
then announced to watchers.

On disk, under <data-dir>/.tandem/ (the rest of the data directory holds users' files):
    jobs.sqlite                       the job table (server/finetune/job_store.py)
    jobs/<id>/train.jsonl             the dataset as submitted, so a restart can resume
    jobs/<id>/checkpoints/step-*/     PEFT adapter + trainer state (checkpoints.py)
At start-up, a job the server was running (or had queued) is re-validated from its stored
dataset and queued again; it resumes from its newest complete checkpoint.
"""

import contextlib
import copy
import dataclasses
import errno
import logging
import math
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tandem.server.adapters.peft_format import WEIGHTS_FILE, LoRAAdapter, adapter_files, peft_config
from tandem.server.adapters.registry import check_writable_name
from tandem.server.adapters.router_format import GATES_FILE, Router
from tandem.server.atomic_files import check_writable, make_directories, remove_leftovers, write_file
from tandem.server.engine.llm_engine import Engine
from tandem.server.engine.passing_thread import in_passing_thread
from tandem.server.errors import AlreadyExists, FailedPrecondition, InvalidRequest, NotFound, ResourceExhausted, TandemError, excerpt
from tandem.server.finetune import checkpoints
from tandem.server.finetune.dataset import TrainingExample, parse_dataset, resolve_training_file, split_eval
from tandem.server.finetune.job import Job, JobError, JobStatus
from tandem.server.finetune.job_store import JobStore, StoreUnwritable
from tandem.server.finetune.trainable_adapter import LoRASpec, TrainableAdapter, spec_of
from tandem.server.finetune.trainable_gates import RouterSpec, TrainableGates, gated_linears
from tandem.server.finetune.trainer import Hyperparameters, StepPlan, StepReport, Trainer, TrainingDiverged

log = logging.getLogger("tandem.finetune")

STATE_DIR = ".tandem"
DATASET_FILE = "train.jsonl"
# What a job that is not running reports of what is ahead (the proto: 0 when unknown or
# ended); its tokens_per_second stays its last step's.
NOT_RUNNING = {"estimated_finish": 0.0, "finetune_share": 0.0}


@dataclass(frozen=True)
class JobRequest:
    """What CreateJob asks for. Exactly one of training_file (a file name inside the data
    directory) and training_data (inline JSONL). lora: the LoRASpec fields the request sets;
    the rest are the defaults, or the base adapter's when training continues from one.
    router: a gate-training job instead: the gates of a router named `adapter` over these
    frozen experts train (no base_adapter, no lora); lines may carry a "task" label."""

    adapter: str
    hyperparameters: Hyperparameters
    training_file: str = ""
    training_data: str = ""
    base_adapter: str = ""
    lora: dict = dataclasses.field(default_factory=dict)
    router: RouterSpec | None = None


@dataclass(frozen=True)
class FinetuneStats:
    """For metrics: jobs per status, tokens trained since start, the running job's last loss."""

    jobs: dict[str, int]
    tokens_total: int
    running_adapter: str
    running_loss: float | None


@dataclass(frozen=True)
class _Prepared:
    """A job's examples, tokenized, its step plan, and the adapter it starts from (None:
    fresh); made off the engine thread."""

    train: list[TrainingExample]
    evaluation: list[TrainingExample]
    plan: StepPlan
    base: LoRAAdapter | None
    experts: list[LoRAAdapter] | None = None


@dataclass
class _Running:
    job_id: str
    trainer: Trainer
    steps: Iterator[StepReport | None]
    last_step_at: float
    seconds_per_step: float | None = None
    # The engine's Engine.iteration_tokens when the last step ended (or the job started).
    tokens_at_step: dict[str, float] = field(default_factory=dict)


class JobManager:
    def __init__(self, engine: Engine, data_dir: str | Path, max_training_file_bytes: int, wake: Callable[[], None]):
        if engine.registry is None:
            raise ValueError("fine-tuning publishes adapters: start the server with --adapters-dir as well as --data-dir")
        try:
            check_writable(Path(engine.registry.adapters_dir))
        except OSError as exc:
            # Else a job found out at its publish, after its whole run, and lost it.
            raise ValueError(
                f"fine-tuning publishes into --adapters-dir {engine.registry.adapters_dir}, which this server cannot write "
                f"({exc.strerror or exc}): give user {os.getuid()} write access to it (Kubernetes' fsGroup does not apply to "
                "every ReadWriteMany volume: deploy/README.md), or serve without --data-dir"
            ) from exc
        self.engine = engine
        self.registry = engine.registry
        self.data_dir = Path(data_dir).resolve()
        self.state_dir = self.data_dir / STATE_DIR
        make_directories(self.state_dir / "jobs")
        self.max_training_file_bytes = max_training_file_bytes
        self._wake = wake
        self._lock = threading.RLock()
        # Held across a change's save (a SQLite commit with a sync, tens of ms on a cloud
        # disk), taken before _lock: the saves go in order while _lock, which GetJob, ListJobs
        # and WatchJob take on the event loop, is held only to read or swap the job.
        self._save_lock = threading.RLock()
        self._store = JobStore(self.state_dir)
        self._jobs = {job.id: job for job in self._store.load_all()}
        # Jobs whose end the store could not take (a full disk): saved at the next save that
        # succeeds, or at close. Else the store kept them running, and a restart resumed one
        # and published it again, over a later job's version of its adapter. Under _save_lock.
        self._unsaved_ends: set[str] = set()
        self._prepared: dict[str, _Prepared] = {}
        # Jobs being created (their dataset written), by adapter: one job per adapter.
        self._creating: dict[str, Job] = {}
        self._watchers: dict[str, list[Callable[[Job], None]]] = {}
        self._running: _Running | None = None
        self._publishing: str | None = None
        self._checkpoints = checkpoints.Writer()
        self.tokens_total = 0
        self._remove_ended_jobs_files()
        interrupted = [job for job in self._jobs.values() if not job.status.terminal]
        for job in interrupted:
            try:
                self._update(job.id, status=JobStatus.VALIDATING_FILES, **NOT_RUNNING)
            except StoreUnwritable:  # a full data disk must not stop the server: inference goes on
                log.exception("fine-tuning job %s: its state after the restart could not be saved", job.id)
        if interrupted:
            threading.Thread(target=self._revalidate, args=([j.id for j in interrupted],), name="tandem-jobs", daemon=True).start()

    def _remove_ended_jobs_files(self) -> None:
        """Resume files no restart will read: those of jobs that ended (a server stopped right
        after a cancel, or killed between saving a job's end and removing them, kept them for
        good) and the folders of jobs never saved (killed inside create)."""
        for job in self._jobs.values():
            if job.status.terminal:
                self._remove_resume_files(job.id)
        for folder in (self.state_dir / "jobs").iterdir():
            if folder.name not in self._jobs:
                shutil.rmtree(folder, ignore_errors=True)

    # API side (any thread)

    def create(self, request: JobRequest, abandoned: threading.Event | None = None) -> Job:
        """Validate everything (dataset included), then queue the job. Raises InvalidRequest
        naming every bad dataset line, AlreadyExists, NotFound or FailedPrecondition.
        abandoned: set once the caller has gone (its deadline passed while a large dataset was
        read): then no job is created, where one trained for nobody and its retry was refused
        as ALREADY_EXISTS."""
        check_writable_name(request.adapter)
        with self._lock:
            self._check_room()  # before the dataset is read: a full server refuses at once
        hp = request.hyperparameters
        limit = self.engine.max_model_len
        if hp.max_seq_length > limit:
            raise InvalidRequest(f"hyperparameters.max_seq_length {hp.max_seq_length} exceeds the server's context limit {limit}")
        hp = dataclasses.replace(hp, max_seq_length=hp.max_seq_length or limit)
        if request.router is not None and (request.base_adapter or request.lora):
            raise InvalidRequest("a gate-training job (router) trains only gates: give no base_adapter and no lora")
        base = self.registry.get(request.base_adapter) if request.base_adapter else None
        if isinstance(base, Router):
            raise FailedPrecondition(f"base_adapter {request.base_adapter!r} is a router: fine-tuning starts from a LoRA adapter")
        if request.router is not None and request.adapter in request.router.experts:
            raise InvalidRequest(
                f"adapter {excerpt(request.adapter)} is one of router.experts: the router is published under its own "
                "name, which would replace that expert's files; name it otherwise"
            )
        # A gate-training job trains no LoRA weights: its lora is a placeholder.
        spec = self._spec(request, base) if request.router is None else LoRASpec(r=1)
        data = self._dataset_bytes(request)
        prepared = self._prepare(data, hp, base, request.router, self._coserves(spec, request.router), request.adapter)
        self._prepack_for(spec, request.router)
        job = Job(
            id=f"ftjob-{uuid.uuid4().hex[:24]}",
            adapter=request.adapter,
            base_adapter=request.base_adapter,
            base_hash=base.content_hash if base is not None else "",
            base_a_init_seed=base.a_init_seed if base is not None else None,
            expert_hashes=tuple(expert.content_hash for expert in prepared.experts or ()),
            lora=spec,
            hyperparameters=hp,
            router=request.router,
            status=JobStatus.QUEUED,
            created_at=time.time(),
            total_steps=len(prepared.plan),
            num_examples=len(prepared.train),
            num_eval_examples=len(prepared.evaluation),
        )
        with self._lock:
            busy = [j for j in self._jobs.values() if j.adapter == job.adapter and not j.status.terminal]
            if busy or job.adapter in self._creating:
                owner = f"job {busy[0].id}" if busy else "a job being created"
                raise AlreadyExists(f"adapter {job.adapter!r} is already being trained by {owner}: wait for it or cancel it")
            self._check_experts_untrained(job)
            self._check_room()
            self._creating[job.adapter] = job
        try:
            # Outside the lock: the engine thread takes it every iteration, and a dataset of
            # hundreds of MB takes a second to write and sync.
            make_directories(self._job_dir(job.id))
            write_file(self._job_dir(job.id) / DATASET_FILE, data)
            if abandoned is not None and abandoned.is_set():
                raise FailedPrecondition(f"the call that would create a job for adapter {job.adapter!r} was cancelled: no job was created")
            self._store.save(job)  # a new job: no change of it can come before this one
            with self._lock:
                self._prepared[job.id] = prepared
                self._jobs[job.id] = job
        except BaseException as exc:
            shutil.rmtree(self._job_dir(job.id), ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted(
                    f"the data directory has no room for the job's copy of its dataset ({len(data)} bytes): free space there"
                ) from exc
            raise
        finally:
            with self._lock:
                del self._creating[job.adapter]
        log.info("job created", extra={"fields": {"job_id": job.id, "adapter": job.adapter, "total_steps": job.total_steps}})
        self._wake()
        return job

    def _check_experts_untrained(self, job: Job) -> None:
        """Refuse a gate-training job one of whose experts an active job trains, and a job
        that trains an expert of an active gate-training job. The gates are fitted to the
        expert versions they start over, and publish only over those: the expert's job, the
        older, ran first and the gates' job failed at its publish, after its whole run; or it
        replaced an expert under gates just published. Called under _lock."""
        active = [j for j in self._jobs.values() if not j.status.terminal] + list(self._creating.values())
        for other in active:
            if job.router is not None and other.adapter in job.router.experts:
                raise FailedPrecondition(
                    f"router expert {other.adapter!r} is being trained by job {other.id}: the gates would be fitted to the "
                    "version it replaces, and could not be published; wait for that job to end, or cancel it"
                )
            if other.router is not None and job.adapter in other.router.experts:
                raise FailedPrecondition(
                    f"adapter {job.adapter!r} is an expert of router {other.adapter!r}, whose gates job {other.id} trains over "
                    "its current version: wait for that job to end, or cancel it"
                )

    def _check_room(self) -> None:
        """Refuse a new job where max_active_jobs are queued, running or being created: each
        holds its parsed dataset in memory until it ends. Called under _lock."""
        active = sum(not j.status.terminal for j in self._jobs.values()) + len(self._creating)
        limit = self.engine.config.max_active_jobs
        if active >= limit:
            raise ResourceExhausted(
                f"{active} fine-tuning jobs are queued or running, the most this server holds (--max-active-jobs {limit}): "
                "wait for one to end, or cancel one"
            )

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"fine-tuning job {excerpt(job_id)} not found")
        return job

    def list_jobs(self) -> list[Job]:
        """Every job, newest first."""
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: (j.created_at, j.id), reverse=True)

    def list_page(self, size: int, token: str) -> tuple[list[Job], str]:
        """Up to `size` jobs (0: all), newest first, after the job whose id is `token` (empty:
        from the newest); and the token of the next page, empty after the last. Jobs created
        meanwhile come before the first page, never inside a later one."""
        jobs = self.list_jobs()
        start = 0
        if token:
            start = next((i + 1 for i, job in enumerate(jobs) if job.id == token), -1)
            if start < 0:
                raise InvalidRequest(f"page_token {excerpt(token)} is no job this server listed: list again from the first page")
        end = len(jobs) if size == 0 else start + size
        return jobs[start:end], jobs[end - 1].id if end < len(jobs) else ""

    def cancel(self, job_id: str) -> Job:
        """Stop a job; a running one stops before its next micro-batch and publishes nothing.
        Its check and save go under _save_lock, which _publish takes too, and not _lock, which
        GetJob, ListJobs and WatchJob wait on (on the event loop) while a sync runs. Its files
        go after _save_lock is let go: the engine thread takes it at every step, and inference
        waited for the removal. A start or a re-validation of the job racing with it sees the
        job cancelled at its next save and drops it (and its files) itself."""
        with self._save_lock:
            job = self.get(job_id)
            if job.status.terminal:
                raise FailedPrecondition(f"job {job_id} already ended ({job.status.value}); nothing to cancel")
            if self._publishing == job_id:
                raise FailedPrecondition(f"job {job_id} is publishing its adapter; it can no longer be cancelled")
            job = self._update(job_id, durable=True, status=JobStatus.CANCELLED, finished_at=time.time(), **NOT_RUNNING)
            with self._lock:
                self._prepared.pop(job_id, None)
            running = self._running
            # The running one's files go on the engine thread, between its writes.
            not_running = running is None or running.job_id != job_id
        if not_running:
            self._remove_resume_files(job_id)
        return job

    def watch(self, job_id: str, callback: Callable[[Job], None]) -> Callable[[], None]:
        """Call callback(job) on every change of the job, from whatever thread makes it;
        returns the function that stops the calls. The current state is sent first."""
        with self._lock:
            if job_id not in self._jobs:
                raise NotFound(f"fine-tuning job {excerpt(job_id)} not found")
            self._watchers.setdefault(job_id, []).append(callback)
            callback(self._jobs[job_id])

        def stop() -> None:
            with self._lock:
                self._watchers[job_id].remove(callback)
                if not self._watchers[job_id]:
                    del self._watchers[job_id]

        return stop

    def stats(self) -> FinetuneStats:
        with self._lock:
            counts = {status.value: 0 for status in JobStatus}
            for job in self._jobs.values():
                counts[job.status.value] += 1
            job = self._running  # the engine thread may end it meanwhile, outside the lock
            running = self._jobs[job.job_id] if job else None
        return FinetuneStats(counts, self.tokens_total, running.adapter if running else "", running.train_loss if running else None)

    # Engine thread

    def has_work(self) -> bool:
        with self._lock:
            return self._running is not None or any(
                j.status is JobStatus.QUEUED and j.id in self._prepared for j in self._jobs.values()
            )

    def run_once(self) -> None:
        """Start the oldest queued job if none runs, else run one micro-batch of the running one.
        A job that raises fails alone; the engine thread goes on."""
        job_id = self._running.job_id if self._running else self._next_queued()
        if job_id is None:
            return
        try:
            if self._running is None:
                self._start(self.get(job_id))
            elif self.get(job_id).status is not JobStatus.RUNNING:
                self._drop_cancelled(job_id)
            else:
                report = next(self._running.steps)
                if report is not None:
                    self._on_step(self._running, report)
        except TrainingDiverged as exc:
            self._fail(job_id, JobError("training_diverged", str(exc)))
        except StoreUnwritable as exc:
            log.exception("fine-tuning job %s stopped", job_id)
            message = f"{exc}: free space in the data directory, then restart the server (the job resumes from its last checkpoint) or create it again"
            self._fail(job_id, JobError("storage_error", message[:500]))
        except Exception as exc:
            log.exception("fine-tuning job %s failed", job_id)
            code = "storage_error" if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT) else "internal_error"
            self._fail(job_id, JobError(code, f"{type(exc).__name__}: {exc}"[:500]))

    def _fail(self, job_id: str, error: JobError) -> None:
        """End the running job as failed. A store that cannot take that either (a full disk)
        fails this job, in memory and to its watchers, not the engine thread that serves
        everyone: the store keeps the job's last saved state, from which a restart resumes it."""
        try:
            self._end(job_id, error)
        except StoreUnwritable:
            log.exception("fine-tuning job %s: its failure could not be saved", job_id)

    def close(self) -> None:
        """At shutdown, once the engine thread has stopped: the running job's last finished
        step is checkpointed, so a restart resumes there (it went back to its last interval's
        checkpoint: up to checkpoint_interval - 1 steps lost at every rolling restart). Its
        partial step's gradients are not kept: the restart computes that step again, the same.
        A job stopped in an eval, its step done but not yet checkpointed, is checkpointed with
        that eval pending (Trainer.state_dict): the restart runs it first, then goes on or, after
        the last step, publishes. Ends the store could not save are tried once more."""
        self._checkpoints.wait()
        running = self._running
        if running is not None and self.get(running.job_id).status is JobStatus.RUNNING:
            folder = self._job_dir(running.job_id) / "checkpoints"
            step = running.trainer.step
            latest = checkpoints.latest(folder)
            if step > 0 and (latest is None or checkpoints.step_of(latest) < step):
                try:
                    checkpoints.save(folder, step, self._files(self.get(running.job_id), running.trainer.adapter)(), running.trainer.state_dict())
                    log.info("job checkpointed at shutdown", extra={"fields": {"job_id": running.job_id, "step": step}})
                except OSError:
                    log.exception("fine-tuning job %s: its checkpoint at shutdown could not be written", running.job_id)
        with self._save_lock:
            self._save_unsaved_ends()
            for job_id in self._unsaved_ends:
                log.error("fine-tuning job %s: its end could not be saved; a restart resumes it", job_id)
        self._store.close()

    def _next_queued(self) -> str | None:
        with self._lock:
            queued = [j for j in self._jobs.values() if j.status is JobStatus.QUEUED and j.id in self._prepared]
        return min(queued, key=lambda j: (j.created_at, j.id)).id if queued else None

    def _start(self, job: Job) -> None:
        with self._lock:
            prepared = self._prepared.get(job.id)
        if prepared is None:  # cancelled since it was picked
            return
        model = self.engine.runner.model
        if job.router is not None:
            adapter = TrainableGates(model, prepared.experts, self.engine.config.max_lora_rank, job.router, seed=job.hyperparameters.seed)
        elif prepared.base is None:
            adapter = TrainableAdapter(model, job.lora, seed=job.hyperparameters.seed)
            if job.base_adapter:  # a continued job resumed from its checkpoint, which holds every weight
                adapter.a_init_seed = job.base_a_init_seed
        else:
            adapter = TrainableAdapter.from_adapter(model, prepared.base, job.lora.lora_dropout)
        coserve = self._coserves(job.lora, job.router)
        micro_batch_tokens = self.engine.config.finetune_micro_batch_tokens
        if coserve:
            micro_batch_tokens = min(micro_batch_tokens, self.engine.coserve.max_tokens)
        trainer = Trainer(adapter, job.hyperparameters, prepared.train, prepared.evaluation, micro_batch_tokens, prepared.plan)
        resumed = checkpoints.latest(self._job_dir(job.id) / "checkpoints")
        if resumed is not None:
            tensors, state = checkpoints.load(resumed, GATES_FILE if job.router is not None else WEIGHTS_FILE)
            if job.router is not None:
                adapter.load_gate_tensors(tensors)
            else:
                adapter.load_peft_tensors(tensors)
            trainer.load_state_dict(state)
            log.info("job resumed", extra={"fields": {"job_id": job.id, "from_step": trainer.step}})
        self._running = _Running(
            job.id, trainer, trainer.run(self.engine, coserve), time.monotonic(), tokens_at_step=dict(self.engine.iteration_tokens)
        )
        mode = "coserve" if coserve else "timeslice"
        self._update(
            job.id,
            status=JobStatus.RUNNING,
            started_at=job.started_at or time.time(),
            step=trainer.step,
            trained_tokens=trainer.tokens,
            mode=mode,
        )
        if trainer.done:  # killed after its last checkpoint, before publishing
            self._publish(self._running)

    def _coserves(self, lora: LoRASpec, router: RouterSpec | None) -> bool:
        """Whether a job runs co-served. Co-served steps rebuild each layer's graph from
        activations kept by a gradient-free forward, computing the trained adapter's delta
        again, which lora_dropout would make disagree with the forward's:
        those jobs run time-sliced, and so do gate-training jobs (their routed rows train in
        iterations of their own)."""
        return self.engine.config.finetune_mode == "coserve" and not lora.lora_dropout and router is None

    def _prepack_for(self, lora: LoRASpec, router: RouterSpec | None) -> None:
        """Before a job that co-serves is queued: reorder the transposed weights its backward
        slices multiply by, on a thread of its own, rather than in its first slices beside
        inference (SmolLM2's took 0.65 s on a 2-core EPYC: one interval of every running
        request). Once per server: the copies stay."""
        if self._coserves(lora, router):
            in_passing_thread(self.engine.runner.model.prepack, True)

    def _on_step(self, running: _Running, report: StepReport) -> None:
        now = time.monotonic()
        elapsed = now - running.last_step_at
        running.last_step_at = now
        job = self.get(running.job_id)
        self._update(
            job.id,
            step=report.step,
            train_loss=report.train_loss,
            eval_loss=job.eval_loss if report.eval_loss is None else report.eval_loss,
            trained_tokens=running.trainer.tokens,
            # A step trained before the restart, only evaluated since, says nothing of this run's pace.
            **({} if report.resumed else self._pace(running, job, report, elapsed)),
        )
        trainer = running.trainer
        if report.step % job.hyperparameters.checkpoint_interval == 0 or trainer.done:
            self._checkpoint(job, trainer)
        if trainer.done:
            self._checkpoints.wait()  # a kill during the publish resumes from the last step, not the one before
            self._publish(running)

    def _pace(self, running: _Running, job: Job, report: StepReport, elapsed: float) -> dict:
        """The job's speed and share after a step that took `elapsed` seconds, and when it ends."""
        # A moving average: steps slow down while inference is busy and speed up when idle.
        average = elapsed if running.seconds_per_step is None else 0.8 * running.seconds_per_step + 0.2 * elapsed
        running.seconds_per_step = average
        self.tokens_total += report.tokens
        tokens = dict(self.engine.iteration_tokens)
        split = {kind: count - running.tokens_at_step.get(kind, 0.0) for kind, count in tokens.items()}
        running.tokens_at_step = tokens
        return {
            "tokens_per_second": report.tokens / elapsed if elapsed > 0 else 0.0,
            "finetune_share": self.engine.stats().finetune_share if job.mode == "coserve" else 0.0,
            "step_iteration_tokens": split,
            "estimated_finish": time.time() + average * (report.total_steps - report.step),
        }

    def _checkpoint(self, job: Job, trainer: Trainer) -> None:
        """Have the trainer's checkpoint written, off the engine thread (checkpoints.Writer),
        from a copy taken now: the steps after it change the weights and the optimizer's state
        in place. It serves only a resume after a restart: one that cannot be written (a full
        or failing data disk) is logged and training goes on, a restart resuming from the
        checkpoint before it. Failing the job for it removed every checkpoint it had, and at
        the last step the trained weights, which the adapters directory, often another volume,
        would have taken."""
        folder, step = self._job_dir(job.id) / "checkpoints", trainer.step
        files, state = self._files(job, trainer.adapter), copy.deepcopy(trainer.state_dict())

        def write() -> None:
            try:
                checkpoints.save(folder, step, files(), state)
            except OSError:
                log.exception("fine-tuning job %s: its checkpoint at step %d could not be written; training goes on", job.id, step)

        self._checkpoints.submit(write)

    def _publish(self, running: _Running) -> None:
        """Publish the finished adapter; from here on the job can no longer be cancelled."""
        with self._save_lock:  # as cancel's check and save: one or the other first
            job = self.get(running.job_id)
            if job.status is JobStatus.RUNNING:
                self._publishing = job.id
        if job.status is not JobStatus.RUNNING:
            self._drop_cancelled(job.id)
            return
        try:
            if job.router is not None:
                # Its gates were fitted to the expert versions it started with: served over a
                # version republished meanwhile, they route by weights they never saw (a resumed
                # job refuses that already).
                try:
                    self._check_experts(job, [self.registry.get(expert) for expert in job.router.experts])
                except TandemError as exc:
                    self._end(job.id, JobError("validation_failed", f"could not publish router {job.adapter!r}: {exc}"[:500]))
                    return
                info = self.registry.publish_router(job.adapter, running.trainer.adapter.files())
            else:
                trained = running.trainer.adapter
                info = self.registry.publish(job.adapter, self._peft_config(job), trained.peft_tensors(), trained.a_init_seed)
        except (OSError, TandemError) as exc:
            log.exception("publishing the adapter of job %s failed", job.id)
            self._end(job.id, JobError("publish_failed", f"could not publish adapter {job.adapter!r} ({self._kept(job.id, running.trainer.step)}): {exc}"[:500]))
            return
        else:
            try:
                self._end(job.id, None, content_hash=info.content_hash)
            except StoreUnwritable:
                # The adapter is live: the job succeeded, whatever the store says. Its resume
                # files stay, and a restart publishes the same files again from its last
                # checkpoint (the final step's) and saves the success then.
                log.exception("fine-tuning job %s: its success could not be saved", job.id)
        finally:
            # Only once the job has ended: a cancel in between would find it neither
            # publishing nor over, and mark cancelled a job whose adapter is live.
            self._publishing = None
        log.info("job succeeded", extra={"fields": {"job_id": job.id, "adapter": job.adapter, "content_hash": info.content_hash}})

    def _kept(self, job_id: str, step: int) -> str:
        """Where a job whose publish failed keeps what it trained: its newest checkpoint."""
        newest = checkpoints.latest(self._job_dir(job_id) / "checkpoints")
        if newest is None:
            return "no checkpoint of it could be written: its weights are lost"
        if checkpoints.step_of(newest) == step:
            return f"its trained weights are kept in {newest}: copy that directory into --adapters-dir and load it"
        return f"its last steps' checkpoints could not be written: its weights at step {checkpoints.step_of(newest)} are kept in {newest}"

    def _drop(self) -> None:
        """Forget the running job's trainer and whatever it has in flight in the engine."""
        self._running = None
        self.engine.coserve.abort()

    def _drop_cancelled(self, job_id: str) -> None:
        """The running job was cancelled: publish nothing, and remove its resume files (cancel
        leaves a running job's to the engine thread, between its writes; one cancelled while
        its last checkpoint was written kept them for good)."""
        self._drop()
        self._remove_resume_files(job_id)

    def _end(self, job_id: str, error: JobError | None, **changes) -> None:
        """The running job is over: succeeded (error None) or failed. Once that is saved its
        resume files go; if it cannot be saved they stay for the resume after a restart. One
        that ended already (an end its store could not save, reaching the failure path) keeps
        them: removed then, a restart resumed it without its dataset and lost its weights."""
        if (ended := self.get(job_id)).status.terminal:
            if ended.status is JobStatus.CANCELLED:
                self._drop_cancelled(job_id)
            else:
                self._drop()
            return
        self._drop()
        self._prepared.pop(job_id, None)
        status = JobStatus.SUCCEEDED if error is None else JobStatus.FAILED
        self._update(job_id, status=status, finished_at=time.time(), error=error, **NOT_RUNNING | changes)
        self._remove_resume_files(job_id)

    def _remove_resume_files(self, job_id: str) -> None:
        """What only a resume after a restart reads, for a job that has ended (its record saved
        as such): its checkpoints (about 3x the adapter each, two kept: a finished or cancelled
        job held them forever) and its copy of the dataset. A job whose publish failed keeps
        its newest checkpoint: the only copy of what it trained, which its error names. A
        checkpoint being written is waited for: it made the folder again after the removal."""
        self._checkpoints.wait()
        folder = self._job_dir(job_id) / "checkpoints"
        job = self._jobs.get(job_id)
        try:
            newest = checkpoints.latest(folder) if job is not None and job.error is not None and job.error.code == "publish_failed" else None
            for other in folder.iterdir() if newest is not None else ():
                if other != newest:
                    shutil.rmtree(other, ignore_errors=True)
        except OSError:  # a server that cannot list it still starts; the files stay
            log.exception("fine-tuning job %s: its checkpoints could not be listed", job_id)
            return
        if newest is None:
            shutil.rmtree(folder, ignore_errors=True)
        (self._job_dir(job_id) / DATASET_FILE).unlink(missing_ok=True)

    # Helpers

    def _spec(self, request: JobRequest, base: LoRAAdapter | None) -> LoRASpec:
        """The LoRA settings: the request's over the defaults, or over the base adapter's
        (which only lora_dropout may change: the weights fix the rest)."""
        if base is None:
            spec = LoRASpec(**request.lora)
        else:
            continued = spec_of(base, 0.0, len(self.engine.runner.model.layers))
            spec = LoRASpec(**{**dataclasses.asdict(continued), **request.lora})
            # A restated alpha came through a float32 field of the API: the base's own is kept.
            if math.isclose(spec.lora_alpha, continued.lora_alpha, rel_tol=1e-6):
                spec = dataclasses.replace(spec, lora_alpha=continued.lora_alpha)
            if dataclasses.replace(spec, lora_dropout=0.0) != continued:
                rslora = ", use_rslora true" if continued.use_rslora else ""
                raise InvalidRequest(
                    f"lora {excerpt(request.lora, 200)} disagrees with base adapter {base.name!r} (r {continued.r}, lora_alpha "
                    f"{continued.lora_alpha:g}{rslora}, target_modules {list(continued.target_modules)}): "
                    "set only lora_dropout to continue it"
                )
        self._check_rank(spec)
        return spec

    def _check_rank(self, spec: LoRASpec) -> None:
        """At creation, and again at a resume: a job created under a larger --max-lora-rank
        than the restarted server's trained to the end and failed its publish."""
        max_rank = self.engine.config.max_lora_rank
        if spec.r > max_rank:
            raise InvalidRequest(f"lora.r {spec.r} is above the server's --max-lora-rank {max_rank}: the adapter could not be served")

    def _dataset_bytes(self, request: JobRequest) -> bytes:
        if bool(request.training_file) == bool(request.training_data):
            raise InvalidRequest("give exactly one of training_file (a file in the data directory) and training_data (inline JSONL)")
        if request.training_data:
            data = request.training_data.encode()
        else:
            path = resolve_training_file(self.data_dir, request.training_file)
            if path.is_relative_to(self.state_dir):
                raise InvalidRequest(f"training_file {request.training_file!r} is inside the server's own {STATE_DIR} directory")
            try:
                size = path.stat().st_size
                if size > self.max_training_file_bytes:
                    raise InvalidRequest(
                        f"training_file {request.training_file!r} has {size} bytes, more than the limit of "
                        f"{self.max_training_file_bytes} (--max-training-file-bytes)"
                    )
                data = path.read_bytes()
            except PermissionError as exc:  # the file's mode, not the server's fault
                raise FailedPrecondition(
                    f"training_file {request.training_file!r} cannot be read by the server ({exc.strerror}): "
                    "make it a file the server's user may read"
                ) from None
        if len(data) > self.max_training_file_bytes:
            raise InvalidRequest(f"training_data has {len(data)} bytes, more than the limit of {self.max_training_file_bytes}")
        return data

    def _prepare(
        self, data: bytes, hp: Hyperparameters, base: LoRAAdapter | None, router: RouterSpec | None, coserve: bool, adapter: str,
    ) -> _Prepared:
        experts = None if router is None else self._experts(router, adapter)  # an unknown expert first: the labels name them
        examples = parse_dataset(data, self.engine.tokenizer, hp.max_seq_length, check=self._example_check(coserve, router))
        if router is not None and router.top_k == 1 and not (router.routing_loss_weight > 0 and any(e.task for e in examples)):
            # A top-1 choice has no gradient and its one weight is always 1: only the routing
            # loss moves the gates, and without it the job published the gates it began with.
            raise InvalidRequest(
                "router.top_k 1 gives the gates no gradient from the language-model loss: label lines with \"task\" "
                "(and keep routing_loss_weight above 0), or use top_k >= 2"
            )
        train, evaluation = split_eval(examples, hp.eval_fraction, hp.seed)
        plan = StepPlan(train, hp)
        if 0 < len(plan) <= hp.warmup_steps:
            raise InvalidRequest(
                f"warmup_steps {hp.warmup_steps} is not less than the job's {len(plan)} steps: the learning rate would never "
                f"reach learning_rate {hp.learning_rate:g} (with warmup_steps >= steps every step of a one-step job has 0): "
                "lower warmup_steps, or train for more steps"
            )
        return _Prepared(train, evaluation, plan, base, experts)

    def _example_check(self, coserve: bool, router: RouterSpec | None) -> Callable[[TrainingExample], str | None]:
        """What this job refuses in a line beyond the dataset's own rules, for parse_dataset to
        list with the other invalid lines: an example a co-served micro-batch could not keep
        within the activation cap (one example is the least a micro-batch holds); a task label
        that is not one of the router's experts."""
        cap = self.engine.coserve

        def check(example: TrainingExample) -> str | None:
            if coserve and example.num_tokens > cap.max_tokens:
                return (
                    f"has {example.num_tokens} tokens; co-served training keeps {cap.bytes_per_token} bytes of activations "
                    f"a token on this model, so at most {cap.max_tokens} tokens fit the server's --finetune-activation-bytes "
                    f"({cap.activation_bytes}): shorten it, or run the server with a larger cap or --finetune-mode timeslice"
                )
            if router is not None:
                try:
                    router.task_index(example.task)
                except InvalidRequest as exc:
                    return str(exc)
            return None

        return check

    def _experts(self, router: RouterSpec, name: str) -> list[LoRAAdapter]:
        """A gate-training job's experts (current versions), refused when one is unknown
        (NotFound) or a router, when they share no adapted linear, or when the server could
        not serve the router (more experts than slots): each of those was found only after
        the job was queued (as internal_error) or trained (as publish_failed)."""
        self.registry.check_router_fits(name, len(router.experts))
        experts = []
        for expert_name in router.experts:
            expert = self.registry.get(expert_name)
            if not isinstance(expert, LoRAAdapter):
                raise FailedPrecondition(f"router expert {expert_name!r} is not a LoRA adapter: experts must be adapters")
            experts.append(expert)
        gated_linears(router, experts)
        return experts

    def _files(self, job: Job, trained: TrainableAdapter | TrainableGates) -> Callable[[], dict[str, bytes]]:
        """What a checkpoint of the job holds, the router's files or the PEFT adapter's, as they
        stand now; serialized when called, on the checkpoint's writer thread: only the adapter's
        weights are copied here (serialized here too, the engine thread was held 53 ms a checkpoint
        rather than 34 for SmolLM2's rank-16 adapter: bench/checkpoint_stall.py)."""
        if job.router is not None:
            files = trained.files()
            return lambda: files
        config, tensors, seed = self._peft_config(job), {k: v.clone() for k, v in trained.peft_tensors().items()}, trained.a_init_seed
        return lambda: adapter_files(config, tensors, seed)

    def _revalidate(self, job_ids: list[str]) -> None:
        """Re-tokenize interrupted jobs' stored datasets (off the engine thread), then queue
        them. One that cannot be resumed fails alone (a store that could not save that, or
        an unforeseen error, stopped this thread and left every later job validating, its
        watchers waiting for good)."""
        for job_id in job_ids:
            try:
                self._revalidate_one(job_id)
            except StoreUnwritable:
                log.exception("fine-tuning job %s: its state after the restart could not be saved", job_id)
            except Exception as exc:
                log.exception("fine-tuning job %s could not be resumed", job_id)
                error = JobError("internal_error", f"could not resume after a restart: {type(exc).__name__}: {exc}"[:500])
                with contextlib.suppress(StoreUnwritable):
                    self._update(job_id, status=JobStatus.FAILED, finished_at=time.time(), error=error, **NOT_RUNNING)
            finally:
                self._wake()

    def _revalidate_one(self, job_id: str) -> None:
        job = self.get(job_id)
        try:
            remove_leftovers(self._job_dir(job_id))
            limit = self.engine.max_model_len
            if job.hyperparameters.max_seq_length > limit:  # the server restarted with a shorter context
                raise InvalidRequest(
                    f"its max_seq_length {job.hyperparameters.max_seq_length} exceeds the server's context limit {limit} "
                    "now: create it again with a max_seq_length that fits, or on a server with the longer context"
                )
            self._check_rank(job.lora)
            base = self._resumed_base(job)
            data = (self._job_dir(job_id) / DATASET_FILE).read_bytes()
            prepared = self._prepare(data, job.hyperparameters, base, job.router, self._coserves(job.lora, job.router), job.adapter)
            self._check_experts(job, prepared.experts)
            prepared.plan.locate(job.step)  # here, not on the engine thread where the job resumes near it
            self._prepack_for(job.lora, job.router)
        except (OSError, TandemError) as exc:
            error = JobError("validation_failed", f"could not resume after a restart: {exc}"[:500])
            self._update(job_id, status=JobStatus.FAILED, finished_at=time.time(), error=error, **NOT_RUNNING)
            self._remove_resume_files(job_id)
            return
        with self._lock:
            if self._jobs[job_id].status.terminal:  # cancelled while it was validated
                return
            self._prepared[job_id] = prepared
        self._update(job_id, status=JobStatus.QUEUED)

    def _resumed_base(self, job: Job) -> LoRAAdapter | None:
        """The base adapter an interrupted job needs to go on: none once it has a checkpoint
        (which holds every weight), else the exact version it started from. The registry's
        current one could be another (republished since: the resumed job then ended with
        other weights than an uninterrupted one) or gone."""
        if not job.base_adapter or checkpoints.latest(self._job_dir(job.id) / "checkpoints") is not None:
            return None
        base = self.registry.get(job.base_adapter)
        if base.content_hash != job.base_hash:
            raise FailedPrecondition(
                f"base adapter {job.base_adapter!r} changed since the job was created, before its first checkpoint: create the job again"
            )
        return base

    @staticmethod
    def _check_experts(job: Job, experts: list[LoRAAdapter] | None) -> None:
        """A resumed gate-training job goes on only over the expert versions it started with:
        its gates were fitted to them, and its checkpoints hold no expert weights. (A job
        saved before the hashes were recorded has none to compare.)"""
        if not job.expert_hashes:
            return
        for expert, content_hash in zip(experts or (), job.expert_hashes):
            if expert.content_hash != content_hash:
                raise FailedPrecondition(
                    f"router expert {expert.name!r} changed since the job was created: its gates were trained over the "
                    "earlier version; create the job again"
                )

    def _peft_config(self, job: Job) -> dict:
        spec = job.lora
        return peft_config(
            spec.r, spec.lora_alpha, list(spec.target_modules), spec.use_rslora, spec.lora_dropout, self.engine.info.name
        )

    def _job_dir(self, job_id: str) -> Path:
        return self.state_dir / "jobs" / job_id

    def _update(self, job_id: str, durable: bool = False, **changes) -> Job:
        """Save a changed job, then tell its watchers. A job that ended stays as it ended (a
        failure to save a success turned a published job into a failed one). durable: the
        change is made only once saved (a user's cancel: one the store could not take was
        lost at the restart, which resumed the job, and could not be tried again)."""
        unsaved = None
        with self._save_lock:
            with self._lock:
                job = self._jobs[job_id]
            if job.status.terminal:
                return job
            job = job.replace(**changes)
            try:
                self._store.save(job)
            except StoreUnwritable as exc:  # raised once the watchers know
                if durable:
                    raise
                unsaved = exc
                if job.status.terminal:  # no later change of it will be saved
                    self._unsaved_ends.add(job_id)
            else:
                self._save_unsaved_ends()
            with self._lock:
                self._jobs[job_id] = job
                watchers = list(self._watchers.get(job_id, ()))
            for callback in watchers:  # in the saves' order: a watcher's last state is the job's
                callback(job)
        if unsaved is not None:
            raise unsaved
        return job

    def _save_unsaved_ends(self) -> None:
        """Save the ends the store could not take when they came (under _save_lock)."""
        for job_id in sorted(self._unsaved_ends):
            with self._lock:
                job = self._jobs[job_id]
            try:
                self._store.save(job)
            except StoreUnwritable:
                return
            self._unsaved_ends.discard(job_id)
