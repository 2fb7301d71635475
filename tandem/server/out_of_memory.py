"""Whether an exception is an allocation's refusal: the one test the engine (a step, a slot
load) and the adapter registry (a read's memory) use to answer RESOURCE_EXHAUSTED, which
clients retry, rather than INTERNAL."""

import errno

import torch


def out_of_memory(exc: BaseException) -> bool:
    """Python's MemoryError, torch's OutOfMemoryError (a GPU's, or page-locked host memory),
    the plain RuntimeError torch's CPU allocator raises, and an mmap's ENOMEM."""
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOMEM
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc) or "out of memory" in str(exc))
