"""A job's checkpoints: a PEFT adapter (loadable by peft as it stands), or a router's files
for a gate-training job, plus the trainer's state, one directory per optimizer step, each
written all-or-nothing.

    <job dir>/checkpoints/step-00000040/adapter_config.json      (router_config.json)
                                       /adapter_model.safetensors (router_gates.safetensors)
                                       /trainer_state.pt      (optimizer, schedule, step)

A directory named step-* is complete by construction (it appears by one rename), so the
newest one is always a good place to resume from; older ones beyond `keep` are removed.
"""

import io
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from tandem.server.atomic_files import make_directories, remove_leftovers, write_directory

STATE_FILE = "trainer_state.pt"
_PREFIX = "step-"


def save(checkpoints: Path, step: int, files: dict[str, bytes], state: dict, keep: int = 2) -> Path:
    """Write the checkpoint after `step` (files: what is trained, as its own files); returns its directory."""
    make_directories(checkpoints)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = checkpoints / f"{_PREFIX}{step:08d}"
    write_directory(path, {**files, STATE_FILE: buffer.getvalue()})
    for old in _all(checkpoints)[:-keep]:
        for file in old.iterdir():
            file.unlink()
        old.rmdir()
    return path


class Writer:
    """Writes checkpoints on a thread of its own, one at a time. The engine thread, which
    serves every request between micro-batches, only copies what a checkpoint holds and goes
    back to serving: the write with its fsyncs (0.1-0.2 s for SmolLM2's rank-16 adapter and
    its optimizer state on a local disk, seconds on a network volume) stalled every running
    request. A checkpoint waits for the one before it: a disk slower than the steps holds
    training back, not memory."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None

    def submit(self, write: Callable[[], None]) -> None:
        """Run write (which handles its own errors) once the previous one has finished."""
        self.wait()
        self._thread = threading.Thread(target=write, name="tandem-checkpoint", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Until the checkpoint in flight, if any, is written (or its write has failed)."""
        thread = self._thread
        if thread is not None:
            thread.join()


def latest(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint, after clearing what interrupted writes left."""
    if not checkpoints.is_dir():
        return None
    remove_leftovers(checkpoints)
    found = _all(checkpoints)
    return found[-1] if found else None


def load(path: Path, weights_file: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The trained tensors (in weights_file) and the trainer state of a checkpoint."""
    tensors = load_safetensors((path / weights_file).read_bytes())
    state = torch.load(io.BytesIO((path / STATE_FILE).read_bytes()), weights_only=True)
    return tensors, state


def _all(checkpoints: Path) -> list[Path]:
    return sorted(p for p in checkpoints.iterdir() if p.name.startswith(_PREFIX) and p.is_dir())


def step_of(checkpoint: Path) -> int:
    """The step a checkpoint was written after."""
    return int(checkpoint.name.removeprefix(_PREFIX))
