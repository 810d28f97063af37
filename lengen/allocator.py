"""Keep freed memory in the process for reuse (glibc ``mallopt``), for CPU training speed.

glibc hands every allocation above its mmap threshold (128 KiB at first, adapting upward)
fresh pages from the kernel and returns them on free; the heap is trimmed whenever 128 KiB
lie free at its top. A training step on CPU allocates and frees the same few-MiB activations
hundreds of times, so without this it spends a measurable share of its time in page faults
(each new page is zeroed by the kernel). Raising the thresholds keeps those pages mapped:
measured in docs/performance.md (all architectures train faster; the process keeps up to
``TRIM`` of freed memory instead of returning it).

The command line (``lengen run``, ``lengen bench``) and the benchmark scripts call
``tune()`` once at start; library code never does, so a program that imports lengen keeps
its allocator. ``LENGEN_MALLOC_TUNING=0`` leaves glibc's defaults. Elsewhere (macOS, musl,
Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP = 32 << 20  # glibc's largest allowed mmap threshold (64-bit): bigger blocks still use mmap
TRIM = 1 << 30
TOP_PAD = 64 << 20

_done: bool | None = None


def tune() -> bool:
    """Apply the settings once per process; True if they are in effect."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("LENGEN_MALLOC_TUNING", "1").strip() == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = all(mallopt(opt, value) == 1 for opt, value in
                ((M_MMAP_THRESHOLD, MMAP), (M_TRIM_THRESHOLD, TRIM), (M_TOP_PAD, TOP_PAD)))
    return _done


def tuned() -> bool:
    """Whether ``tune()`` ran in this process and its settings are in effect."""
    return bool(_done)
