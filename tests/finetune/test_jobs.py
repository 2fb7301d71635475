"""Fine-tuning jobs end to end on the tiny model: a job trains, publishes a PEFT adapter that
peft loads and that Tandem serves with peft's tokens; bad requests are refused before a job
exists; cancelled and diverging jobs publish nothing; a restarted server resumes a job from
its checkpoint and ends with the adapter an uninterrupted run makes."""

import asyncio
import contextlib
import dataclasses
import copy
import errno
import itertools
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from tandem.server.adapters.peft_format import WEIGHTS_FILE, content_hash
from tandem.server.config import EngineConfig
from tandem.server.engine.async_engine import AsyncEngine
from tandem.server.engine.sampling_params import SamplingParams
from tandem.server.errors import AlreadyExists, FailedPrecondition, IncompatibleAdapter, InvalidRequest, NotFound, ResourceExhausted
from tandem.server.finetune.job import Job, JobStatus
from tandem.server.finetune import jobs as jobs_module
from tandem.server.finetune.job_store import JobStore, StoreUnwritable
from tandem.server.finetune.jobs import JobRequest
from tandem.server.finetune.trainer import Hyperparameters
from tandem.server.model.lora_targets import group_linears
from tests.adapters.make_adapters import make_adapter
from tests.api.conftest import wait_until
from tests.engine.helpers import make_engine

MAX_RANK = 16
DATA = "\n".join(json.dumps({"prompt": f"Item {i}:", "completion": f" value {i * 7}"}) for i in range(24))
HP = Hyperparameters(learning_rate=1e-2, max_steps=6, tokens_per_step=48, checkpoint_interval=2, seed=4)


@pytest.fixture
def dirs(tmp_path) -> tuple[Path, Path]:
    adapters, data = tmp_path / "adapters", tmp_path / "data"
    adapters.mkdir()
    data.mkdir()
    return adapters, data


def unstarted(model_dir: Path, dirs: tuple[Path, Path], **changes) -> AsyncEngine:
    """An engine whose thread is not running yet: jobs can be created and watched before any step."""
    adapters, data = dirs
    return AsyncEngine(EngineConfig(**{
        "model": str(model_dir), "dtype": "float32", "kv_cache_bytes": 16 << 20, "adapters_dir": str(adapters),
        "data_dir": str(data), "max_lora_rank": MAX_RANK, "max_num_batched_tokens": 32, "finetune_micro_batch_tokens": 32,
        "adapter_cache_prefault": False, **changes,
    }))


def restarted(model_dir: Path, dirs: tuple[Path, Path], job_id: str) -> tuple[Job, list[Job]]:
    """A new server on dirs until the job ends: its end, and every update watched since the start."""
    engine = unstarted(model_dir, dirs)
    events: list[Job] = []
    try:
        engine.jobs.watch(job_id, events.append)
        engine.start()
        return wait_for(engine, job_id), events
    finally:
        engine.shutdown()


def start(model_dir: Path, dirs: tuple[Path, Path], **changes) -> AsyncEngine:
    engine = unstarted(model_dir, dirs, **changes)
    engine.start()
    return engine


def run_until_step(engine: AsyncEngine, job_id: str, step: int) -> None:
    """Start the unstarted `engine` and return once job `job_id` has finished `step`. The watch
    callback holds the engine thread until shutdown has set its stop flag, so the engine's stop
    lands right after that step however late this thread wakes (on a loaded host it landed one
    to three steps later, or after the job had ended)."""
    stepped = threading.Event()

    def hold(job: Job) -> None:
        if job.step >= step:
            stepped.set()
            wait_until(lambda: engine._stopping, 120)  # no public sign that shutdown has begun

    engine.jobs.watch(job_id, hold)
    engine.start()
    assert stepped.wait(60)


def stopped_after_step_one(model_dir: Path, dirs: tuple[Path, Path]) -> Job:
    """A job whose server stopped after its first step: what a restart finds interrupted."""
    engine = unstarted(model_dir, dirs)
    try:
        job = engine.jobs.create(request())
        run_until_step(engine, job.id, 1)
    finally:
        engine.shutdown()
    return job


def wait_for(engine: AsyncEngine, job_id: str, done=lambda job: job.status.terminal, timeout: float = 120) -> Job:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = engine.jobs.get(job_id)
        if done(job):
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not get there in {timeout}s: {engine.jobs.get(job_id)}")


def three_tokens(engine: AsyncEngine, request_id: str) -> list[int]:
    """A greedy request's tokens: the server serves beside (or after) what a test did to a job."""

    async def generate() -> list[int]:
        params = SamplingParams(temperature=0.0, max_new_tokens=3, ignore_eos=True)
        return [t async for out in engine.generate("Item 3:", params, request_id) for t in out.token_ids]

    return asyncio.run(generate())


def request(adapter: str = "tuned", **changes) -> JobRequest:
    return JobRequest(**{"adapter": adapter, "hyperparameters": HP, "training_data": DATA, "lora": {"r": 8}, **changes})


def test_a_job_trains_publishes_and_serves_what_peft_serves(tiny_model_dir, tiny_hf_model, smollm2_tokenizer, dirs):
    engine = start(tiny_model_dir, dirs)
    try:
        events: list[Job] = []
        job = engine.jobs.create(request())
        engine.jobs.watch(job.id, events.append)
        final: dict[str, torch.Tensor] = {}

        def keep_final_weights(e: Job) -> None:
            # On the engine thread, right after the last step's update and before the publish:
            # the trainer's final weights, taken from the trainer, not from what was published.
            if e.status is JobStatus.RUNNING and e.step == HP.max_steps:
                final.update({k: v.clone() for k, v in engine.jobs._running.trainer.adapter.peft_tensors().items()})

        engine.jobs.watch(job.id, keep_final_weights)
        job = wait_for(engine, job.id)
        stats = engine.stats()
    finally:
        engine.shutdown()
    assert job.status is JobStatus.SUCCEEDED and job.error is None and job.mode == "coserve"
    # Each step reports what the engine ran meanwhile: its own tokens forward, and backward
    # through every layer once (token-layers / layers), nothing else here.
    splits = {e.step: e.step_iteration_tokens for e in events if e.status is JobStatus.RUNNING and e.step}
    assert sorted(splits) == [1, 2, 3, 4, 5, 6]
    assert sum(split["train_forward"] for split in splits.values()) == job.trained_tokens
    for split in splits.values():
        assert split["train_backward"] == pytest.approx(split["train_forward"])
        assert split["decode"] == split["prefill"] == 0
    assert stats.finetune_activation_bytes == 0 and stats.num_free_blocks == stats.num_total_blocks
    assert (job.step, job.total_steps, job.num_examples) == (6, 6, 24)
    assert job.content_hash == content_hash(dirs[0] / "tuned")
    assert job.trained_tokens > 6 * 30 and job.tokens_per_second > 0 and job.finished_at >= job.started_at > 0
    statuses = [e.status for e in events]
    assert statuses[0] is JobStatus.QUEUED and statuses[-1] is JobStatus.SUCCEEDED
    assert [e.step for e in events if e.status is JobStatus.RUNNING][-1] == 6
    losses = [e.train_loss for e in events if e.train_loss is not None]
    assert losses[-1] < losses[0]  # it learns something even in six steps

    # What was published is the trainer's final weights, and they are trained: every B has
    # left its zero init (initial weights published would make the adapter a no-op).
    published = load_file(dirs[0] / "tuned" / WEIGHTS_FILE)
    assert final and published.keys() == final.keys() and all(torch.equal(published[k], final[k]) for k in final)
    b_weights = [v for k, v in published.items() if "lora_B" in k]
    assert b_weights and all(bool(v.any()) for v in b_weights)

    # The published files are a PEFT adapter; peft's greedy tokens are Tandem's.
    peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny_hf_model), str(dirs[0] / "tuned")).eval()
    prompt = smollm2_tokenizer("Item 3:").input_ids
    with torch.no_grad():  # and peft's output with the adapter is not the base model's
        adapted = peft_model(input_ids=torch.tensor([prompt])).logits
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=torch.tensor([prompt])).logits
    assert (adapted - plain).abs().max() > 1e-2
    served = make_engine(tiny_hf_model, smollm2_tokenizer, adapters_dir=str(dirs[0]), max_lora_rank=MAX_RANK, kv_cache_bytes=8 << 20)
    served.add_request("r", prompt, SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True), served.registry.get("tuned"))
    ours = [t for _ in iter(served.has_work, False) for out in served.step() for t in out.token_ids]
    with torch.no_grad():
        theirs = peft_model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert ours == theirs[0, len(prompt) :].tolist()


