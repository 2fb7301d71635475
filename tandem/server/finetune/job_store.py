"""Jobs survive restarts: one SQLite file in the data directory, one row per job.

SQLite commits are atomic and, with synchronous=FULL, durable: a kill mid-update leaves the
previous row. The store is shared by API threads and the engine thread, behind one lock.
"""

import json
import sqlite3
import threading
from pathlib import Path

from tandem.server.errors import ResourceExhausted
from tandem.server.finetune.job import Job

STORE_FILE = "jobs.sqlite"


class StoreUnwritable(ResourceExhausted):
    """The store could not be written (a full disk, most likely): RESOURCE_EXHAUSTED to a caller."""


class JobStore:
    def __init__(self, data_dir: Path):
        self._db = sqlite3.connect(data_dir / STORE_FILE, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, created_at REAL, record TEXT)")

    def save(self, job: Job) -> None:
        """Insert or replace the job's row; StoreUnwritable when it cannot be written."""
        with self._lock:
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO jobs (id, created_at, record) VALUES (?, ?, ?)",
                    (job.id, job.created_at, json.dumps(job.to_dict())),
                )
            except (sqlite3.Error, OSError) as exc:
                raise StoreUnwritable(f"could not save job {job.id} in the data directory's {STORE_FILE} ({exc})") from exc

    def load_all(self) -> list[Job]:
        """Every job, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT record FROM jobs ORDER BY created_at, id").fetchall()
        return [Job.from_dict(json.loads(record)) for (record,) in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
