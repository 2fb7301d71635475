"""`tandem finetune` against a real server on the tiny model: create --watch, list, get,
cancel, watch, exit codes, env twins, --help; and the progress display on its own."""

import io
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tandem.client import FinetuneJob, FinetuneJobError, TandemClient
from tandem.client.cli import _follow
from tandem.client.job_display import ProgressDisplay, job_table
from tandem.server.cli import main
from tandem.server.engine.async_engine import AsyncEngine
from tests.api.conftest import loopback, start_engine
from tests.api.harness import ServerThread

LINES = [{"prompt": f"Say {word}:", "completion": f" {word}"} for word in ("red", "green", "blue", "cyan", "pink")]
QUICK = ["--max-steps", "2", "--tokens-per-step", "64", "--r", "4"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def ft_engine(tiny_model_dir, tmp_path_factory) -> Iterator[AsyncEngine]:
    adapters, data = tmp_path_factory.mktemp("cli-adapters"), tmp_path_factory.mktemp("cli-data")
    engine = start_engine(tiny_model_dir, adapters_dir=str(adapters), data_dir=str(data), max_lora_rank=16)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def ft_server(ft_engine) -> Iterator[ServerThread]:
    thread = ServerThread(loopback(), ft_engine)
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli-local") / "train.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in LINES))
    return path


def test_create_watch_prints_the_content_hash(ft_server, dataset, capsys):
    code, out, err = run(capsys, "finetune", "create", "colors", "--data", str(dataset), "--watch", *QUICK, "--target", ft_server.target)
    assert code == 0, err
    with TandemClient(ft_server.target) as client:
        published = {a.name: a for a in client.list_adapters()}["colors"]
    assert out.strip() == f"succeeded: adapter colors published, content hash {published.content_hash}"
    assert "step 2/2" in err and err.strip().splitlines()[-1].startswith("succeeded")  # one plain line per change

    code, out, _ = run(capsys, "finetune", "list", "--json", "--target", ft_server.target)
    jobs = json.loads(out)
    assert code == 0 and jobs[0]["adapter"] == "colors" and jobs[0]["status"] == "succeeded"
    assert jobs[0]["content_hash"] == published.content_hash and jobs[0]["lora"]["r"] == 4

    code, out, _ = run(capsys, "finetune", "get", jobs[0]["id"], "--target", ft_server.target)
    assert code == 0 and jobs[0]["id"] in out and "succeeded" in out
    code, out, _ = run(capsys, "finetune", "list", "--target", ft_server.target)
    header, row = out.splitlines()[:2]
    assert header.split() == ["ID", "ADAPTER", "STATUS", "STEP", "LOSS", "CREATED"]
    assert row.split()[:4] == [jobs[0]["id"], "colors", "succeeded", "2/2"]


def test_hyperparameters_from_the_environment(ft_server, dataset, capsys, monkeypatch):
    monkeypatch.setenv("TANDEM_TARGET", ft_server.target)
    monkeypatch.setenv("TANDEM_MAX_STEPS", "1")
    monkeypatch.setenv("TANDEM_TARGET_MODULES", "q_proj,v_proj")
    code, out, err = run(capsys, "finetune", "create", "env-twins", "--data", str(dataset), "--json", "--tokens-per-step", "64")
    job = json.loads(out)
    assert code == 0, err
    assert job["hyperparameters"]["max_steps"] == 1 and job["lora"]["target_modules"] == ["q_proj", "v_proj"]
    code, out, _ = run(capsys, "finetune", "watch", job["id"])
    assert code == 0 and out.startswith("succeeded")


def test_cancel_then_watch_exits_1(ft_server, dataset, capsys):
    argv = ["finetune", "create", "endless", "--data", str(dataset), "--max-steps", "10000", "--tokens-per-step", "64"]
    code, out, _ = run(capsys, *argv, "--json", "--target", ft_server.target)
    job_id = json.loads(out)["id"]
    assert code == 0
    assert run(capsys, "finetune", "cancel", job_id, "--target", ft_server.target)[:2] == (0, f"{job_id}: cancelled\n")
    code, out, _ = run(capsys, "finetune", "watch", job_id, "--target", ft_server.target)
    assert (code, out) == (1, "cancelled\n")
    code, _, err = run(capsys, "finetune", "cancel", job_id, "--target", ft_server.target)
    assert code == 10 + 9 and "FAILED_PRECONDITION" in err


