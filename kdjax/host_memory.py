"""Host memory settings for programs that run one XLA CPU executable many times (training steps).

Each execution of a compiled step asks the host allocator for its temporary buffer and its outputs
(hundreds of MB for the quickstart KD step) and frees them at the end. glibc's malloc serves blocks
above 32 MB with a fresh `mmap` and returns them with `munmap`, and XLA's worker threads allocate from
per-thread arenas that fall back to `mmap` for large blocks whatever the thresholds say. So every step
maps new memory and touches every page of it for the first time: the kernel zero-fills each 4 KiB page
on a minor page fault (about 133k faults and half a second of system time per quickstart step on a
2-core host). `reuse_host_memory()` sets glibc's malloc so freed blocks are kept and handed out again:
one arena (`M_ARENA_MAX=1`), no `mmap` for large blocks (`M_MMAP_MAX=0`), and no trimming of the heap
top below 2 GiB (`M_TRIM_THRESHOLD`). After the first step a run then page-faults no more (measured
by `benchmarks/step.py`, column `minor faults/call`).

It runs when `kdjax` is imported, before jax creates its worker threads (a thread that already owns
an arena keeps it). The price is that the process holds on to its high-water mark of host memory
instead of returning freed blocks to the system. `KDJAX_HOST_MALLOC=system` leaves the allocator alone.
Non-glibc platforms (macOS, musl) are left alone too.
"""

from __future__ import annotations

import ctypes
import os
import sys

ENV = "KDJAX_HOST_MALLOC"
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc <malloc.h>
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int

_applied = None


def reuse_host_memory() -> bool:
    """Configure glibc's malloc to reuse freed blocks (see the module docstring); True when applied.

    Idempotent. Does nothing (False) with `KDJAX_HOST_MALLOC=system`, or where the C library is not glibc.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    choice = os.environ.get(ENV, "reuse")
    if choice not in ("reuse", "system"):
        raise ValueError(f"{ENV}={choice!r}; use 'reuse' (default) or 'system'")
    if choice == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _applied = bool(mallopt(M_ARENA_MAX, 1) and mallopt(M_MMAP_MAX, 0)
                    and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