def test_bad_requests_are_refused_before_a_job_exists(tiny_model_dir, tiny_hf_model, dirs):
    adapters, data = dirs
    (data / "ok.jsonl").write_text(DATA)
    make_adapter(tiny_hf_model, adapters / "patterned", r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 8})
    make_adapter(tiny_hf_model, adapters / "plain", r=4)
    make_adapter(tiny_hf_model, adapters / "first-layer", r=4, layers_to_transform=[0])
    engine = start(tiny_model_dir, dirs)
    try:
        jobs = engine.jobs
        cases = [
            (NotFound, request(base_adapter="ghost"), "adapter 'ghost' not found"),
            (InvalidRequest, request(training_data=DATA + '\n{"prompt": "x"}\nnot json'), "training data has 2 invalid lines: line 25: "),
            (InvalidRequest, request(training_data="", training_file="../escape.jsonl"), 'training_file "../escape.jsonl" is outside the data directory'),
            (InvalidRequest, request(training_data="", training_file=".tandem/jobs.sqlite"), "is inside the server's own .tandem directory"),
            (NotFound, request(training_data="", training_file="missing.jsonl"), 'training_file "missing.jsonl" not found'),
            (InvalidRequest, request(training_data=""), "give exactly one of training_file"),
            (InvalidRequest, request(training_file="ok.jsonl"), "give exactly one of training_file"),
            (InvalidRequest, request(lora={"r": 32}), "lora.r 32 is above the server's --max-lora-rank 16"),
            (InvalidRequest, request(adapter="a/b"), "adapter name must be a non-empty single path component"),
            (InvalidRequest, request(adapter=".hidden"), "adapter name must not start with '.'"),
            # Within NAME_MAX, but not with the temp directory's prefix that publishing adds.
            (InvalidRequest, request(adapter="a" * 250), "adapter name is too long: 250 bytes where the file system allows 206"),
            (IncompatibleAdapter, request(base_adapter="patterned", lora={}), "adapter 'patterned' has several ranks or scales"),
            # Continued, every other layer's q_proj trained from a fresh start and was published.
            (IncompatibleAdapter, request(base_adapter="first-layer", lora={}), "adapter 'first-layer' adapts q_proj on some layers only (not layer 1"),
            (
                InvalidRequest,
                request(base_adapter="plain", lora={"r": 8}),
                "lora {'r': 8} disagrees with base adapter 'plain' (r 4, lora_alpha 16, target_modules "
                "['q_proj', 'k_proj', 'v_proj', 'o_proj']): set only lora_dropout to continue it",
            ),
            (
                InvalidRequest,
                request(hyperparameters=Hyperparameters(max_seq_length=4096)),
                "hyperparameters.max_seq_length 4096 exceeds the server's context limit 512",
            ),
            (
                InvalidRequest,
                request(hyperparameters=Hyperparameters(max_steps=4, tokens_per_step=48, warmup_steps=4)),
                "warmup_steps 4 is not less than the job's 4 steps: the learning rate would never reach learning_rate",
            ),
        ]
        for cls, bad, message in cases:
            with pytest.raises(cls) as info:
                jobs.create(bad)
            assert type(info.value) is cls and message in str(info.value), (message, str(info.value))
        assert jobs.list_jobs() == []
        long = jobs.create(request(hyperparameters=Hyperparameters(max_steps=500, tokens_per_step=48)))
        with pytest.raises(AlreadyExists, match=rf"^adapter 'tuned' is already being trained by job {long.id}: wait for it or cancel it$"):
            jobs.create(request())
        assert jobs.create(request(adapter="other", training_data="", training_file="ok.jsonl")).status is JobStatus.QUEUED
        continued = jobs.create(request(adapter="plain", base_adapter="plain", lora={"lora_dropout": 0.2}))
        assert (continued.lora.r, continued.lora.lora_dropout) == (4, 0.2)
        with pytest.raises(NotFound, match="^fine-tuning job 'nope' not found$"):
            jobs.cancel("nope")
        assert jobs.cancel(long.id).status is JobStatus.CANCELLED
        with pytest.raises(FailedPrecondition, match=rf"^job {long.id} already ended \(cancelled\); nothing to cancel$"):
            jobs.cancel(long.id)
    finally:
        engine.shutdown()
    assert not (adapters / "tuned").exists()


@pytest.mark.parametrize("mode, reordered", [("coserve", True), ("timeslice", False)])
def test_a_coserved_job_gets_the_backward_weights_reordered_before_it_is_queued(tiny_model_dir, dirs, mode, reordered):
    """Its first backward slices would otherwise wait for them beside inference; time-sliced
    micro-batches run past the reordered path's rows and need none."""
    adapters, data = dirs
    engine = AsyncEngine(EngineConfig(
        model=str(tiny_model_dir), dtype="float32", kv_cache_bytes=16 << 20, adapters_dir=str(adapters), data_dir=str(data),
        max_lora_rank=MAX_RANK, finetune_mode=mode, adapter_cache_prefault=False,
    ))  # not started: no iteration can make them first
    model = engine.engine.runner.model
    if model.lm_head_packed._packed is None:
        pytest.skip("this CPU reorders no float32 weights")
    try:
        engine.jobs.create(request())
        transposed = [linear.packed._transposed is not None for linear in group_linears(model).values()]
        assert transposed == [reordered] * len(transposed)
        assert (model.lm_head_packed._transposed is not None) is reordered
    finally:
        engine.shutdown()


async def read_then_leave(engine: AsyncEngine, request_id: str, tokens: int) -> int:
    """Read a long generation's first `tokens` tokens, then leave it (which aborts it)."""
    read = 0
    params = SamplingParams(temperature=0.0, max_new_tokens=500, ignore_eos=True)
    async with contextlib.aclosing(engine.generate([5, 6, 7, 8], params, request_id)) as stream:
        async for out in stream:
            read += len(out.token_ids)
            if read >= tokens:
                break
    return read


def test_a_cancelled_running_job_publishes_nothing_and_holds_nothing(tiny_model_dir, dirs):
    """Cancelled mid-step beside inference that is itself abandoned mid-stream: no KV block,
    slot pin or kept activation stays held, and the engine serves on."""
    engine = start(tiny_model_dir, dirs)
    try:
        job = engine.jobs.create(request(hyperparameters=Hyperparameters(max_steps=1000, tokens_per_step=48)))
        wait_for(engine, job.id, lambda j: j.step >= 2)
        held = [engine.stats().finetune_activation_bytes for _ in range(2000) if not time.sleep(0.001)]
        assert max(held) > 0  # a micro-batch was in flight, and the gauge showed it
        reader = threading.Thread(target=lambda: asyncio.run(read_then_leave(engine, "beside", 20)))
        reader.start()
        assert engine.jobs.cancel(job.id).status is JobStatus.CANCELLED
        reader.join(timeout=60)
        job_dir = engine.jobs._job_dir(job.id)

        def let_go() -> bool:
            stats = engine.stats()
            return (
                not engine.jobs.has_work() and stats.num_free_blocks == stats.num_total_blocks and stats.finetune_activation_bytes == 0
                and not engine.engine.coserve.has_work() and all(p == 0 for p in engine.engine.registry.pool._pins) and not any(job_dir.iterdir())
            )

        # The engine thread drains the reader's abort and drops the cancelled job after join and cancel return.
        wait_until(let_go, 30)
        job = engine.jobs.get(job.id)
        assert job.status is JobStatus.CANCELLED and not engine.jobs.has_work()
        stats = engine.stats()
        assert stats.num_free_blocks == stats.num_total_blocks and stats.finetune_activation_bytes == 0
        assert not engine.engine.coserve.has_work() and all(p == 0 for p in engine.engine.registry.pool._pins)
        assert not engine.jobs._prepared  # its tokenized dataset and step plan are let go
        # Its checkpoints and dataset copy, read only by a resume, are gone from disk too.
        assert [p.name for p in job_dir.iterdir()] == []
        assert asyncio.run(read_then_leave(engine, "after", 5)) == 5
    finally:
        engine.shutdown()
    assert not (dirs[0] / "tuned").exists()


