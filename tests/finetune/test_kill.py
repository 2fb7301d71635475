"""SIGKILL in the middle of a checkpoint write and in the middle of publishing: afterwards
no file is half-written where a reader looks, the job resumes from its last complete
checkpoint at restart, and its final adapter equals an uninterrupted run's."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file

from tandem.server.adapters.peft_format import WEIGHTS_FILE, content_hash
from tandem.server import atomic_files
from tandem.server.atomic_files import TEMP_PREFIX
from tandem.server.finetune.job import Job, JobStatus
from tandem.v1 import finetuning_pb2, finetuning_pb2_grpc
from tests.adapters.make_adapters import make_adapter
from tests.finetune.test_jobs import DATA, request, start, unstarted, wait_for

REPO = Path(__file__).resolve().parents[2]


def reference_adapter(model_dir: Path, root: Path) -> dict[str, torch.Tensor]:
    """The adapter an uninterrupted job makes (in-process)."""
    dirs = (root / "adapters", root / "data")
    for d in dirs:
        d.mkdir(parents=True)
    engine = start(model_dir, dirs)
    try:
        assert wait_for(engine, engine.jobs.create(request()).id).status is JobStatus.SUCCEEDED
    finally:
        engine.shutdown()
    return load_file(dirs[0] / "tuned" / WEIGHTS_FILE)


def crash_server(model_dir: Path, dirs: tuple[Path, Path], match: str, nth: int, marker: Path) -> tuple[subprocess.Popen, int]:
    """A server (its own process) that hangs in its nth write matching `match`; returns it and its port."""
    port_file = marker.with_suffix(".port")
    args = [
        sys.executable, "-m", "tests.finetune.crash_serve", match, str(nth), str(marker),
        "serve", "--model", str(model_dir), "--dtype", "float32", "--host", "127.0.0.1", "--port", "0",
        "--metrics-port", "0", "--http-port", "0", "--kv-cache-bytes", str(16 << 20), "--adapters-dir", str(dirs[0]),
        "--data-dir", str(dirs[1]), "--max-lora-rank", "16", "--max-num-batched-tokens", "32", "--finetune-micro-batch-tokens", "32",
    ]
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(port_file, "w"), text=True)
    end = time.monotonic() + 60
    while time.monotonic() < end:
        for line in port_file.read_text().splitlines():
            if line.startswith("{") and json.loads(line).get("msg") == "listening":
                return process, json.loads(line)["port"]
        time.sleep(0.05)
    process.kill()
    raise AssertionError("the server did not start listening")


def create_job(port: int) -> str:
    """CreateJob over gRPC (the same job as tests.finetune.test_jobs.request()), once ready."""
    hp = request().hyperparameters
    message = finetuning_pb2.CreateJobRequest(
        adapter="tuned", training_data=DATA, lora=finetuning_pb2.LoraConfig(r=8, lora_alpha=16),
        hyperparameters=finetuning_pb2.Hyperparameters(
            learning_rate=hp.learning_rate, max_steps=hp.max_steps, tokens_per_step=hp.tokens_per_step,
            checkpoint_interval=hp.checkpoint_interval, seed=hp.seed,
        ),
    )
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = finetuning_pb2_grpc.FineTuningServiceStub(channel)
        end = time.monotonic() + 60
        while True:
            try:
                return stub.CreateJob(message, timeout=30).job.id
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > end:
                    raise
                time.sleep(0.1)


def kill_at_marker(process: subprocess.Popen, marker: Path) -> None:
    end = time.monotonic() + 120
    while not marker.exists():
        assert process.poll() is None, "the server exited before reaching the crash point"
        assert time.monotonic() < end, "the crash point was never reached"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(10)


def resume(model_dir: Path, dirs: tuple[Path, Path], job_id: str, from_step: int | None = None) -> None:
    """Restart in-process and run the job to its end. from_step: the checkpoint step it must
    resume from (the first step it reports running), not a retraining from step 0."""
    engine = unstarted(model_dir, dirs)
    events: list[Job] = []
    try:
        engine.jobs.watch(job_id, events.append)
        engine.start()
        job = wait_for(engine, job_id)
    finally:
        engine.shutdown()
    assert job.status is JobStatus.SUCCEEDED and job.step == job.total_steps == 6
    if from_step is not None:
        assert [e.step for e in events if e.status is JobStatus.RUNNING] == list(range(from_step, 7))


def leftovers(directory: Path) -> list[Path]:
    return list(directory.rglob(f"{TEMP_PREFIX}*"))


@pytest.fixture
def dirs(tmp_path) -> tuple[Path, Path]:
    adapters, data = tmp_path / "run" / "adapters", tmp_path / "run" / "data"
    adapters.mkdir(parents=True)
    data.mkdir(parents=True)
    return adapters, data


def test_kill_during_a_checkpoint_write(tiny_model_dir, tmp_path, dirs):
    expected = reference_adapter(tiny_model_dir, tmp_path / "reference")
    marker = tmp_path / "crashed"
    # A checkpoint writes adapter_config.json, adapter_model.safetensors, trainer_state.pt:
    # the 5th write is the second checkpoint's (after step 4) weights file.
    process, port = crash_server(tiny_model_dir, dirs, "checkpoints", 5, marker)
    try:
        job_id = create_job(port)
        kill_at_marker(process, marker)
    finally:
        process.kill()
    checkpoints = dirs[1] / ".tandem" / "jobs" / job_id / "checkpoints"
    assert [p.name for p in checkpoints.iterdir() if not p.name.startswith(TEMP_PREFIX)] == ["step-00000002"]
    assert leftovers(checkpoints), "the kill should have left a partial write behind"

    resume(tiny_model_dir, dirs, job_id, from_step=2)  # the newest complete checkpoint, not the partial step 4
    assert not checkpoints.exists()  # gone with the job's end, the partial write with them
    got = load_file(dirs[0] / "tuned" / WEIGHTS_FILE)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_kill_during_publishing_keeps_the_old_version_whole(tiny_model_dir, tiny_hf_model, tmp_path, dirs):
    expected = reference_adapter(tiny_model_dir, tmp_path / "reference")
    old = make_adapter(tiny_hf_model, dirs[0] / "tuned", r=4, seed=9)
    old_hash = content_hash(old)
    marker = tmp_path / "crashed"
    # Writes under the adapters directory happen only when publishing.
    process, port = crash_server(tiny_model_dir, dirs, str(dirs[0]), 1, marker)
    try:
        job_id = create_job(port)
        kill_at_marker(process, marker)
    finally:
        process.kill()
    assert content_hash(old) == old_hash  # readers still see the old version, whole
    assert leftovers(dirs[0])

    resume(tiny_model_dir, dirs, job_id)
    got = load_file(dirs[0] / "tuned" / WEIGHTS_FILE)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert sorted(p.name for p in dirs[0].iterdir() if not p.name.startswith(TEMP_PREFIX)) == ["tuned"]


def test_directories_for_durable_files_are_synced_into_their_parents(tmp_path, monkeypatch):
    """A file fsynced into a new directory is lost with it after a power failure unless the
    directory's own entry was fsynced into its parent (a job's dataset, its first checkpoint)."""
    synced = []
    monkeypatch.setattr(atomic_files, "fsync_dir", lambda path: synced.append(path))
    (tmp_path / "jobs").mkdir()
    atomic_files.make_directories(tmp_path / "jobs" / "ftjob-1" / "checkpoints")
    assert (tmp_path / "jobs" / "ftjob-1" / "checkpoints").is_dir()
    assert synced == [tmp_path / "jobs", tmp_path / "jobs" / "ftjob-1"]
    atomic_files.make_directories(tmp_path / "jobs")
    assert len(synced) == 2
