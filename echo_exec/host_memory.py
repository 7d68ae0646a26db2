"""Keep freed host memory in the process (glibc malloc), so a step's large transient tensors reuse pages instead of
mapping fresh ones.

With glibc's defaults a tensor of more than the mmap threshold is mapped on allocation and unmapped on free, and the
heap's top is trimmed back to the system: every prefill step then page-faults its activations in again. On this
2-core machine that made the target's forward over a 512-token prefill chunk 144-156 ms instead of 128-129 ms
(benchmarks/prefill_split.py, both ways side by side). The engine calls `keep_freed_memory()` once; a serving
process keeps its peak anyway. ECHO_KEEP_FREED_MEMORY=0 leaves malloc as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest allowed value on 64-bit: larger blocks are still mapped
TRIM_THRESHOLD_BYTES = 1 << 30   # the heap's top is returned to the system only past 1 GiB free
TOP_PAD_BYTES = 64 << 20         # grow the heap in 64 MiB steps

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Tune glibc malloc for this process (once). Returns whether it was applied (False off glibc or when
    ECHO_KEEP_FREED_MEMORY=0)."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("ECHO_KEEP_FREED_MEMORY", "1") == "0" or platform.system() != "Linux":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(mallopt(p, v) == 1 for p, v in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
                                               (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
                                               (M_TOP_PAD, TOP_PAD_BYTES)))
    _done = ok
    return ok
