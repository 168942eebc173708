"""The resident pages of the process's shared libraries, given back (madvise) once they are
no longer read. Pure: no mitmproxy; used by the gateway process (health/) and the audit
writer process (recording/writerproc.py)."""

from __future__ import annotations

import ctypes

# madvise(2) advice: drop the mapping's pages from this process (file pages stay cached)
MADV_DONTNEED = 4


def drop_library_pages(fragment: str = "/") -> int:
    """Unmap the resident pages of the read-only file mappings (shared libraries) whose
    path contains `fragment` (default: every one); returns the KiB dropped (0 where /proc
    or madvise is absent).

    Loading a library and starting up fault in pages that the work after never reads
    again, and they stayed counted in the process's RSS (and its peak) for good: in the
    audit writer process DuckDB's (its 60 MB library: relocation tables, registering its
    ~1,000 built-in functions and opening the store: ~32 MiB, of which an INSERT and a
    COMMIT read ~16 again) and Python's own libraries (libpython, libcrypto, libstdc++ …:
    ~13 MiB); in the gateway process hyperscan's pattern compiler (~5 MiB), cryptography's
    and OpenSSL's certificate and start-up code (~10 MiB). The pages later work needs come
    back on their first use (minor faults from the page cache). Only mappings without write
    permission and with no private copies ("Anonymous: 0": not the relocated RELRO part)
    are touched: their pages are the file's bytes, so dropping them cannot change what the
    process reads."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        with open("/proc/self/smaps") as f:
            text = f.read()
    except (OSError, AttributeError):
        return 0
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], \
        ctypes.c_int
    dropped = 0
    for head, fields in smaps_blocks(text):
        parts = head.split()
        if (len(parts) < 6 or fragment not in parts[5] or "w" in parts[1]
                or fields.get("Anonymous", 1) != 0 or not fields.get("Rss")):
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        if madvise(start, end - start, MADV_DONTNEED) == 0:
            dropped += fields["Rss"]
    return dropped


def smaps_blocks(text: str) -> list[tuple[str, dict[str, int]]]:
    """/proc/PID/smaps as (mapping line, {field: kB}) pairs."""
    out: list[tuple[str, dict[str, int]]] = []
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if sep and " " not in key and rest.strip().endswith("kB"):
            if out:
                out[-1][1][key] = int(rest.split()[0])
        elif line and not line[0].isupper():
            out.append((line, {}))
    return out
