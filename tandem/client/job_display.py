"""How the `tandem finetune` commands show jobs: a live progress line on a terminal, one line
per change anywhere else (a log stays readable), a table, and the last word on an ended job."""

import time
from dataclasses import asdict
from typing import Any, TextIO

from tandem.client.live_line import LiveLine
from tandem.client.types import FinetuneJob

BAR_WIDTH = 24
TIMES = ("created_at", "started_at", "finished_at", "estimated_finish")


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _clock(seconds: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else "-"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _eta(job: FinetuneJob, now: float) -> str:
    if job.status != "running" or not job.estimated_finish:
        return "-"
    return _duration(max(0.0, job.estimated_finish - now))


def progress_line(job: FinetuneJob, now: float) -> str:
    """Status, step/total, train and eval loss, speed and time left, in one line."""
    return (
        f"{job.status}  step {job.step}/{job.total_steps}  train {_loss(job.train_loss)}  "
        f"eval {_loss(job.eval_loss)}  {job.tokens_per_second:.0f} tok/s  eta {_eta(job, now)}{_share(job)}"
    )


def _share(job: FinetuneJob) -> str:
    """A running co-served job's share of the token budget, and the inference tokens the
    server ran beside its last step."""
    if job.mode != "coserve" or job.status != "running":
        return ""
    tokens = job.step_iteration_tokens
    beside = f", last step beside {tokens.get('decode', 0) + tokens.get('prefill', 0):.0f} inference tokens" if tokens else ""
    return f"  share {job.finetune_share:.0%}{beside}"


def progress_bar(job: FinetuneJob, width: int = BAR_WIDTH) -> str:
    done = min(width, width * job.step // job.total_steps) if job.total_steps else 0
    return "[" + "#" * done + "." * (width - done) + "]"


class ProgressDisplay:
    """Shows each snapshot of a job on `stream`: a bar and the progress line, redrawn on a
    terminal; elsewhere the line alone, whenever it changed."""

    def __init__(self, stream: TextIO):
        self._line = LiveLine(stream)

    def show(self, job: FinetuneJob) -> None:
        line = progress_line(job, time.time())
        self._line.show(f"{progress_bar(job)} {line}" if self._line.live else line)

    def close(self) -> None:
        self._line.close()


def outcome(job: FinetuneJob) -> str:
    """The final status, with the published version or the reason it failed."""
    if job.status == "succeeded":
        return f"succeeded: adapter {job.adapter} published, content hash {job.content_hash}"
    if job.status == "failed" and job.error is not None:
        return f"failed: {job.error.code}: {job.error.message}"
    return job.status


def job_table(jobs: list[FinetuneJob]) -> list[str]:
    rows = [("ID", "ADAPTER", "STATUS", "STEP", "LOSS", "CREATED")]
    rows += [(j.id, j.adapter, j.status, f"{j.step}/{j.total_steps}", _loss(j.train_loss), _clock(j.created_at)) for j in jobs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]


def _shown(key: str, value: Any) -> str:
    if key in TIMES:
        return _clock(value)
    if key == "error" and value is not None:
        return f"{value['code']}: {value['message']}"
    if isinstance(value, dict):
        return " ".join(f"{name}={_shown(name, item)}" for name, item in value.items())
    if isinstance(value, list):
        return ",".join(value)
    return "-" if value in (None, "") else str(value)


def job_details(job: FinetuneJob) -> list[str]:
    return [f"{key:18} {_shown(key, value)}" for key, value in asdict(job).items()]
