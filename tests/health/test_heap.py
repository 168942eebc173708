"""heap.py: malloc_trim really gives freed heap memory back (a real interpreter, real glibc),
and the gateway validates its option and keeps serving with trims running."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from addons.health.heap import HeapTrimmer, rss_kib

glibc = pytest.mark.skipif(not HeapTrimmer().available, reason="no glibc malloc_trim here")

# A child that frees 200 MB of 100 KB buffers kept as heap chunks (glibc's thresholds set
# as they end up after its dynamic adjustment) with small live objects between them: the
# free memory stays resident until something trims it.
CHILD = """
import ctypes, ctypes.util, json, sys
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallopt(-3, 64 << 20)   # M_MMAP_THRESHOLD: 100 KB buffers come from the heap
libc.mallopt(-1, 1 << 30)    # M_TRIM_THRESHOLD: free() alone never trims
from addons.health.heap import HeapTrimmer, rss_kib
big, small = [], []
for i in range(2000):
    big.append(bytearray(100_000))
    small.append(bytearray(64))
base = rss_kib()
del big
freed = rss_kib()
t = HeapTrimmer()
back = t.trim()
print(json.dumps({"base": base, "freed": freed, "trimmed": rss_kib(), "back": back,
                  "trims": t.trims}))
"""


@glibc
def test_trim_returns_freed_heap_memory() -> None:
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                         timeout=60, check=True)
    r = json.loads(out.stdout)
    assert r["freed"] > 150 * 1024, r  # freed, still resident
    assert r["trimmed"] < r["freed"] - 150 * 1024, r  # the trim gave it back
    assert r["back"] > 150 * 1024 and r["trims"] == 1, r


def test_without_glibc_trim_is_a_no_op() -> None:
    t = HeapTrimmer(libc="libagentgate-no-such-libc.so")  # musl / macOS: nothing to load
    assert not t.available
    assert t.trim() == 0 and t.trims == 0
    assert rss_kib() is None or rss_kib() > 0


def test_bad_trim_interval_refuses_to_start(gateway_factory, no_identity) -> None:
    gw = gateway_factory("{standin_upstreams}" + no_identity, wait=False,
                         extra_args=("--set", "agentgate_heap_trim_seconds=-1"))
    try:
        rc = gw.proc.wait(60)
    except subprocess.TimeoutExpired:
        gw.proc.kill()
        gw.proc.wait(10)
        pytest.fail("the gateway did not refuse a negative agentgate_heap_trim_seconds")
    assert rc != 0
    assert "agentgate_heap_trim_seconds: must be >= 0" in gw.logs()
