"""Test parts for the result masker: a real PostgreSQL server (addons/devkit/postgres.py;
here trust auth on loopback only) and a minimal relay that runs rowmask.ResultMasker on a
real connection, so rowmask is tested against what real servers and clients send without
the rest of the database path. Tests through the whole gateway use PG-A's relay.
"""

from __future__ import annotations

import asyncio
import struct
import threading
from collections.abc import Callable
from typing import Any

from addons.database import rowmask
from addons.devkit.launch import free_port
from addons.devkit.postgres import Postgres, pg_bin

__all__ = ["MaskingRelay", "PgServer", "free_port", "pg_bin"]


class PgServer(Postgres):
    """addons/devkit/postgres.py's server with trust auth (loopback only): these tests are
    about rows, not logins; `user` is the superuser they log in as."""

    def __init__(self) -> None:
        super().__init__(max_connections=50, prefix="agentgate-pgb-")

    @property
    def user(self) -> str:
        return self.superuser

    def start(self) -> PgServer:
        super().start()
        return self

    def dsn(self, port: int | None = None, dbname: str = "postgres") -> str:
        return self.conninfo(dbname=dbname, port=port)


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
