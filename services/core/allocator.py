"""glibc malloc settings for a process that moves tens of megabytes per request.

With glibc's defaults a reward server page-faults its request buffers in anew on every request: the
request's bytes (25 MB for 32 images of 512²) are above the mmap threshold, so each is a fresh mapping,
and the freed top of the heap is handed back to the kernel at once, so the next request's decoded
images fault in again. On the 2-core benchmark VM that was 0.6 ms per 512² image, a third of the whole
transport cost (docs/benchmarks.md §2). Raising the mmap threshold to glibc's maximum (32 MB on 64-bit)
and keeping freed memory in the process up to ``trim_threshold_bytes`` turns those faults into reuse.

Both settings govern glibc's main heap only as far as threads use it. By default every thread that
allocates gets an arena of its own, made of mmap'd heaps of at most 64 MB that are unmapped once empty.
The server's model runs in a worker thread, and a batch's buffers (25 MB of images, 50 MB of float64 in
the exact resize) overflow such heaps and come back as fresh pages on every batch: 13 MB faulted in per
scored image, 12 % of the model thread's time in the kernel and its throughput 18 vs 24 images/s on the
benchmark VM. So the process is held to one arena: every thread allocates from the main heap. Threads
still keep their own caches of small blocks (glibc's tcache), so the shared arena's lock is taken for
the large and the uncommon allocations only.

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
M_ARENA_MAX = -8
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
    """Serve buffers up to 32 MB from the heap, keep up to ``trim_threshold_bytes`` of freed memory, and
    let every thread allocate from that one heap. Call it before the process starts its threads: a
    thread that has allocated already keeps the arena it has.

    Returns whether glibc accepted all three settings (False off glibc, where nothing is changed).
    """
    if trim_threshold_bytes < 0:
        raise ValueError(f"trim_threshold_bytes must be >= 0, got {trim_threshold_bytes}")
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    trim = min(trim_threshold_bytes, 2**31 - 1)  # mallopt takes an int
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX), (M_TRIM_THRESHOLD, trim), (M_ARENA_MAX, 1))
    accepted = all(mallopt(param, value) == 1 for param, value in settings)
    if not accepted:
        log.warning("glibc refused some of the malloc settings; requests may page-fault their buffers in")
    return accepted
