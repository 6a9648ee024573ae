"""glibc malloc settings for a process that moves tens of megabytes per request.

With glibc's defaults a reward server page-faults its request buffers in anew on every request: the
request's bytes (25 MB for 32 images of 512²) are above the mmap threshold, so each is a fresh mapping,
and the freed top of the heap is handed back to the kernel at once, so the next request's decoded
images fault in again. On the 2-core benchmark VM that was 0.6 ms per 512² image, a third of the whole
transport cost (docs/benchmarks.md §2). Raising the mmap threshold to glibc's maximum (32 MB on 64-bit)
and keeping freed memory in the process up to ``trim_threshold_bytes`` turns those faults into reuse.

The price is resident memory: the process keeps up to ``trim_threshold_bytes`` of freed memory instead of
returning it. The server's decoded-pixel budget still bounds what requests can hold at once. Off glibc
(musl, macOS) nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import platform
from collections.abc import Callable

log = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
"""glibc's upper bound for M_MMAP_THRESHOLD on 64-bit (4 MiB · sizeof(long)); mallopt refuses more."""


@functools.cache
def _glibc_mallopt() -> Callable[[int, int], int] | None:
    """glibc's mallopt, or None off glibc; looked up once (``libc_ver`` reads the interpreter's binary)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt


def keep_freed_memory(trim_threshold_bytes: int) -> bool:
    """Serve buffers up to 32 MB from the heap and keep up to ``trim_threshold_bytes`` of freed memory.

    Returns whether glibc accepted both settings (False off glibc, where nothing is changed).
    """
    if trim_threshold_bytes < 0:
        raise ValueError(f"trim_threshold_bytes must be >= 0, got {trim_threshold_bytes}")
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    trim = min(trim_threshold_bytes, 2**31 - 1)  # mallopt takes an int
    accepted = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and mallopt(M_TRIM_THRESHOLD, trim) == 1
    if not accepted:
        log.warning("glibc refused the malloc settings; the allocator keeps its defaults")
    return accepted
