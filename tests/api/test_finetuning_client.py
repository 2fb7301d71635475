"""Fine-tuning jobs through TandemClient and AsyncTandemClient, against a real server on the
tiny model: create, watch to the end, serve the result; list, get, cancel; refusals as
status codes."""

import asyncio
import json
import re
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from tandem.client import AsyncTandemClient, FinetuneJob, TandemClient, TandemRpcError
from tandem.server.api.finetuning_service import FineTuningServicer
from tandem.server.engine.async_engine import AsyncEngine
from tandem.server.finetune.job import Job, JobStatus
from tandem.server.finetune.trainable_adapter import LoRASpec
from tandem.server.finetune.trainer import Hyperparameters
from tandem.v1 import finetuning_pb2
from tests.api.conftest import loopback, start_engine
from tests.api.harness import ServerThread

INFERENCE_TOKEN = "inference-token-7a3e"
ADMIN_TOKEN = "admin-token-c95f"
LINES = [{"prompt": f"Q: {i} plus one?\nA:", "completion": f" {i + 1}"} for i in range(6)]
# A handful of optimizer steps of a few examples each: the job ends in well under a second.
QUICK = {"max_steps": 3, "tokens_per_step": 64, "learning_rate": 1e-2, "eval_fraction": 0.2, "seed": 1}
# Minutes of steps, far more than any test waits for: the job is still queued or running when
# cancelled.
ENDLESS = {"max_steps": 10_000, "tokens_per_step": 64}
PROMPT = [101, 2020, 345, 7777, 12]


def rpc_error(call) -> TandemRpcError:
    with pytest.raises(TandemRpcError) as info:
        call()
    return info.value


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ft-data")


@pytest.fixture(scope="module")
def ft_engine(tiny_model_dir, tmp_path_factory, data_dir) -> Iterator[AsyncEngine]:
    adapters = tmp_path_factory.mktemp("ft-adapters")
    engine = start_engine(tiny_model_dir, adapters_dir=str(adapters), data_dir=str(data_dir), max_lora_rank=16)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def ft_server(ft_engine) -> Iterator[ServerThread]:
    thread = ServerThread(loopback(), ft_engine)
    yield thread
    thread.stop()


@pytest.fixture
def ft_client(ft_server) -> Iterator[TandemClient]:
    with TandemClient(ft_server.target, timeout=60) as c:
        yield c


def test_create_watch_and_serve_the_adapter(ft_client):
    job = ft_client.create_finetune_job(
        "ft-quick", training_data=LINES, lora={"r": 4, "target_modules": "q_proj,v_proj"}, hyperparameters=QUICK
    )
    assert isinstance(job, FinetuneJob) and job.id.startswith("ftjob-") and job.adapter == "ft-quick"
    assert job.status in ("queued", "running") and job.total_steps == 3 and job.created_at > 0
    assert (job.num_examples, job.num_eval_examples) == (5, 1)
    assert job.lora["r"] == 4 and job.lora["lora_alpha"] == 8 and job.lora["target_modules"] == ["q_proj", "v_proj"]
    assert job.hyperparameters["max_steps"] == 3 and job.hyperparameters["lr_scheduler"] == "linear"

    snapshots = list(ft_client.watch_finetune_job(job.id))
    final = snapshots[-1]
    assert [s.status for s in snapshots].count("succeeded") == 1 and final.status == "succeeded" and final.ended
    assert not any(s.ended for s in snapshots[:-1])
    steps = [s.step for s in snapshots]
    assert steps == sorted(steps) and final.step == 3
    assert final.train_loss is not None and final.eval_loss is not None and final.error is None
    assert final.trained_tokens > 0 and final.finished_at >= final.started_at >= final.created_at
    assert len(final.content_hash) == 64 and final.estimated_finish == 0

    published = {a.name: a for a in ft_client.list_adapters()}["ft-quick"]
    assert published.content_hash == final.content_hash and published.rank == 4
    tuned = ft_client.generate(prompt_token_ids=PROMPT, adapter="ft-quick", max_new_tokens=3, logprobs=1)
    base = ft_client.generate(prompt_token_ids=PROMPT, max_new_tokens=3, logprobs=1)
    assert tuned.generated_tokens == 3 and tuned.logprobs[0].logprob != base.logprobs[0].logprob

    assert ft_client.get_finetune_job(job.id) == final
    assert job.id in [j.id for j in ft_client.list_finetune_jobs()]


