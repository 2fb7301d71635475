"""A live progress line on a terminal: requests done of the planned count (or seconds of the
planned duration), in flight, failed. Off a terminal it prints nothing until the point ends."""

import sys
import time
from typing import TextIO

BAR_WIDTH = 24


class Progress:
    def __init__(self, label: str, total: int | None, duration: float | None, stream: TextIO = sys.stderr,
                 enabled: bool = True):
        self.label, self.total, self.duration, self.stream = label, total, duration, stream
        self.live = enabled and stream.isatty()
        self.done = self.running = self.failed = 0
        self._start = time.monotonic()
        self._shown = 0.0

    def update(self, done: int, running: int, failed: int) -> None:
        self.done, self.running, self.failed = done, running, failed
        now = time.monotonic()
        if self.live and now - self._shown >= 0.1:
            self._shown = now
            self.stream.write("\r" + self.line() + "\x1b[K")
            self.stream.flush()

    def fraction(self) -> float:
        elapsed = time.monotonic() - self._start
        shares = []
        if self.total:
            shares.append(self.done / self.total)
        if self.duration:
            shares.append(elapsed / self.duration)
        return min(1.0, max(shares, default=0.0))

    def line(self) -> str:
        filled = int(self.fraction() * BAR_WIDTH)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        elapsed = time.monotonic() - self._start
        planned = f"/{self.total}" if self.total else ""
        return f"{self.label:>18} [{bar}] {self.done}{planned} done, {self.running} running, {self.failed} failed, {elapsed:.1f} s"

    def close(self) -> None:
        if self.live:
            self.stream.write("\r" + self.line() + "\x1b[K\n")
            self.stream.flush()
