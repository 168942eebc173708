"""Give the heap's free memory back to the OS (glibc's `malloc_trim`). Pure: no mitmproxy.

Why: a burst of large bodies (100 KB prompts at c=16) makes the gateway's heap peak; the
Python objects are freed when the flows end, but glibc keeps the freed chunks in its arenas
(after the first frees its dynamic mmap threshold makes 100 KB - 32 MB buffers ordinary
heap chunks) and returns only the free top of each heap. RSS then stays near the peak for
the life of the process. Measured (bench, 100 KB c=16 for 25 s, then idle): 222 MiB at rest
without trimming, 143 MiB with a trim every 2 s, while tracemalloc saw 2.6 MiB of Python
memory still live. `malloc_trim(0)` hands the free pages of every arena back (madvise).

Where there is no glibc (musl, macOS) `available` is False and `trim()` does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time

log = logging.getLogger("agentgate.health")


def rss_kib() -> int | None:
    """This process's resident set, in KiB (Linux /proc), or None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    except (OSError, ValueError, IndexError):
        return None


class HeapTrimmer:
    """`trim()` runs malloc_trim(0); call it from a worker thread (ctypes releases the GIL
    for the call; it takes each arena's lock in turn, for well under a millisecond on a
    gateway's heap)."""

    def __init__(self, libc: str | None = None) -> None:
        self.trims = 0
        self.seconds = 0.0  # spent in malloc_trim, all calls
        self.returned_kib = 0  # RSS drop across the calls (what the OS got back)
        self._fn = None
        name = libc or ctypes.util.find_library("c")
        if not name:
            return
        try:
            fn = ctypes.CDLL(name).malloc_trim
        except (OSError, AttributeError):
            return  # not glibc
        fn.argtypes = [ctypes.c_size_t]
        fn.restype = ctypes.c_int
        self._fn = fn

    @property
    def available(self) -> bool:
        return self._fn is not None

    def trim(self) -> int:
        """Return free heap pages to the OS; KiB of RSS that went back (0 if none or not
        available)."""
        if self._fn is None:
            return 0
        before = rss_kib()
        t0 = time.perf_counter()
        self._fn(0)
        self.seconds += time.perf_counter() - t0
        self.trims += 1
        after = rss_kib()
        back = max(0, before - after) if before is not None and after is not None else 0
        self.returned_kib += back
        return back
