"""The audit writer process's resting memory: what it imports and what stays mapped of
DuckDB's library once the store is open."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import duckdb
from mitmproxy.test import tflow

from addons.frame.pages import smaps_blocks
from addons.recording import store
from addons.recording.addon import ConnStates, flow_state
from addons.recording.remote import ROOT, WriterProcess

# What the gateway process needs and the writer process must not load: each costs MiB of
# resident code and heap in a process that only builds rows and inserts them.
HEAVY = ("mitmproxy", "regex", "hyperscan", "cryptography", "tornado", "aioquic", "pandas",
         "numpy", "addons.masking", "addons.policy", "addons.identity")


def duckdb_library_kib(pid: int) -> tuple[int, int]:
    """(KiB resident of _duckdb's read-only mappings, KiB of its private copies)."""
    clean = copies = 0
    for head, fields in smaps_blocks(Path(f"/proc/{pid}/smaps").read_text()):
        parts = head.split()
        if len(parts) >= 6 and "_duckdb" in parts[5]:
            if "w" in parts[1] or fields.get("Anonymous"):
                copies += fields.get("Rss", 0)
            else:
                clean += fields.get("Rss", 0)
    return clean, copies


def test_the_writer_process_imports_nothing_heavy() -> None:
    """The modules of a writer process that has opened a store (run as the gateway runs
    it: -P, the checkout first on sys.path) include none of the gateway's heavy ones."""
    code = ("import sys, json, tempfile, os\n"
            "from addons.recording import writerproc\n"
            "from addons.recording.writer import open_db\n"
            "d = tempfile.mkdtemp()\n"
            "open_db(os.path.join(d, 'a.duckdb')).close()\n"
            "print(json.dumps(sorted(m for m, v in sys.modules.items() if v is not None)))\n")
    out = subprocess.run([sys.executable, "-P", "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    mods = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert "duckdb" in mods and "addons.recording.store" in mods  # it did run
    loaded = sorted(m for m in mods for h in HEAVY if m == h or m.startswith(h + "."))
    assert not loaded, loaded


def test_duckdbs_library_pages_are_dropped_once_the_store_is_open(tmp_path: Path) -> None:
    """Opening DuckDB faults in ~30 MiB of its library that an INSERT never reads again;
    the process drops them (and the other libraries' read-only pages) after the store
    opens (before: 31-32 MiB of DuckDB's stayed resident for good, 44 MiB of files in all).
    It keeps writing and verifying afterwards: the pages come back as they are used, and
    the relocated (private) part of the library is never touched."""
    db = tmp_path / "a.duckdb"
    w = WriterProcess(db, serve_queries=False, interval=0.05)
    w.start()
    try:
        assert w.pid is not None
        deadline = time.monotonic() + 10
        clean, copies = duckdb_library_kib(w.pid)
        while clean > 8 * 1024 and time.monotonic() < deadline:
            time.sleep(0.05)  # the drop follows the "ready" message
            clean, copies = duckdb_library_kib(w.pid)
        assert clean < 8 * 1024, clean  # before: ~32,000 KiB
        files = int(next(x for x in Path(f"/proc/{w.pid}/status").read_text().splitlines()
                         if x.startswith("RssFile:")).split()[1])
        assert files < 16 * 1024, files  # before: ~44,800 KiB
        assert copies > 0  # the relocated part stayed (its pages are not the file's)
        for i in range(300):
            f = tflow.tflow(resp=True)
            f.request.content = b'{"messages":[{"role":"user","content":"hi %d"}]}' % i
            st = flow_state(f, ConnStates())
            st["id"] = f"flow-{i}"
            w.submit(store.Pending(state=st, session=f"s{i % 7}", size=100))
        assert w.flush(60)
    finally:
        assert w.close(60)
    con = duckdb.connect(str(db), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM flows").fetchone() == (300,)
        assert store.verify(con).ok
    finally:
        con.close()
