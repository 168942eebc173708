"""Hostile review of the audit query socket (served by the writer process,
addons/recording/writer.py QueryServer; asked by `agentgate audit`): who can answer.

When the store's path is long, the socket is named in the shared temporary directory
(`agentgate-<uid>-<digest>.sock`, a name anyone can work out). Another local user who
binds that name first gets every question the CLI asks (SQL included) and answers what
they like: `agentgate audit verify` printed "OK" for a chain it never walked. The CLI now
asks only a socket owned by the store's owner, and says so otherwise. Real CLI process,
real socket, the forger's socket owned by another uid (needs root to chown)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from addons.recording.writer import open_db, socket_path

ROOT = Path(__file__).resolve().parents[2]
OTHER_UID = 65534  # nobody
FORGED = {"result": {"ok": True, "count": 424242, "head_seq": 424242, "head_hash": "f" * 64,
                     "problem": None, "seq": None, "id": None, "checkpoint_seq": 0}}

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")


class Forger:
    """A UNIX socket at `path`, owned by another user, answering FORGED to every line and
    keeping what it was asked."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.asked: list[bytes] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        os.chmod(path, 0o777)
        os.chown(path, OTHER_UID, OTHER_UID)
        self.sock.listen(4)
        self.sock.settimeout(0.2)
        self.stopped = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn, conn.makefile("rwb") as f:
                self.asked.append(f.readline())
                f.write(json.dumps(FORGED).encode() + b"\n")
                f.flush()

    def stop(self) -> None:
        self.stopped = True
        self.thread.join(timeout=5)
        self.sock.close()
        os.unlink(self.path)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "addons.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_a_socket_of_another_user_is_never_asked(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 110)
    deep.mkdir()
    db = deep / "agentgate.duckdb"
    open_db(db).close()
    path = socket_path(db)
    assert not path.startswith(str(deep)), path  # the shared temporary directory
    assert not os.path.exists(path)
    forger = Forger(path)
    try:
        r = cli("audit", "verify", "--db", str(db))
        q = cli("audit", "query", "--db", str(db), "SELECT count(*) FROM flows")
    finally:
        forger.stop()
    assert forger.asked == [], forger.asked          # no question (no SQL) reached it
    assert "424242" not in r.stdout + r.stderr, r.stdout
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "not owned by" in r.stderr and path in r.stderr, r.stderr
    assert q.returncode != 0 and "not owned by" in q.stderr, (q.stdout, q.stderr)
    # without the forger the store answers for itself (no gateway: read directly)
    ok = cli("audit", "verify", "--db", str(db))
    assert ok.returncode == 0 and ok.stdout.startswith("OK: 0 records"), (ok.stdout,
                                                                            ok.stderr)
