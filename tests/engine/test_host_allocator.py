"""keep_freed_memory: a CPU engine's per-step tensors are not faulted in again each step."""

import os
import subprocess
import sys

import pytest

# Page faults per step of the training head (25 MB chunk buffers, SmolLM2's vocabulary) on the
# main thread, after warm-up steps; with glibc's defaults its freed blocks went back to the
# kernel and were faulted in again on every step.
PROBE = """
import resource, sys, torch
from tandem.server.engine.host_allocator import keep_freed_memory
from tandem.kernels.linear_cross_entropy import linear_cross_entropy
if sys.argv[1] == "kept":
    assert keep_freed_memory()
torch.manual_seed(0)
weight = torch.randn(49152, 64)
hidden = torch.randn(256, 64, requires_grad=True)
targets = torch.randint(0, 49152, (256,))
def step():
    linear_cross_entropy(hidden * 1.0, weight, targets, lambda h: h @ weight.T).backward()
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
"""


def faults_per_step(mode: str, processes: int = 3) -> float:
    """The fewest over a few processes, each with one malloc arena. With more, about one
    process in three also faulted 8 MB a step whatever the settings (2048 faults; 0 in the
    others): a block freed by one of torch's worker threads emptied a secondary arena's heap,
    which glibc unmaps whatever its thresholds, and that says nothing about the settings
    keep_freed_memory makes (with MALLOC_ARENA_MAX=1, 0-16 faults a step in 8 runs)."""
    env = {**os.environ, "MALLOC_ARENA_MAX": "1"}
    runs = [subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env) for _ in range(processes)]
    return min(float(out.stdout) for out in runs)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_kept_for_the_next_step() -> None:
    default, kept = faults_per_step("default"), faults_per_step("kept")
    assert kept < default / 4, f"page faults per step: {kept} with freed memory kept, {default} with glibc's defaults"
