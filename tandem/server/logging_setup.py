"""Process-wide logging: one JSON object per line (or plain text for terminals).

Structured fields travel in `extra={"fields": {...}}`, so the request log line is
machine-readable without string parsing. On a terminal, start-up progress is one live line.
"""

import json
import logging
import sys
import time
from typing import TextIO

from tandem.client.live_line import LiveLine


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        suffix = " ".join(f"{k}={_text_field(v)}" for k, v in fields.items())
        return f"{super().format(record)} {suffix}".rstrip()


def _text_field(value: object) -> object:
    """A string a caller chose (an adapter name, a request id) quoted and escaped where it has
    spaces or control characters: a newline in one forged a log line of its own."""
    return json.dumps(value) if isinstance(value, str) and (not value.isprintable() or " " in value) else value


class TerminalHandler(logging.StreamHandler):
    """stderr on a terminal: a record logged with extra={"live": True} (a start-up phase under
    way) is a status line redrawn in place; any other record wipes it and is written as usual."""

    def __init__(self, stream: TextIO):
        super().__init__(stream)
        self._line = LiveLine(stream)

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "live", False):
            self._line.show(record.getMessage())
            return
        self._line.clear()
        super().emit(record)


def configure_logging(fmt: str, level: str) -> None:
    handler = TerminalHandler(sys.stderr) if sys.stderr.isatty() else logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
