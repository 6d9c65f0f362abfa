"""Keep freed memory in the process on CPU, so that a training step reuses the last step's pages.

glibc's malloc hands every block above its mmap threshold (32 MiB at most) back to the kernel the moment it is
freed, so each step maps its large activations afresh and faults in every 4 KiB page of them again: about 400,000
page faults per CAML step at the LA-mini size, each one a kernel entry and a page cleared. With mmap off and a high
trim threshold, freed blocks stay in the heap and the next step's tensors reuse most of them (glibc 2.36 reuses an
aligned block of one size only once it merges with a neighbour): the same arithmetic, bit for bit, with 9-20x fewer
faults (BENCHMARKS.md "cpu-malloc"), for a higher resident peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
KEEP_BYTES = 2**31 - 1  # mallopt takes an int: free heap top beyond 2 GiB still goes back


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse; False where there is no glibc malloc to tell (macOS,
    Windows, musl), which changes nothing there."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, KEEP_BYTES) == 1
