"""glibc malloc settings for a CPU engine, whose steps allocate and free the same large
tensors over and over (a training step's activations, the head's chunks, a prefill's
intermediates).

With glibc's defaults a freed block over the mmap threshold goes back to the kernel, and so
does the free top of a heap past the trim threshold; the next step's tensor of the same size
is faulted in again page by page, zeroed by the kernel. A 2 x 512-token bf16 training step of
SmolLM2 took ~100k such faults (400 MB) and ran 2.0 s; with the settings below it took none
after its first steps and ran 1.7 s, at no higher peak RSS: the memory a step needs is kept
for the next, which is what the process's peak already counted.

The same step on a thread of its own (the engine's) ran as fast with either: glibc's
per-thread arenas kept the step's memory there. With these settings the engine's speed does
not depend on the thread that drives it (the benchmarks and tests drive it from the main one).
"""

import ctypes

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
# Blocks up to glibc's largest mmap threshold on 64-bit (32 MiB) come from the heaps.
MMAP_THRESHOLD = 32 << 20
# A heap gives free memory back only past 1 GiB at its top, and grows 256 MiB at a time.
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 256 << 20


def keep_freed_memory() -> bool:
    """Set the process's malloc to keep what it frees; False where the C library has no
    mallopt (not glibc) or refuses a setting. Process-wide and idempotent."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD))
    return all(mallopt(param, value) == 1 for param, value in settings)
