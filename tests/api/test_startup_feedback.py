"""Start-up says what it is doing: the server logs each load phase with its duration and no
library progress bars, and `tandem health --wait` shows what it is waiting for."""

import io
import logging
from collections.abc import Iterator

import pytest
import transformers
from tqdm import tqdm

from tandem.server.cli import main
from tandem.server.config import EngineConfig
from tandem.server.engine.llm_engine import Engine
from tandem.server.load_phases import PHASES, load_phase
from tandem.server.logging_setup import JsonFormatter, TerminalHandler
from tests.api.conftest import KV_CACHE_BYTES, loopback
from tests.api.harness import ServerThread

READY = "tandem.v1.GenerationService"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def loading_server() -> Iterator[ServerThread]:
    """Up, but with no engine: readiness stays NOT_SERVING."""
    thread = ServerThread(loopback(), None)
    yield thread
    thread.stop()


def test_health_wait_writes_a_line_per_change_off_a_terminal(loading_server, capsys):
    code = main(["health", "--service", READY, "--wait", "1.2", "--target", loading_server.target])
    out, err = capsys.readouterr()
    assert (code, out) == (1, "NOT_SERVING\n")  # stdout stays the bare status, for scripts
    assert err == f"waiting for {READY}: NOT_SERVING\n"


def test_health_wait_redraws_one_line_on_a_terminal(loading_server, capsys, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert main(["health", "--wait", "1.2", "--service", READY, "--target", loading_server.target]) == 1
    drawn = terminal.getvalue()
    assert drawn.startswith(f"\rwaiting for {READY}: NOT_SERVING, 0 s of 1\x1b[K")
    assert drawn.count("\r") >= 2 and drawn.endswith("\x1b[K\n")  # redrawn in place, then ended


def test_load_phases_are_logged_in_order_with_their_durations(tiny_model_dir, caplog, capfd, monkeypatch):
    """A progress bar drawn while the weights load (transformers draws a raw tqdm bar while
    it dequantises GGUF tensors) never reaches the server's stderr."""
    original = transformers.AutoModelForCausalLM.from_pretrained

    def with_a_progress_bar(*args, **kwargs):
        for _ in tqdm(range(50), desc="Converting and de-quantizing GGUF tensors..."):
            pass
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", with_a_progress_bar)
    caplog.set_level(logging.INFO, logger="tandem.load")
    Engine.from_config(EngineConfig(model=str(tiny_model_dir), dtype="float32", kv_cache_bytes=KV_CACHE_BYTES))
    lines = [r.fields for r in caplog.records if r.name == "tandem.load"]
    assert [(line["phase"], line["state"]) for line in lines] == [(p, s) for p in PHASES for s in ("started", "done")]
    assert [line["step"] for line in lines if line["state"] == "done"] == ["1/4", "2/4", "3/4", "4/4"]
    assert all(line["seconds"] >= 0 for line in lines if line["state"] == "done")
    err = capfd.readouterr().err
    assert "de-quantizing" not in err and "\r" not in err


def test_serve_on_a_terminal_shows_the_phase_under_way_as_one_live_line(monkeypatch):
    """The phase's start is redrawn in place; the line that it is done replaces it, as JSON."""
    terminal = Terminal()
    handler = TerminalHandler(terminal)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tandem.load")
    monkeypatch.setattr(logger, "handlers", [handler])
    monkeypatch.setattr(logger, "propagate", False)
    monkeypatch.setattr(logger, "level", logging.INFO)
    with load_phase("read"):
        pass
    _, live, done = terminal.getvalue().split("\r")
    assert live == "loading the model: read (1/4)\x1b[K"
    assert done.startswith("\x1b[K{") and '"state": "done"' in done and done.endswith("}\n")


def test_text_logs_quote_a_field_a_caller_chose_so_it_cannot_forge_a_line():
    from tandem.server.logging_setup import TextFormatter

    record = logging.LogRecord("tandem.request", logging.INFO, __file__, 1, "request", None, None)
    record.fields = {"adapter": "x\n2026-01-01 00:00:00 INFO forged: admin login", "status": "OK", "path": "a b"}
    line = TextFormatter().format(record)
    assert "\n" not in line
    assert line.endswith('adapter="x\\n2026-01-01 00:00:00 INFO forged: admin login" status=OK path="a b"')


def test_a_live_line_wider_than_the_terminal_is_cut_to_fit(monkeypatch):
    """\r returns to the start of a wrapped line's last row only: `finetune watch`'s ~146
    characters scrolled a new row at every redraw on an 80-column terminal."""
    import os

    from tandem.client.live_line import LiveLine

    class Sized(Terminal):
        def fileno(self) -> int:
            return 99

    monkeypatch.setattr(os, "get_terminal_size", lambda fd: os.terminal_size((80, 24)) if fd == 99 else os.terminal_size((500, 24)))
    terminal = Sized()
    LiveLine(terminal).show("x" * 146)
    assert terminal.getvalue() == "\r" + "x" * 79 + "\x1b[K"
    unsized = Terminal()  # no terminal size to read: the whole line
    LiveLine(unsized).show("x" * 146)
    assert unsized.getvalue() == "\r" + "x" * 146 + "\x1b[K"
