"""One status line that keeps a terminal informed: redrawn in place on a terminal, written as
a new line only when it changes elsewhere (a log file, a pipe)."""

import os
from typing import TextIO


class LiveLine:
    def __init__(self, stream: TextIO):
        self._stream = stream
        self.live = stream.isatty()
        self._last = ""

    def show(self, line: str) -> None:
        if self.live:
            # \r back to the start, \x1b[K clears what a longer previous line left. Cut to
            # the terminal's width: \r returns only to the start of a wrapped line's last row,
            # so a wider line scrolled a new row at every redraw.
            width = self._width()
            self._stream.write(f"\r{line if width is None else line[: width - 1]}\x1b[K")
            self._stream.flush()
        elif line != self._last:
            print(line, file=self._stream, flush=True)
        self._last = line

    def _width(self) -> int | None:
        """Columns of the terminal the stream writes to (None: a stream with no terminal size)."""
        try:
            return os.get_terminal_size(self._stream.fileno()).columns
        except (OSError, ValueError, AttributeError):
            return None

    def clear(self) -> None:
        """Wipes the live line, so that other output takes its place."""
        if self.live and self._last:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
        self._last = ""

    def close(self) -> None:
        """Ends the live line, so that what follows starts on a line of its own."""
        if self.live and self._last:
            self._stream.write("\n")
            self._stream.flush()