def _locked(path: Path) -> bytes:
    raise PermissionError(errno.EACCES, "Permission denied", str(path))


def test_a_full_disk_refuses_the_job_as_resource_exhausted_holding_nothing(tiny_model_dir, dirs, monkeypatch):
    """The job's copy of its dataset is its first write: ENOSPC there was INTERNAL, as was a
    training file the server may not read."""
    engine = start(tiny_model_dir, dirs)

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(jobs_module, "write_file", full)
    (dirs[1] / "locked.jsonl").write_text(DATA)
    read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda p: _locked(p) if p.name == "locked.jsonl" else read_bytes(p))
    try:
        with pytest.raises(ResourceExhausted, match="no room for the job's copy of its dataset"):
            engine.jobs.create(request())
        # A training file the server's user may not read (root reads any here) is the file's fault, not the server's.
        with pytest.raises(FailedPrecondition, match="training_file 'locked.jsonl' cannot be read by the server \\(Permission denied\\)"):
            engine.jobs.create(request(training_data="", training_file="locked.jsonl"))
        assert engine.jobs.list_jobs() == [] and not any((engine.jobs.state_dir / "jobs").iterdir())
    finally:
        engine.shutdown()


def test_a_job_cancelled_while_its_last_checkpoint_is_written_holds_nothing(tiny_model_dir, dirs, monkeypatch):
    """The cancel leaves a running job's files to the engine thread, which then publishes
    nothing: it kept the checkpoints and the dataset copy for good. An ended job reports no
    finish ahead either (it reported one minutes ahead), and keeps its last pace."""
    engine = start(tiny_model_dir, dirs)
    save = jobs_module.checkpoints.save

    def save_then_cancel(directory, step, files, state):
        save(directory, step, files, state)
        if step == HP.max_steps:
            engine.jobs.cancel(directory.parent.name)

    monkeypatch.setattr(jobs_module.checkpoints, "save", save_then_cancel)
    try:
        job = wait_for(engine, engine.jobs.create(request()).id)
        assert job.status is JobStatus.CANCELLED and job.step == HP.max_steps
        assert (job.estimated_finish, job.finetune_share) == (0.0, 0.0) and job.tokens_per_second > 0
        job_dir = engine.jobs._job_dir(job.id)
        deadline = time.monotonic() + 10
        while any(job_dir.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [p.name for p in job_dir.iterdir()] == []
    finally:
        engine.shutdown()
    assert not (dirs[0] / "tuned").exists()


def test_a_cancelled_queued_job_holds_nothing(tiny_model_dir, dirs):
    engine = start(tiny_model_dir, dirs)
    try:
        running = engine.jobs.create(request(hyperparameters=Hyperparameters(max_steps=1000, tokens_per_step=48)))
        queued = engine.jobs.create(request("other"))
        assert engine.jobs.cancel(queued.id).status is JobStatus.CANCELLED
        assert set(engine.jobs._prepared) <= {running.id}
        assert [p.name for p in engine.jobs._job_dir(queued.id).iterdir()] == []
        engine.jobs.cancel(running.id)
        wait_for(engine, running.id)
        assert not engine.jobs._prepared
    finally:
        engine.shutdown()


def test_jobs_past_max_active_jobs_are_refused_before_their_dataset_is_read(tiny_model_dir, dirs):
    """Each queued job holds its parsed dataset in memory until it ends: without a cap, a
    caller's queue of large jobs could take the server's memory from inference."""
    engine = unstarted(tiny_model_dir, dirs, max_active_jobs=2)
    try:
        first, second = engine.jobs.create(request("one")), engine.jobs.create(request("two"))
        refusal = (
            r"^2 fine-tuning jobs are queued or running, the most this server holds \(--max-active-jobs 2\): "
            r"wait for one to end, or cancel one$"
        )
        for refused in (request("three"), request("three", training_data="", training_file="no-such-file.jsonl")):
            with pytest.raises(ResourceExhausted, match=refusal):
                engine.jobs.create(refused)
        assert {j.id for j in engine.jobs.list_jobs()} == {first.id, second.id}
        assert sorted(p.name for p in (dirs[1] / jobs_module.STATE_DIR / "jobs").iterdir()) == sorted([first.id, second.id])
        engine.jobs.cancel(second.id)
        assert engine.jobs.create(request("three")).status is JobStatus.QUEUED
    finally:
        engine.shutdown()


def test_a_cancel_while_the_job_ends_cannot_mark_a_published_job_cancelled(tiny_model_dir, dirs, monkeypatch):
    """The adapter is on disk and served once publishing returns: a cancel that arrives before
    the job is recorded as succeeded is refused, and the job ends succeeded with its hash."""
    engine = start(tiny_model_dir, dirs)
    refusals = []
    end = engine.jobs._end

    def cancel_then_end(job_id, error, **changes):
        try:
            refusals.append(engine.jobs.cancel(job_id).status.value)
        except FailedPrecondition as e:
            refusals.append(str(e))
        end(job_id, error, **changes)

    monkeypatch.setattr(engine.jobs, "_end", cancel_then_end)
    try:
        job = wait_for(engine, engine.jobs.create(request()).id)
    finally:
        engine.shutdown()
    assert refusals == [f"job {job.id} is publishing its adapter; it can no longer be cancelled"]
    assert job.status is JobStatus.SUCCEEDED and job.content_hash == content_hash(dirs[0] / "tuned")


def test_coserved_training_memory_stays_within_the_activation_cap(tiny_model_dir, dirs):
    """Micro-batches are cut to what --finetune-activation-bytes keeps; a co-served job with
    an example longer than that is refused at creation (a time-sliced one is not)."""
    probe = start(tiny_model_dir, dirs)
    per_token = probe.engine.coserve.bytes_per_token
    probe.shutdown()
    engine = start(tiny_model_dir, dirs, finetune_activation_bytes=20 * per_token)
    try:
        coserve = engine.engine.coserve
        sizes: list[int] = []
        submit = coserve.submit
        coserve.submit = lambda work, scale: sizes.append(work.num_tokens) or submit(work, scale)
        long_line = json.dumps({"prompt": "Item 99: " + " ".join(["word"] * 30), "completion": " value"})
        # Named by its line in the file, blank lines counted.
        with pytest.raises(InvalidRequest, match=r"training data has 1 invalid line: line 27: has \d+ tokens; .* at most 20 tokens fit"):
            engine.jobs.create(request(training_data=DATA + "\n\n\n" + long_line))
        sliced = engine.jobs.create(request("sliced", training_data=DATA + "\n" + long_line, lora={"r": 8, "lora_dropout": 0.1}))
        assert sliced.status is JobStatus.QUEUED
        engine.jobs.cancel(sliced.id)
        job = wait_for(engine, engine.jobs.create(request()).id)
    finally:
        engine.shutdown()
    assert job.status is JobStatus.SUCCEEDED and job.mode == "coserve"
    assert sizes and max(sizes) <= 20 < 32  # cut below finetune_micro_batch_tokens


def test_a_diverging_job_fails_and_publishes_nothing(tiny_model_dir, tiny_hf_model, dirs):
    """Continuing an adapter whose weights are finite (it is served) but as large as float32
    goes overflows the forward: the job fails with training_diverged and the adapter on disk
    stays as it was."""
    base = make_adapter(tiny_hf_model, dirs[0] / "huge", r=8, target_modules=["q_proj", "v_proj"])
    tensors = load_file(base / WEIGHTS_FILE)
    save_file({k: torch.full_like(v, 3e38) if "lora_A" in k else v for k, v in tensors.items()}, base / WEIGHTS_FILE)
    before = content_hash(base)
    engine = start(tiny_model_dir, dirs)
    try:
        job = engine.jobs.create(request(adapter="huge", base_adapter="huge", lora={}))
        job = wait_for(engine, job.id)
    finally:
        engine.shutdown()
    assert job.status is JobStatus.FAILED and job.error.code == "training_diverged"
    assert job.error.message.startswith("training diverged at step 1: loss ")
    assert content_hash(base) == before and job.content_hash == ""


def test_a_job_store_that_cannot_be_written_fails_the_job_not_the_engine(tiny_model_dir, dirs):
    """With the data disk full, saving the job's progress failed, then saving its failure
    failed too, and that error stopped the engine thread: every request after it was refused."""
    import sqlite3

    class FullDisk:
        def execute(self, *args):
            raise sqlite3.OperationalError("database or disk is full")

    engine = start(tiny_model_dir, dirs)
    store = engine.jobs._store
    database = store._db
    try:
        job = engine.jobs.create(request())
        wait_for(engine, job.id, lambda j: j.status is JobStatus.RUNNING)
        store._db = FullDisk()
        job = wait_for(engine, job.id)
        assert job.status is JobStatus.FAILED and job.error.code == "storage_error"
        assert "database or disk is full" in job.error.message and "free space in the data directory" in job.error.message
        assert engine.failure is None
        store._db = database

        assert len(three_tokens(engine, "after")) == 3
    finally:
        store._db = database
        engine.shutdown()


def test_a_restarted_server_resumes_the_job_and_ends_with_the_same_adapter(tiny_model_dir, tmp_path):
    """Stop the server after step 3 (checkpoints at 2, 4, 6): the restarted one resumes from
    its newest checkpoint and publishes bit-identical weights to an uninterrupted run's."""
    whole = (tmp_path / "a" / "adapters", tmp_path / "a" / "data")
    cut = (tmp_path / "b" / "adapters", tmp_path / "b" / "data")
    for d in (*whole, *cut):
        d.mkdir(parents=True)
    engine = start(tiny_model_dir, whole)
    try:
        uninterrupted = wait_for(engine, engine.jobs.create(request(lora={"r": 8, "lora_dropout": 0.1})).id)
    finally:
        engine.shutdown()

    engine = unstarted(tiny_model_dir, cut)
    try:
        job = engine.jobs.create(request(lora={"r": 8, "lora_dropout": 0.1}))
        run_until_step(engine, job.id, 3)
    finally:
        engine.shutdown()
    # The shutdown checkpoints the last finished step (it went back to step 2 before).
    kept = sorted(p.name for p in (cut[1] / ".tandem" / "jobs" / job.id / "checkpoints").iterdir())
    assert kept == ["step-00000002", "step-00000003"]

    # Restarted (on a copy of its data) with a context shorter than the job's max_seq_length,
    # it could not train its examples: the resume fails saying why, not inside the engine.
    shorter = tmp_path / "shorter"
    shutil.copytree(cut[1], shorter)
    engine = start(tiny_model_dir, (cut[0], shorter), max_model_len=64)
    try:
        failed = wait_for(engine, job.id)
    finally:
        engine.shutdown()
    assert failed.status is JobStatus.FAILED and failed.error.code == "validation_failed"
    assert "max_seq_length 512 exceeds the server's context limit 64 now" in failed.error.message

    engine = unstarted(tiny_model_dir, cut)
    events: list[Job] = []
    try:
        engine.jobs.watch(job.id, events.append)
        engine.start()
        assert engine.jobs.get(job.id).status in (JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.RUNNING)
        resumed = wait_for(engine, job.id)
    finally:
        engine.shutdown()
    # It started from its newest checkpoint (step 3), not from step 0: the first step it
    # reports running is 3, and it trains only the steps after it.
    assert [e.step for e in events if e.status is JobStatus.RUNNING] == [3, 4, 5, 6]
    # lora_dropout: time-sliced (co-serving computes the adapter's delta twice, which dropout would change).
    assert resumed.status is JobStatus.SUCCEEDED and resumed.step == 6 and resumed.mode == "timeslice"
    assert resumed.trained_tokens == uninterrupted.trained_tokens  # the steps after the checkpoint count once
    a, b = load_file(whole[0] / "tuned" / WEIGHTS_FILE), load_file(cut[0] / "tuned" / WEIGHTS_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_continued_job_uses_its_checkpoint_or_the_base_version_it_started_from(tiny_model_dir, tiny_hf_model, tmp_path):
    """A continued job re-read its base adapter's current version on restart: past a
    checkpoint it needs none (a removed base failed the resume), and before one a base
    republished meanwhile was trained on silently (other weights than an uninterrupted run)."""
    roots = {name: (tmp_path / name / "adapters", tmp_path / name / "data") for name in ("whole", "cut", "early")}
    for adapters, data in roots.values():
        data.mkdir(parents=True)
        make_adapter(tiny_hf_model, adapters / "plain", r=8, seed=5)
    continued = dict(base_adapter="plain", lora={})

    def stopped_after(root, step: int, **changes) -> str:
        engine = unstarted(tiny_model_dir, root)
        try:
            job = engine.jobs.create(request(**continued, **changes))
            run_until_step(engine, job.id, step)
        finally:
            engine.shutdown()
        return job.id

    engine = start(tiny_model_dir, roots["whole"])
    try:
        uninterrupted = wait_for(engine, engine.jobs.create(request(**continued)).id)
    finally:
        engine.shutdown()
    cut = stopped_after(roots["cut"], 3)  # checkpoints at 2, 4, 6
    shutil.rmtree(roots["cut"][0] / "plain")
    early = stopped_after(roots["early"], 1, hyperparameters=dataclasses.replace(HP, checkpoint_interval=100))
    # Killed before its first checkpoint: a clean stop writes one at its last finished step.
    shutil.rmtree(roots["early"][1] / ".tandem" / "jobs" / early / "checkpoints")
    make_adapter(tiny_hf_model, roots["early"][0] / "plain", r=8, seed=6)  # republished before the first checkpoint
    for name, job_id in (("cut", cut), ("early", early)):
        engine = start(tiny_model_dir, roots[name])
        try:
            resumed = wait_for(engine, job_id)
        finally:
            engine.shutdown()
        if name == "cut":
            assert resumed.status is JobStatus.SUCCEEDED, resumed.error
            a, b = load_file(roots["whole"][0] / "tuned" / WEIGHTS_FILE), load_file(roots["cut"][0] / "tuned" / WEIGHTS_FILE)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        else:
            assert resumed.status is JobStatus.FAILED and resumed.error.code == "validation_failed"
            assert "base adapter 'plain' changed since the job was created, before its first checkpoint: create the job again" in resumed.error.message
    assert uninterrupted.status is JobStatus.SUCCEEDED


def test_time_sliced_training_keeps_to_its_share_of_the_engine_while_inference_waits(tiny_model_dir, dirs, monkeypatch):
    """timeslice_share 0.25: after a micro-batch of t seconds, inference runs alone for at
    least 3t before the next one; the job still finishes."""
    adapters, data = dirs
    engine = AsyncEngine(EngineConfig(
        model=str(tiny_model_dir), dtype="float32", kv_cache_bytes=16 << 20, adapters_dir=str(adapters), data_dir=str(data),
        max_lora_rank=MAX_RANK, max_num_batched_tokens=32, finetune_micro_batch_tokens=32, adapter_cache_prefault=False,
        finetune_mode="timeslice", timeslice_share=0.25, max_num_seqs=4,
    ))
    trains: list[tuple[float, float]] = []
    steps: list[float] = []
    train, step = engine.engine.train, engine.engine.step

    def timed_train(*args, **kwargs):
        started = time.monotonic()
        result = train(*args, **kwargs)
        trains.append((started, time.monotonic()))
        return result

    def timed_step():
        steps.append(time.monotonic())
        return step()

    monkeypatch.setattr(engine.engine, "train", timed_train)
    monkeypatch.setattr(engine.engine, "step", timed_step)
    params = SamplingParams(temperature=0.0, max_new_tokens=60, ignore_eos=True)

    async def serve_until(job_id: str) -> None:
        """Twice as many streams as sequences run: inference never runs out of work."""

        async def client(i: int) -> None:
            for n in itertools.count():
                if engine.jobs.get(job_id).status.terminal:
                    return
                async for _ in engine.generate([5 + i, 6, 7], params, f"r{i}-{n}"):
                    pass

        await asyncio.gather(*(client(i) for i in range(8)))

    engine.start()
    try:
        job = engine.jobs.create(request(hyperparameters=Hyperparameters(learning_rate=1e-2, max_steps=3, tokens_per_step=48, seed=4)))
        asyncio.run(serve_until(job.id))
        job = wait_for(engine, job.id)
    finally:
        engine.shutdown()
    assert job.status is JobStatus.SUCCEEDED and job.mode == "timeslice"
    paced = [(a, b) for a, b in zip(trains, trains[1:]) if any(a[1] < s < b[0] for s in steps) and b[0] < steps[-1]]
    assert len(paced) >= 3
    for (start, end), (next_start, _) in paced:
        assert next_start - end >= 3 * (end - start)


@pytest.mark.parametrize("share", [0.0, -0.5, 1.5, float("nan")])
def test_a_timeslice_share_outside_zero_to_one_is_refused(share):
    with pytest.raises(ValueError, match="timeslice_share must be in"):
        EngineConfig(timeslice_share=share)


def test_writing_a_dataset_holds_up_neither_the_engine_thread_nor_other_calls(tiny_model_dir, dirs, monkeypatch):
    """The write and sync of a dataset (hundreds of MB take a second) ran under the lock that
    the engine thread takes every iteration and GetJob/ListJobs take on the event loop."""
    engine = start(tiny_model_dir, dirs)
    writing, release = threading.Event(), threading.Event()
    write_file = jobs_module.write_file

    def slow_write(path, data):
        writing.set()
        release.wait(10)
        write_file(path, data)

    monkeypatch.setattr(jobs_module, "write_file", slow_write)
    try:
        creating = threading.Thread(target=engine.jobs.create, args=(request(),))
        creating.start()
        assert writing.wait(30)
        started = time.monotonic()
        engine.jobs.has_work()
        engine.jobs.list_jobs()
        assert time.monotonic() - started < 5  # not blocked behind the held write (10 s)
        with pytest.raises(AlreadyExists, match="is already being trained by a job being created"):
            engine.jobs.create(request())
        release.set()
        creating.join(30)
        assert [job.adapter for job in engine.jobs.list_jobs()] == ["tuned"]
    finally:
        release.set()
        engine.shutdown()


def refusing(store, status: JobStatus):
    """store.save, refusing (as a full disk would) to save a job in `status`."""
    save = store.save

    def save_unless(job: Job) -> None:
        if job.status is status:
            raise StoreUnwritable("could not save the job (simulated: database or disk is full)")
        save(job)

    return save_unless


def test_a_success_the_store_cannot_save_stays_a_success_and_a_restart_saves_it(tiny_model_dir, dirs):
    """Saving SUCCEEDED failed after the adapter was published: the error reached the job's
    failure path, which turned the job FAILED ("nothing was published") with its adapter live.
    It stays SUCCEEDED, keeps its resume files, and the restart saves it."""
    engine = start(tiny_model_dir, dirs)
    engine.jobs._store.save = refusing(engine.jobs._store, JobStatus.SUCCEEDED)
    events: list[Job] = []
    try:
        job = engine.jobs.create(request())
        engine.jobs.watch(job.id, events.append)
        job = wait_for(engine, job.id)
        assert job.status is JobStatus.SUCCEEDED and job.content_hash and engine.failure is None
        assert [e.status for e in events if e.status.terminal] == [JobStatus.SUCCEEDED]
        assert (engine.jobs._job_dir(job.id) / "checkpoints").is_dir()
    finally:
        engine.shutdown()
    engine = start(tiny_model_dir, dirs)
    try:
        again = wait_for(engine, job.id)
        assert again.status is JobStatus.SUCCEEDED and again.content_hash == job.content_hash
        assert not (engine.jobs._job_dir(job.id) / "checkpoints").exists()
    finally:
        engine.shutdown()


def test_a_cancel_the_store_cannot_save_is_refused_and_can_be_tried_again(tiny_model_dir, dirs):
    """The cancel changed the job in memory, then failed to save: the retry answered "already
    ended", and the restart, reading the store, resumed the job and published it."""
    engine = start(tiny_model_dir, dirs)
    store = engine.jobs._store
    save = store.save
    try:
        job = engine.jobs.create(request(hyperparameters=dataclasses.replace(HP, max_steps=100_000)))
        wait_for(engine, job.id, lambda j: j.status is JobStatus.RUNNING)
        store.save = refusing(store, JobStatus.CANCELLED)
        with pytest.raises(StoreUnwritable):
            engine.jobs.cancel(job.id)
        assert engine.jobs.get(job.id).status is JobStatus.RUNNING
        store.save = save
        assert engine.jobs.cancel(job.id).status is JobStatus.CANCELLED
        assert {j.id: j.status for j in store.load_all()}[job.id] is JobStatus.CANCELLED
    finally:
        store.save = save
        engine.shutdown()


def test_a_restart_removes_the_files_no_resume_will_read(tiny_model_dir, dirs):
    """Resume files of a job that ended (a server stopped right after a cancel, or killed
    between saving the end and removing them) and the folder of a job never saved (killed
    inside create) stayed for good."""
    engine = start(tiny_model_dir, dirs)
    try:
        job = wait_for(engine, engine.jobs.create(request()).id)
        folder = engine.jobs._job_dir(job.id)
    finally:
        engine.shutdown()
    (folder / "checkpoints" / "step-00000006").mkdir(parents=True)
    (folder / "train.jsonl").write_text(DATA)
    orphan = folder.parent / "ftjob-never-saved"
    orphan.mkdir()
    (orphan / "train.jsonl").write_text(DATA)
    engine = start(tiny_model_dir, dirs)
    try:
        assert not (folder / "checkpoints").exists() and not (folder / "train.jsonl").exists() and not orphan.exists()
        assert engine.jobs.get(job.id).status is JobStatus.SUCCEEDED
    finally:
        engine.shutdown()


def test_a_job_that_cannot_be_resumed_fails_alone_and_the_next_resumes(tiny_model_dir, dirs, monkeypatch):
    """An unforeseen error re-validating one interrupted job stopped the thread: it and every
    job after it stayed VALIDATING_FILES for good, their watchers waiting."""
    engine = unstarted(tiny_model_dir, dirs)
    try:
        first = engine.jobs.create(request())
        second = engine.jobs.create(request("second"))
        run_until_step(engine, first.id, 1)
    finally:
        engine.shutdown()
    prepare = jobs_module.JobManager._prepare
    calls = []

    def broken_first(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated")
        return prepare(self, *args, **kwargs)

    monkeypatch.setattr(jobs_module.JobManager, "_prepare", broken_first)
    engine = start(tiny_model_dir, dirs)
    try:
        failed, resumed = wait_for(engine, first.id), wait_for(engine, second.id)
    finally:
        engine.shutdown()
    assert failed.status is JobStatus.FAILED and failed.error.code == "internal_error"
    assert failed.error.message == "could not resume after a restart: RuntimeError: simulated"
    assert resumed.status is JobStatus.SUCCEEDED


def test_an_adapters_directory_the_server_cannot_write_stops_the_start_not_a_job(tiny_model_dir, dirs, monkeypatch):
    """A read-only --adapters-dir (a ReadWriteMany volume fsGroup does not reach) was found
    out at a job's publish, after its whole run, which its checkpoints' removal then lost."""
    import os

    adapters = str(dirs[0].resolve())
    mkdir = os.mkdir

    def read_only(path, *args, **kwargs):
        if str(path).startswith(adapters):
            raise PermissionError(13, "Permission denied", str(path))
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    with pytest.raises(ValueError, match=r"fine-tuning publishes into --adapters-dir .*, which this server cannot write \(Permission denied\): give user \d+ write access"):
        unstarted(tiny_model_dir, dirs)


def failing_backward(monkeypatch, failures: set[int]):
    """ModelRunner.backward raising out of memory on the given calls (1-based)."""
    from tandem.server.engine.model_runner import ModelRunner

    backward, calls = ModelRunner.backward, itertools.count(1)

    def flaky(self, work):
        if next(calls) in failures:
            raise torch.OutOfMemoryError("simulated: out of memory in a layer's replay")
        return backward(self, work)

    monkeypatch.setattr(ModelRunner, "backward", flaky)


def test_a_step_whose_iteration_fails_runs_again_and_ends_with_the_uninterrupted_adapter(tiny_model_dir, tmp_path, monkeypatch):
    """A co-served micro-batch shares its iterations with inference: one that failed (out of
    memory on a burst of prompts) failed the job for good, as internal_error."""
    roots = {name: (tmp_path / name / "adapters", tmp_path / name / "data") for name in ("whole", "flaky")}
    for d in (d for pair in roots.values() for d in pair):
        d.mkdir(parents=True)
    engine = start(tiny_model_dir, roots["whole"])
    try:
        whole = wait_for(engine, engine.jobs.create(request()).id)
    finally:
        engine.shutdown()
    failing_backward(monkeypatch, {3, 9})
    engine = start(tiny_model_dir, roots["flaky"])
    try:
        flaky = wait_for(engine, engine.jobs.create(request()).id)
    finally:
        engine.shutdown()
    assert whole.status is flaky.status is JobStatus.SUCCEEDED and flaky.mode == "coserve"
    assert flaky.trained_tokens == whole.trained_tokens  # a step run again counts once
    a, b = load_file(roots["whole"][0] / "tuned" / WEIGHTS_FILE), load_file(roots["flaky"][0] / "tuned" / WEIGHTS_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_step_that_keeps_failing_fails_its_job_and_the_engine_serves_on(tiny_model_dir, dirs, monkeypatch):
    failing_backward(monkeypatch, set(range(1, 10_000)))
    engine = start(tiny_model_dir, dirs)
    try:
        job = wait_for(engine, engine.jobs.create(request()).id)
        assert job.status is JobStatus.FAILED and job.error.code == "internal_error" and job.step == 0
        assert "simulated: out of memory in a layer's replay" in job.error.message and engine.failure is None

        assert len(three_tokens(engine, "after")) == 3
    finally:
        engine.shutdown()


def test_a_checkpoint_that_cannot_be_written_does_not_end_the_job(tiny_model_dir, dirs, monkeypatch):
    """A full data disk at a checkpoint failed the job and removed the checkpoints it had; at
    the last step, with its trained weights, which the adapters directory would have taken."""
    save = jobs_module.checkpoints.save

    def full_at_step_two(folder, step, files, state, **kwargs):
        if step in (2, 6):
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(folder, step, files, state, **kwargs)

    monkeypatch.setattr(jobs_module.checkpoints, "save", full_at_step_two)
    engine = start(tiny_model_dir, dirs)
    try:
        job = wait_for(engine, engine.jobs.create(request()).id)
    finally:
        engine.shutdown()
    assert job.status is JobStatus.SUCCEEDED and job.step == 6
    assert job.content_hash == content_hash(dirs[0] / "tuned")


def test_a_checkpoint_is_written_while_training_and_serving_go_on(tiny_model_dir, dirs, monkeypatch):
    """The engine thread wrote each checkpoint itself (its fsyncs 0.1-0.2 s on a local disk,
    seconds on a network volume), and every running request waited for it."""
    save, release = jobs_module.checkpoints.save, threading.Event()

    def slow_disk(folder, step, files, state):
        if step == 2:
            release.wait(60)
        return save(folder, step, files, state)

    monkeypatch.setattr(jobs_module.checkpoints, "save", slow_disk)
    engine = start(tiny_model_dir, dirs)
    try:
        job_id = engine.jobs.create(request()).id
        try:
            assert wait_until(lambda: engine.jobs.get(job_id).step >= 3, timeout=30), "training waited for the checkpoint's write"

            assert len(three_tokens(engine, "during")) == 3  # served while step 2's checkpoint is still being written
            assert not (engine.jobs._job_dir(job_id) / "checkpoints" / "step-00000002").exists()
        finally:
            release.set()
        job = wait_for(engine, job_id)
    finally:
        engine.shutdown()
    assert job.status is JobStatus.SUCCEEDED and job.content_hash == content_hash(dirs[0] / "tuned")


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_publish_keeps_the_trained_weights_where_its_error_says(tiny_model_dir, tiny_hf_model, dirs, monkeypatch):
    """The job ended FAILED and its end removed its checkpoints: the only copy of what it had
    trained, though its error said to publish it on a server that could."""
    engine = start(tiny_model_dir, dirs)
    monkeypatch.setattr(engine.engine.registry, "publish", disk_full)
    try:
        job = wait_for(engine, engine.jobs.create(request()).id)
        folder = engine.jobs._job_dir(job.id)
    finally:
        engine.shutdown()
    kept = folder / "checkpoints" / "step-00000006"
    assert job.status is JobStatus.FAILED and job.error.code == "publish_failed"
    assert job.error.message.startswith(f"could not publish adapter 'tuned' (its trained weights are kept in {kept}: copy that directory")
    assert "No space left on device" in job.error.message
    assert [p.name for p in (folder / "checkpoints").iterdir()] == [kept.name] and not (folder / "train.jsonl").exists()
    PeftModel.from_pretrained(copy.deepcopy(tiny_hf_model), str(kept))  # a PEFT adapter as it stands
    engine = start(tiny_model_dir, dirs)  # a restart removes ended jobs' files, not these
    try:
        assert engine.jobs.get(job.id).status is JobStatus.FAILED and kept.is_dir()
    finally:
        engine.shutdown()


def test_reading_jobs_does_not_wait_for_a_job_being_saved(tiny_model_dir, dirs):
    """Each step's save (a SQLite commit with a sync) ran under the lock that GetJob, ListJobs
    and WatchJob take on the event loop: a slow disk paused every stream on the replica."""
    engine = unstarted(tiny_model_dir, dirs)
    try:
        job = engine.jobs.create(request())
        store = engine.jobs._store
        saving, release = threading.Event(), threading.Event()
        save = store.save

        def slow_save(saved: Job) -> None:
            saving.set()
            release.wait(10)
            save(saved)

        store.save = slow_save
        updating = threading.Thread(target=engine.jobs._update, args=(job.id,), kwargs={"train_loss": 1.5})
        updating.start()
        assert saving.wait(10)
        started = time.monotonic()
        seen = []
        assert engine.jobs.get(job.id).train_loss is None and len(engine.jobs.list_jobs()) == 1
        stop = engine.jobs.watch(job.id, seen.append)
        assert time.monotonic() - started < 5  # not behind the held save (10 s)
        release.set()
        updating.join(10)
        stop()
        assert [j.train_loss for j in seen] == [None, 1.5] and engine.jobs.get(job.id).train_loss == 1.5
        # A cancel (an API thread's) saves durably, as slowly: reads go on beside it too.
        saving.clear()
        release.clear()
        cancelling = threading.Thread(target=engine.jobs.cancel, args=(job.id,))
        cancelling.start()
        assert saving.wait(10)
        started = time.monotonic()
        assert engine.jobs.get(job.id).status is JobStatus.QUEUED and len(engine.jobs.list_jobs()) == 1
        assert time.monotonic() - started < 5
        release.set()
        cancelling.join(10)
        assert engine.jobs.get(job.id).status is JobStatus.CANCELLED
    finally:
        release.set()
        engine.shutdown()


def test_a_job_whose_caller_gave_up_is_not_created(tiny_model_dir, dirs):
    """CreateJob's deadline passed while a large dataset was read: the job was created anyway,
    trained for nobody, and the caller's retry was refused as ALREADY_EXISTS."""
    engine = unstarted(tiny_model_dir, dirs)
    try:
        gone = threading.Event()
        gone.set()
        with pytest.raises(FailedPrecondition, match="the call that would create a job for adapter 'tuned' was cancelled: no job was created"):
            engine.jobs.create(request(), gone)
        assert engine.jobs.list_jobs() == [] and not any((engine.jobs.state_dir / "jobs").iterdir())
        assert engine.jobs.create(request(), threading.Event()).status is JobStatus.QUEUED  # the retry
    finally:
        engine.shutdown()


def test_a_failed_publish_the_store_cannot_save_is_published_by_the_restart(tiny_model_dir, dirs, monkeypatch):
    """Saving publish_failed failed too: the error reached the job's failure path, which ended
    it again and removed its dataset; the restart, reading RUNNING from the store, resumed it
    without its dataset and removed the checkpoint its error said was kept."""
    engine = start(tiny_model_dir, dirs)
    engine.jobs._store.save = refusing(engine.jobs._store, JobStatus.FAILED)
    monkeypatch.setattr(engine.engine.registry, "publish", disk_full)
    try:
        job = wait_for(engine, engine.jobs.create(request()).id)
        folder = engine.jobs._job_dir(job.id)
        assert job.status is JobStatus.FAILED and job.error.code == "publish_failed" and engine.failure is None
        assert (folder / "train.jsonl").exists() and (folder / "checkpoints" / "step-00000006").is_dir()
    finally:
        engine.shutdown()
    engine = start(tiny_model_dir, dirs)  # the store says RUNNING: it resumes at its last step and publishes
    try:
        again = wait_for(engine, job.id)
    finally:
        engine.shutdown()
    assert again.status is JobStatus.SUCCEEDED and again.content_hash == content_hash(dirs[0] / "tuned")
    assert not (folder / "checkpoints").exists() and not (folder / "train.jsonl").exists()


def test_a_job_resumed_under_a_lower_max_lora_rank_fails_saying_why(tiny_model_dir, dirs):
    """Created with lora.r 8 under --max-lora-rank 16 and resumed under 4: the resume did not
    check the rank again, and the job trained to its end only to fail its publish."""
    job = stopped_after_step_one(tiny_model_dir, dirs)
    engine = start(tiny_model_dir, dirs, max_lora_rank=4)
    try:
        failed = wait_for(engine, job.id)
    finally:
        engine.shutdown()
    assert failed.status is JobStatus.FAILED and failed.error.code == "validation_failed" and failed.step == 1
    assert failed.error.message == (
        "could not resume after a restart: lora.r 8 is above the server's --max-lora-rank 4: the adapter could not be served"
    )
    assert not (dirs[0] / "tuned").exists()


def test_an_end_the_store_could_not_save_is_saved_by_the_next_save(tiny_model_dir, dirs):
    """The store refused a job's success once (a disk full for a moment): it kept the job
    running for good, and a restart resumed it and published its weights again, over those
    of a later job for the same adapter."""
    engine = start(tiny_model_dir, dirs)
    store = engine.jobs._store
    save = store.save
    try:
        store.save = refusing(store, JobStatus.SUCCEEDED)
        first = wait_for(engine, engine.jobs.create(request()).id)
        store.save = save
        later = wait_for(engine, engine.jobs.create(request(hyperparameters=dataclasses.replace(HP, seed=5))).id)
        assert first.status is later.status is JobStatus.SUCCEEDED and first.content_hash != later.content_hash
        assert {j.id: j.status for j in store.load_all()} == {first.id: JobStatus.SUCCEEDED, later.id: JobStatus.SUCCEEDED}
    finally:
        store.save = save
        engine.shutdown()
    engine = start(tiny_model_dir, dirs)
    try:
        assert wait_for(engine, first.id).status is JobStatus.SUCCEEDED
    finally:
        engine.shutdown()
    assert content_hash(dirs[0] / "tuned") == later.content_hash


def test_an_end_the_store_could_not_save_is_saved_at_shutdown(tiny_model_dir, dirs):
    engine = start(tiny_model_dir, dirs)
    store = engine.jobs._store
    save = store.save
    try:
        store.save = refusing(store, JobStatus.SUCCEEDED)
        job = wait_for(engine, engine.jobs.create(request()).id)
    finally:
        store.save = save
        engine.shutdown()
    assert job.status is JobStatus.SUCCEEDED
    assert [j.status for j in JobStore(dirs[1] / ".tandem").load_all()] == [JobStatus.SUCCEEDED]


def test_a_store_that_cannot_save_at_start_up_does_not_stop_the_server(tiny_model_dir, dirs, monkeypatch):
    """Saving an interrupted job's VALIDATING_FILES as the server started raised out of the
    start on a full data disk: the server crash-looped, and inference was down with it."""
    job = stopped_after_step_one(tiny_model_dir, dirs)

    def full(store, saved: Job) -> None:
        raise StoreUnwritable("could not save the job (simulated: database or disk is full)")

    monkeypatch.setattr(jobs_module.JobStore, "save", full)
    engine = start(tiny_model_dir, dirs)
    try:
        failed = wait_for(engine, job.id)
        assert failed.status is JobStatus.FAILED and failed.error.code == "storage_error" and engine.failure is None

        assert len(three_tokens(engine, "after")) == 3
    finally:
        engine.shutdown()


def test_a_shutdown_in_the_final_eval_checkpoints_the_last_step(tiny_model_dir, dirs, monkeypatch):
    """The trainer counts its last step done before that step's eval, and the shutdown
    checkpoint skipped a done trainer: a stop during the final eval lost the steps since the
    last interval's checkpoint, trained again after the restart."""
    engine = unstarted(tiny_model_dir, dirs)
    loss, in_final_eval = engine.engine.loss, threading.Event()

    def held_in_final_eval(work):
        trainer = engine.jobs._running.trainer
        if trainer.step == trainer.total_steps:
            in_final_eval.set()
            wait_until(lambda: engine._stopping, 120)  # no public sign that shutdown has begun
        return loss(work)

    monkeypatch.setattr(engine.engine, "loss", held_in_final_eval)
    try:
        job = engine.jobs.create(request(hyperparameters=dataclasses.replace(HP, checkpoint_interval=4, eval_fraction=0.2)))
        engine.start()
        assert in_final_eval.wait(60)
    finally:
        engine.shutdown()
    kept = sorted(p.name for p in (engine.jobs._job_dir(job.id) / "checkpoints").iterdir())
    assert kept == ["step-00000004", "step-00000006"]
    resumed, events = restarted(tiny_model_dir, dirs, job.id)
    running = [e for e in events if e.status is JobStatus.RUNNING]
    assert resumed.status is JobStatus.SUCCEEDED and [e.step for e in running] == [6, 6]
    # The final eval, cut by the shutdown, ran at the restart: the job ends with step 6's eval loss, not step 4's.
    assert running[0].eval_loss != running[-1].eval_loss == resumed.eval_loss


def test_a_shutdown_in_an_eval_runs_that_eval_after_the_restart(tiny_model_dir, tmp_path, monkeypatch):
    """The shutdown checkpointed the step whose eval it cut, and the restart went on from the
    step after it: that eval point was lost for good, the job showing the eval loss before it
    until the next one. It runs first after the restart, as in an uninterrupted job."""
    roots = {name: (tmp_path / name / "adapters", tmp_path / name / "data") for name in ("whole", "cut")}
    for d in (d for root in roots.values() for d in root):
        d.mkdir(parents=True)
    hp = dataclasses.replace(HP, eval_fraction=0.2)  # eval points at steps 2, 4, 6

    def eval_losses(events: list[Job]) -> dict[int, float]:
        """The eval loss the job showed once each step's report was in (its last event at that step)."""
        return {e.step: e.eval_loss for e in events if e.status is JobStatus.RUNNING}

    engine = unstarted(tiny_model_dir, roots["whole"])
    whole: list[Job] = []
    try:
        engine.jobs.watch(engine.jobs.create(request(hyperparameters=hp)).id, whole.append)
        engine.start()
        wait_for(engine, whole[0].id)
    finally:
        engine.shutdown()

    engine = unstarted(tiny_model_dir, roots["cut"])
    loss, in_eval = engine.engine.loss, threading.Event()

    def held_in_step_4_eval(work):
        if engine.jobs._running.trainer.step == 4:
            in_eval.set()
            wait_until(lambda: engine._stopping, 120)  # no public sign that shutdown has begun
        return loss(work)

    monkeypatch.setattr(engine.engine, "loss", held_in_step_4_eval)
    try:
        job = engine.jobs.create(request(hyperparameters=hp))
        engine.start()
        assert in_eval.wait(60)
    finally:
        engine.shutdown()
    kept = sorted(p.name for p in (engine.jobs._job_dir(job.id) / "checkpoints").iterdir())
    assert kept == ["step-00000002", "step-00000004"]
    resumed, events = restarted(tiny_model_dir, roots["cut"], job.id)
    assert resumed.status is JobStatus.SUCCEEDED
    expected = eval_losses(whole)
    assert eval_losses(events) == {step: expected[step] for step in (4, 5, 6)}
    assert resumed.trained_tokens == whole[-1].trained_tokens


def test_a_continued_adapter_keeps_its_init_seed_after_a_resume_too(tiny_model_dir, tmp_path):
    """An adapter trained here records the seed of its initial A, which a compress codes A
    against (A coded whole lost most of its task accuracy). A continuation's A is that draw
    plus a move too, yet it was published without the seed: compressed, it lost that accuracy."""
    root = (tmp_path / "adapters", tmp_path / "data")
    for d in root:
        d.mkdir(parents=True)
    short = dataclasses.replace(HP, max_steps=3)
    engine = start(tiny_model_dir, root)
    try:
        assert wait_for(engine, engine.jobs.create(request("seeded", hyperparameters=short)).id).status is JobStatus.SUCCEEDED
        assert engine.engine.registry.get("seeded").a_init_seed == HP.seed
        continued = wait_for(engine, engine.jobs.create(request("continued", base_adapter="seeded", lora={}, hyperparameters=short)).id)
        assert continued.status is JobStatus.SUCCEEDED and engine.engine.registry.get("continued").a_init_seed == HP.seed
    finally:
        engine.shutdown()
    engine = unstarted(tiny_model_dir, root)
    try:
        # A different job seed: the continuation's init seed is its base's, not its own.
        cut = engine.jobs.create(request("cut", base_adapter="seeded", lora={}, hyperparameters=dataclasses.replace(HP, seed=9)))
        run_until_step(engine, cut.id, 3)
    finally:
        engine.shutdown()
    assert (engine.jobs._job_dir(cut.id) / "checkpoints" / "step-00000003").is_dir()  # the resume reads no base
    engine = start(tiny_model_dir, root)
    try:
        assert wait_for(engine, cut.id).status is JobStatus.SUCCEEDED
        assert engine.engine.registry.get("cut").a_init_seed == HP.seed
    finally:
        engine.shutdown()
    store = JobStore(root[1] / ".tandem")
    record = next(j for j in store.load_all() if j.id == cut.id).to_dict()
    store.close()
    del record["base_a_init_seed"]
    assert Job.from_dict(record).base_a_init_seed is None  # a record saved before the field still loads


@pytest.mark.parametrize("r, lora_alpha, use_rslora", [(7, 29, False), (8, 32, True)])
def test_a_continued_adapter_keeps_its_own_lora_alpha_and_use_rslora(tiny_model_dir, tiny_hf_model, dirs, r, lora_alpha, use_rslora):
    """Its alpha was derived back from its scale with the plain rule: 29 at r 7 came out as
    29.000000000000004, so restating the base's own lora_alpha was refused as disagreeing and
    the continuation published the odd number; an rsLoRA base's published use_rslora false
    with alpha 90.5 where it said true and 32."""
    make_adapter(tiny_hf_model, dirs[0] / "base", r=r, lora_alpha=lora_alpha, use_rslora=use_rslora)
    engine = start(tiny_model_dir, dirs)
    try:
        job = engine.jobs.create(request(base_adapter="base", lora={"lora_alpha": float(lora_alpha)}, hyperparameters=dataclasses.replace(HP, max_steps=2)))
        assert (job.lora.r, job.lora.lora_alpha, job.lora.use_rslora) == (r, lora_alpha, use_rslora)
        assert wait_for(engine, job.id).status is JobStatus.SUCCEEDED
        with pytest.raises(InvalidRequest, match=rf"disagrees with base adapter 'base' \(r {r}, lora_alpha {lora_alpha}{', use_rslora true' if use_rslora else ''}, "):
            engine.jobs.create(request("other", base_adapter="base", lora={"use_rslora": not use_rslora}))
    finally:
        engine.shutdown()
    config = json.loads((dirs[0] / "tuned" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (r, lora_alpha, use_rslora)


def test_a_cancel_removes_the_job_s_files_without_holding_up_the_engine_thread(tiny_model_dir, dirs, monkeypatch):
    """A queued job's cancel removed its dataset and checkpoints under the lock that each
    step's save takes: the engine thread, and inference with it, waited for the removal."""
    engine = unstarted(tiny_model_dir, dirs)
    removing, release = threading.Event(), threading.Event()
    remove = engine.jobs._remove_resume_files

    def slow_remove(job_id: str) -> None:
        removing.set()
        release.wait(10)
        remove(job_id)

    monkeypatch.setattr(engine.jobs, "_remove_resume_files", slow_remove)
    try:
        cancelled, other = engine.jobs.create(request()), engine.jobs.create(request("other"))
        cancelling = threading.Thread(target=engine.jobs.cancel, args=(cancelled.id,))
        cancelling.start()
        assert removing.wait(10)
        # What the engine thread does at every step.
        stepping = threading.Thread(target=engine.jobs._update, args=(other.id,), kwargs={"train_loss": 1.5})
        stepping.start()
        stepping.join(5)
        assert not stepping.is_alive() and engine.jobs.get(other.id).train_loss == 1.5
        release.set()
        cancelling.join(10)
        assert engine.jobs.get(cancelled.id).status is JobStatus.CANCELLED
        assert [p.name for p in engine.jobs._job_dir(cancelled.id).iterdir()] == []
    finally:
        release.set()
        engine.shutdown()