def test_async_client_from_a_training_file(ft_server, data_dir):
    (data_dir / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in LINES))

    async def scenario() -> tuple[FinetuneJob, list[FinetuneJob], FinetuneJob, list[FinetuneJob]]:
        async with AsyncTandemClient(ft_server.target, timeout=60) as client:
            job = await client.create_finetune_job("ft-async", training_file="train.jsonl", hyperparameters=QUICK)
            snapshots = [s async for s in client.watch_finetune_job(job.id)]
            return job, snapshots, await client.get_finetune_job(job.id), await client.list_finetune_jobs()

    job, snapshots, fetched, listed = asyncio.run(scenario())
    assert snapshots[-1].status == "succeeded" and fetched == snapshots[-1]
    assert listed[0].id == job.id  # newest first
    assert job.lora["r"] == 16 and len(job.lora["target_modules"]) == 7  # the server's defaults


def test_cancel_and_one_job_per_adapter_name(ft_client):
    job = ft_client.create_finetune_job("ft-busy", training_data=LINES, hyperparameters=ENDLESS)
    try:
        error = rpc_error(lambda: ft_client.create_finetune_job("ft-busy", training_data=LINES, hyperparameters=QUICK))
        assert error.code == grpc.StatusCode.ALREADY_EXISTS and job.id in error.message
    finally:
        cancelled = ft_client.cancel_finetune_job(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at > 0 and cancelled.ended
    assert [s.status for s in ft_client.watch_finetune_job(job.id)] == ["cancelled"]
    assert ft_client.get_finetune_job(job.id).status == "cancelled"
    assert "ft-busy" not in {a.name for a in ft_client.list_adapters()}  # nothing published
    error = rpc_error(lambda: ft_client.cancel_finetune_job(job.id))
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION and "already ended" in error.message
    # The name is free again once its job ended.
    again = ft_client.create_finetune_job("ft-busy", training_data=LINES, hyperparameters=QUICK)
    assert list(ft_client.watch_finetune_job(again.id))[-1].status == "succeeded"


def test_jobs_are_listed_a_page_at_a_time(ft_client, ft_engine, ft_server, monkeypatch):
    """Every job went in one reply, past the 4 MB message limit at ~10,000 jobs, and a
    request had no field to ask for less."""
    from tandem.client import convert
    from tandem.v1 import finetuning_pb2, finetuning_pb2_grpc

    for i in range(3):
        ft_client.cancel_finetune_job(ft_client.create_finetune_job(f"ft-page-{i}", training_data=LINES, hyperparameters=ENDLESS).id)
    newest_first = [j.id for j in ft_engine.jobs.list_jobs()]
    monkeypatch.setattr(convert, "LIST_PAGE_SIZE", 2)
    assert [j.id for j in ft_client.list_finetune_jobs()] == newest_first and len(newest_first) >= 3
    with grpc.insecure_channel(ft_server.target) as channel:
        list_jobs = finetuning_pb2_grpc.FineTuningServiceStub(channel).ListJobs
        first = list_jobs(finetuning_pb2.ListJobsRequest(page_size=2))
        assert [j.id for j in first.jobs] == newest_first[:2] and first.next_page_token == newest_first[1]
        rest = list_jobs(finetuning_pb2.ListJobsRequest(page_token=first.next_page_token))
        assert [j.id for j in rest.jobs] == newest_first[2:] and rest.next_page_token == ""
        assert [j.id for j in list_jobs(finetuning_pb2.ListJobsRequest()).jobs] == newest_first  # 0: every job, as before
        with pytest.raises(grpc.RpcError) as refused:
            list_jobs(finetuning_pb2.ListJobsRequest(page_token="ftjob-none"))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "list again from the first page" in refused.value.details()


def test_refusals(ft_client):
    bad = json.dumps(LINES[0]) + "\nnot json\n" + json.dumps({"prompt": "no completion"}) + "\n"
    error = rpc_error(lambda: ft_client.create_finetune_job("ft-bad", training_data=bad))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "line 2: not valid JSON" in error.message and 'line 3: missing "completion"' in error.message
    for call in (ft_client.get_finetune_job, ft_client.cancel_finetune_job, lambda i: list(ft_client.watch_finetune_job(i))):
        error = rpc_error(partial(call, "ftjob-nope"))
        assert error.code == grpc.StatusCode.NOT_FOUND and "ftjob-nope" in error.message
    error = rpc_error(lambda: ft_client.create_finetune_job("ft-missing", training_file="absent.jsonl"))
    assert error.code == grpc.StatusCode.NOT_FOUND and "absent.jsonl" in error.message
    error = rpc_error(lambda: ft_client.create_finetune_job("ft-bad", training_data=LINES, lora={"r": 64}))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and "--max-lora-rank" in error.message
    with pytest.raises(ValueError, match="exactly one"):
        ft_client.create_finetune_job("ft-bad", training_file="train.jsonl", training_data=LINES)
    with pytest.raises(ValueError, match="no_such_setting"):
        ft_client.create_finetune_job("ft-bad", training_data=LINES, hyperparameters={"no_such_setting": 1})  # type: ignore[typeddict-unknown-key]
    assert "ft-bad" not in [j.adapter for j in ft_client.list_finetune_jobs()]


def test_fine_tuning_off_without_a_data_dir(client):
    error = rpc_error(client.list_finetune_jobs)
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION and "--data-dir" in error.message


@pytest.fixture(scope="module")
def ft_auth_server(ft_engine, tmp_path_factory) -> Iterator[ServerThread]:
    tokens = tmp_path_factory.mktemp("ft-auth") / "tokens"
    tokens.write_text(f"inference {INFERENCE_TOKEN}\nadmin {ADMIN_TOKEN}\n")
    thread = ServerThread(loopback(auth_tokens_file=str(tokens)), ft_engine)
    yield thread
    thread.stop()


def test_fine_tuning_needs_the_admin_role(ft_auth_server):
    with TandemClient(ft_auth_server.target, token=INFERENCE_TOKEN) as user:
        assert rpc_error(user.list_finetune_jobs).code == grpc.StatusCode.PERMISSION_DENIED
        error = rpc_error(lambda: user.create_finetune_job("ft-user", training_data=LINES))
        assert error.code == grpc.StatusCode.PERMISSION_DENIED
        assert rpc_error(lambda: list(user.watch_finetune_job("ftjob-x"))).code == grpc.StatusCode.PERMISSION_DENIED
    with TandemClient(ft_auth_server.target, token=ADMIN_TOKEN) as admin:
        assert isinstance(admin.list_finetune_jobs(), list)


def test_a_coserved_job_shows_in_the_metrics(ft_client, ft_server):
    job = ft_client.create_finetune_job("ft-metrics", training_data=LINES, lora={"r": 4}, hyperparameters=QUICK)
    final = list(ft_client.watch_finetune_job(job.id))[-1]
    assert final.status == "succeeded" and final.mode == "coserve"
    assert final.step_iteration_tokens["train_forward"] > 0 and "decode" in final.step_iteration_tokens
    url = f"http://127.0.0.1:{ft_server.server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    for kind in ("train_forward", "train_backward"):
        value = re.search(rf'^tandem:iteration_tokens_by_kind_total{{kind="{kind}",model_name="[^"]*"}} (\S+)$', text, re.M)
        assert value and float(value.group(1)) > 0, kind
    assert re.search(r'^tandem:finetune_share\{model_name="[^"]*"\} \S+$', text, re.M)
    assert re.search(r'^tandem:finetune_activation_bytes\{model_name="[^"]*"\} 0\.0$', text, re.M)  # nothing held after
    assert re.search(r'^tandem:finetune_jobs\{model_name="[^"]*",state="succeeded"\} [1-9]', text, re.M)
    assert re.search(r'^tandem:finetune_tokens_total\{model_name="[^"]*"\} [1-9]', text, re.M)


def test_a_watch_does_not_hold_up_a_drain(ft_engine):
    """A watch lasts as long as its job: counted as work in flight, it made every drain run
    out its grace (30 s by default) and then some."""
    thread = ServerThread(loopback(), ft_engine)
    try:
        with TandemClient(thread.target, timeout=60) as client:
            job = client.create_finetune_job("watched", training_data=LINES, hyperparameters=ENDLESS)
            watch = client.watch_finetune_job(job.id)
            next(watch)
            started = time.monotonic()
            assert thread.submit(thread.server.drain(grace=20)).result(30) is True
            assert time.monotonic() - started < 15  # not the drain's 20 s grace
    finally:
        ft_engine.jobs.cancel(job.id)
        thread.close()


def test_a_slow_watcher_gets_the_newest_state_then_the_last_not_a_backlog():
    """A watch queued every step's state for a client that read slower than the job stepped,
    until the job ended; it now holds the newest only, and the job's end always comes."""
    job = Job("j1", "a", "", LoRASpec(), Hyperparameters(), status=JobStatus.RUNNING, total_steps=1000)
    watchers = []

    class Jobs:
        def watch(self, job_id, callback):
            watchers.append(callback)
            callback(job)
            return lambda: watchers.remove(callback)

    @contextmanager
    def admit():
        yield SimpleNamespace(jobs=Jobs())

    async def watch() -> list[tuple[int, int]]:
        stream = FineTuningServicer(SimpleNamespace(admit=admit)).WatchJob(SimpleNamespace(id="j1"), None)
        seen = [await anext(stream)]
        for step in range(1, 1001):  # the job steps while the client reads nothing
            watchers[0](job.replace(step=step))
        watchers[0](job.replace(step=1000, status=JobStatus.SUCCEEDED))
        seen += [response async for response in stream]
        return [(r.job.step, r.job.status) for r in seen]

    seen = asyncio.run(watch())
    assert len(seen) == 2 and seen[0][0] == 0 and seen[1][0] == 1000
    assert seen[1][1] == finetuning_pb2.JOB_STATUS_SUCCEEDED and not watchers
