"""The one test of an allocation's refusal, which the engine and the adapter registry answer
RESOURCE_EXHAUSTED (clients retry) and everything else INTERNAL."""

import errno

import pytest
import torch

from tandem.server.out_of_memory import out_of_memory


@pytest.mark.parametrize("exc, refused", [
    (MemoryError(), True),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes"), True),
    (RuntimeError("CUDA error: out of memory"), True),
    (OSError(errno.ENOMEM, "Cannot allocate memory"), True),
    (OSError(errno.ENOSPC, "No space left on device"), False),
    (RuntimeError("shape mismatch"), False),
    (ValueError("out of memory"), False),
])
def test_an_allocations_refusal_is_told_from_other_errors(exc, refused):
    assert out_of_memory(exc) is refused
