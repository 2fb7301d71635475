"""A `tandem serve` child process for benchmarks: started on free ports, waited for until its
generation service answers SERVING, and never left behind when the start fails."""

import json
import subprocess
import sys
import time
from pathlib import Path

from tandem.client import TandemClient, TandemRpcError

REPO = Path(__file__).resolve().parents[1]
# Generous: on a shared machine the model load may wait behind other work.
START_TIMEOUT_S = 900


def start_server(root: Path, args: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, dict]:
    """`tandem serve --host 127.0.0.1 --port 0 --metrics-port 0 <args>` logging to root/server.log;
    (process, its "listening" log record: port, http_port, ...)."""
    log = root / "server.log"
    command = [sys.executable, "-m", "tandem.server.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", *args]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=env)
    try:
        return process, _wait_ready(process, log)
    except BaseException:
        process.kill()
        raise


def _wait_ready(process: subprocess.Popen, log: Path) -> dict:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        listening = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{") and '"listening"' in line]
        if listening:
            with TandemClient(f"127.0.0.1:{listening[0]['port']}", max_retries=0, timeout=30) as client:
                while not _serving(client):
                    assert process.poll() is None, log.read_text()[-2000:]
                    time.sleep(0.2)
            return listening[0]
        assert process.poll() is None, log.read_text()[-2000:]
        time.sleep(0.2)
    raise RuntimeError(f"the server did not start within {START_TIMEOUT_S} s")


def _serving(client: TandemClient) -> bool:
    try:
        return client.health("tandem.v1.GenerationService") == "SERVING"
    except TandemRpcError:  # a busy machine: the probe's deadline passed
        return False


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(60)
