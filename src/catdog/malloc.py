"""Keep glibc's malloc from handing memory back to the system between training steps.

Every step allocates and frees the same few megabytes of activations and gradients. With glibc's defaults the
larger blocks come from fresh mmap calls or from a heap that is trimmed after each step, so the next step
page-faults the memory in again: an epoch of the seed network (bf16, 2 cores) took 1.07 s (0.94-1.15 over three
processes) instead of 0.78 s (0.70-0.80) (benchmarks/breakdown.md). Raising both thresholds keeps those blocks in
the heap.
The cost: up to the trim threshold of freed memory stays with the process instead of returning to the system.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest accepted value on 64-bit systems
TRIM_THRESHOLD = 1024 * 1024 * 1024

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); False where that is not possible.

    Both are set together: setting either one alone turns off glibc's adaptive thresholds, and with one of them
    left at its 128 KiB default, training runs slower than with no change at all.
    """
    global _applied
    if _applied is None:
        _applied = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = libc.mallopt
            except (OSError, AttributeError):  # not glibc (musl has no mallopt)
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD,
                                                                                      TRIM_THRESHOLD))
    return _applied