def test_errors_exit_10_plus_the_status_code(ft_server, tmp_path, capsys):
    code, _, err = run(capsys, "finetune", "get", "ftjob-unknown", "--target", ft_server.target)
    assert code == 10 + 5 and "NOT_FOUND" in err and "ftjob-unknown" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(LINES[0]) + "\n{oops\n")
    code, _, err = run(capsys, "finetune", "create", "bad", "--data", str(bad), "--target", ft_server.target)
    assert code == 10 + 3 and "line 2" in err
    code, _, err = run(capsys, "finetune", "create", "bad", "--data", str(tmp_path / "absent.jsonl"), "--target", ft_server.target)
    assert code == 1 and "absent.jsonl" in err
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(json.dumps(LINES[0]).encode() + b"\n" + '{"text": "café"}'.encode("latin-1") + b"\n")
    code, _, err = run(capsys, "finetune", "create", "bad", "--data", str(latin1), "--target", ft_server.target)
    assert code == 1 and "line 2 is not UTF-8" in err


def test_finetune_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["finetune", "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    assert all(action in out for action in ("create", "list", "get", "watch", "cancel"))
    with pytest.raises(SystemExit) as info:
        main(["finetune", "create", "x"])  # neither --training-file nor --data
    assert info.value.code == 2 and "--training-file" in capsys.readouterr().err
    # Numbers the proto's unsigned fields cannot hold are refused naming the flag.
    for flag, value in (("--r", "-1"), ("--seed", "-5"), ("--max-steps", str(2**32))):
        with pytest.raises(SystemExit) as info:
            main(["finetune", "create", "x", "--training-file", "d.jsonl", flag, value])
        assert info.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


def make_job(**changes) -> FinetuneJob:
    job = FinetuneJob(
        id="ftjob-1", adapter="a", base_adapter="", status="running", created_at=1_700_000_000, started_at=1_700_000_001,
        finished_at=0, estimated_finish=0, step=3, total_steps=12, num_examples=40, num_eval_examples=0,
        trained_tokens=900, train_loss=1.25, eval_loss=None, tokens_per_second=812.4, error=None, content_hash="",
        lora={}, hyperparameters={},
    )
    return replace(job, **changes)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_live_progress_on_a_terminal():
    terminal = Terminal()
    display = ProgressDisplay(terminal)
    display.show(make_job(estimated_finish=2**40))
    display.show(make_job(step=12, status="succeeded", train_loss=0.5))
    display.close()
    first, second = terminal.getvalue().split("\r")[1:]
    assert first.startswith("[######" + "." * 18 + "] running  step 3/12  train 1.2500  eval -  812 tok/s  eta ")
    assert second == "[" + "#" * 24 + "] succeeded  step 12/12  train 0.5000  eval -  812 tok/s  eta -\x1b[K\n"


def test_plain_progress_writes_a_line_per_change():
    log = io.StringIO()
    display = ProgressDisplay(log)
    for job in (make_job(), make_job(), make_job(step=4)):
        display.show(job)
    display.close()
    assert [line.split("  ")[1] for line in log.getvalue().splitlines()] == ["step 3/12", "step 4/12"]


def test_a_coserved_job_shows_its_share_and_the_inference_beside_its_last_step():
    log = io.StringIO()
    display = ProgressDisplay(log)
    split = {"decode": 410.0, "prefill": 1200.0, "train_forward": 512.0, "train_head": 512.0, "train_backward": 512.0}
    display.show(make_job(mode="coserve", finetune_share=0.42, step_iteration_tokens=split))
    display.show(make_job(mode="timeslice", step=4))
    display.close()
    coserved, sliced = log.getvalue().splitlines()
    assert coserved.endswith("  share 42%, last step beside 1610 inference tokens")
    assert "share" not in sliced


class FakeClient:
    def __init__(self, *snapshots: FinetuneJob):
        self.snapshots = snapshots

    def watch_finetune_job(self, job_id: str, timeout: float | None = None) -> Iterator[FinetuneJob]:
        return iter(self.snapshots)


def test_a_failed_job_exits_1_with_its_reason(capsys):
    failed = make_job(status="failed", error=FinetuneJobError("training_diverged", "the loss became NaN at step 4", ""))
    assert _follow(FakeClient(make_job(), failed), "ftjob-1", as_json=False) == 1  # type: ignore[arg-type]
    assert capsys.readouterr().out == "failed: training_diverged: the loss became NaN at step 4\n"
    assert job_table([failed])[1].split()[:5] == ["ftjob-1", "a", "failed", "3/12", "1.2500"]
