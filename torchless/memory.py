"""Keep freed memory in the process's heap, so that each prefill step reuses it.

A batched prefill allocates a few hundred MB of intermediate arrays per pass (each projection
output, each attention block's scores ...). glibc serves arrays that large with fresh
``mmap`` pages and returns them on ``free``, so every pass page-faults all of it in again
and the kernel zeroes it: 70,000-90,000 faults and 0.1-0.25 s of system time per 512-token
prefill of a 134M model (BENCHMARKS.md, fourth session, "Page faults in prefill"). Raising glibc's
``M_MMAP_THRESHOLD`` (to its maximum, 32 MiB) and ``M_TRIM_THRESHOLD`` keeps those blocks in
the heap instead: the cost is that the process does not hand freed memory back to the
system until it exits, as with most allocators tuned for speed.

Applied once, when the first model is built (importing torchless changes nothing).
``TORCHLESS_MALLOC_TUNING=0`` leaves the allocator alone. Only glibc on Linux is tuned.
"""
from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest accepted value on 64-bit systems
TRIM_THRESHOLD = 1 << 30

_state: bool | None = None


def keep_freed_memory() -> bool:
    """Tune glibc's allocator as described above (once). Returns whether it is tuned."""
    global _state
    if _state is not None:
        return _state
    _state = False
    if os.environ.get("TORCHLESS_MALLOC_TUNING", "1") == "0":
        return _state
    if not sys.platform.startswith("linux"):
        return _state
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only: musl's mallopt is a no-op
    except (OSError, AttributeError):
        return _state
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _state = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                  and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _state
