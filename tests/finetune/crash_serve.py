"""`tandem serve` with a crash point, for the SIGKILL tests: the n-th durable file write
whose path contains a given text writes half of its bytes, creates a marker file and hangs
there, so the test can SIGKILL the server in the middle of that write.

    python -m tests.finetune.crash_serve MATCH N MARKER serve --model ... (tandem's arguments)
"""

import sys
import time
from pathlib import Path

from tandem.server import atomic_files
from tandem.server.cli import main as tandem


def install(match: str, nth: int, marker: Path) -> None:
    write = atomic_files._write_synced
    seen = 0

    def crashing(path: Path, data: bytes) -> None:
        nonlocal seen
        if match in str(path):
            seen += 1
            if seen == nth:
                with open(path, "wb") as f:
                    f.write(data[: len(data) // 2])
                marker.touch()
                time.sleep(3600)
        write(path, data)

    atomic_files._write_synced = crashing


if __name__ == "__main__":
    match, nth, marker, *argv = sys.argv[1:]
    install(match, int(nth), Path(marker))
    sys.exit(tandem(argv))
