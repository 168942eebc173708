"""Test parts for the result masker: a real PostgreSQL server (initdb in a temp dir, free
port, trust auth on loopback only) and a minimal relay that runs rowmask.ResultMasker on a
real connection, so rowmask is tested against what real servers and clients send without
the rest of the database path. Tests through the whole gateway use PG-A's relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from addons.database import rowmask


def pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    """initdb + postgres on 127.0.0.1:<free port>; as user `postgres` when run as root
    (the server refuses to run as root)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="agentgate-pgb-"))
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.user = "postgres"

    def _cmd(self, argv: list[str]) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *argv]
        self.user = os.environ.get("USER") or "postgres"
        return argv

    def start(self) -> PgServer:
        initdb, postgres = pg_bin("initdb"), pg_bin("postgres")
        if not initdb or not postgres:
            raise RuntimeError("PostgreSQL server binaries not installed")
        data = self.dir / "data"
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
        subprocess.run(self._cmd([initdb, "-D", str(data), "-A", "trust", "-U", self.user,
                                  "--no-sync", "-E", "UTF8", "--locale=C"]),
                       check=True, capture_output=True, timeout=120)
        self.proc = subprocess.Popen(
            self._cmd([postgres, "-D", str(data), "-p", str(self.port), "-h", "127.0.0.1",
                       "-k", str(self.dir), "-c", "fsync=off", "-c", "max_connections=50"]),
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "log", "wb"))  # noqa: SIM115
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), 0.5):
                import psycopg
                try:
                    psycopg.connect(self.dsn(), connect_timeout=2).close()
                    return self
                except psycopg.OperationalError:
                    pass
            time.sleep(0.1)
        raise RuntimeError("postgres did not start: " + (self.dir / "log").read_text()[-2000:])

    def dsn(self, port: int | None = None, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={port or self.port} user={self.user} dbname={dbname}"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


async def _read_msg(r: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await r.readexactly(5)
    (n,) = struct.unpack(">i", head[1:])
    return head[:1], await r.readexactly(n - 4)


def _msg(t: bytes, payload: bytes) -> bytes:
    return t + struct.pack(">i", len(payload) + 4) + payload


class MaskingRelay:
    """Client <-> server, with every message after login through a ResultMasker (in a
    thread with its own event loop). Catalog lookups go over a side psycopg connection."""

    def __init__(self, server: PgServer, make: Callable[[], rowmask.ResultMasker]) -> None:
        self.server = server
        self.make = make
        self.port = free_port()
        self.results: list[rowmask.StatementResult] = []
        self.desyncs: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._srv: Any = None

    def start(self) -> MaskingRelay:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._client, "127.0.0.1", self.port), self._loop)
        self._srv = fut.result(10)
        return self

    def stop(self) -> None:
        async def close() -> None:
            self._srv.close()
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _catalog(self, masker: rowmask.ResultMasker, oids: set[int]) -> None:
        import psycopg
        with psycopg.connect(self.server.dsn()) as con:
            rows = con.execute(rowmask.CATALOG_SQL.replace("$1", "%s"),
                               [sorted(oids)]).fetchall()
        masker.catalog.put(oids, rows)

    async def _client(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", self.server.port)
        masker = self.make()
        try:
            # startup: SSLRequest -> N, then the startup packet as is
            while True:
                (n,) = struct.unpack(">i", await cr.readexactly(4))
                body = await cr.readexactly(n - 4)
                if body[:4] in (struct.pack(">i", 80877103), struct.pack(">i", 80877104)):
                    cw.write(b"N")
                    await cw.drain()
                    continue
                sw.write(struct.pack(">i", n) + body)
                break
            # login (trust): pass everything up to the first ReadyForQuery
            while True:
                t, p = await _read_msg(sr)
                cw.write(_msg(t, p))
                if t == b"Z":
                    break
                if t == b"E":
                    return
            await cw.drain()

            async def up() -> None:
                while True:
                    t, p = await _read_msg(cr)
                    masker.client(t, p, {"n": len(self.results)} if t in (b"Q", b"E") else None)
                    sw.write(_msg(t, p))
                    await sw.drain()
                    if t == b"X":
                        return

            async def down() -> None:
                while True:
                    t, p = await _read_msg(sr)
                    if t == b"T":
                        want = masker.catalog.missing(rowmask.wanted_tables(t, p))
                        if want:
                            await asyncio.to_thread(self._catalog, masker, want)
                    try:
                        out = masker.server(t, p)
                    except rowmask.Desync as e:
                        self.desyncs.append(str(e))
                        raise
                    self.results.extend(masker.results)
                    masker.results.clear()
                    for ot, op in out:
                        cw.write(_msg(ot, op))
                    await cw.drain()

            tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                task.cancel()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            for w in (cw, sw):
                w.close()
