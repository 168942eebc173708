"""The probe listener: `GET /healthz` (live) and `GET /readyz` (ready), plain asyncio.

No mitmproxy here. Liveness is the answer itself: the listener runs on the gateway's event
loop, so a stuck loop answers nothing and the orchestrator's probe times out. Readiness
asks every check (rules loaded, identity keys fetched, approval store and audit store open,
not draining); 503 names the checks that failed, so `kubectl describe` and HAProxy's log
say why a replica takes no traffic. Requests are bounded (one 4 KiB request line and
headers, 5 s to send them); nothing secret is in an answer (names and states only).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from addons.frame import listeners

log = logging.getLogger("agentgate.health")

Check = Callable[[], str | None]  # None: fine; a string: why not
MAX_HEAD = 4096
READ_SECONDS = 5.0


class ProbeServer:
    def __init__(self, checks: dict[str, Check], draining: Callable[[], bool]) -> None:
        self.checks = checks
        self.draining = draining
        self.started = time.monotonic()
        self._server: asyncio.Server | None = None
        self.address: tuple[str, int] | None = None

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        failed: dict[str, str] = {}
        for name, check in self.checks.items():
            try:
                why = check()
            except Exception as e:  # noqa: BLE001 - a failing check is a not-ready replica
                why = f"check failed: {type(e).__name__}"
            if why:
                failed[name] = why
        if self.draining():
            failed["drain"] = "the gateway is draining (SIGTERM)"
        return not failed, {"ready": not failed, "failed": failed,
                            "checks": sorted(self.checks)}

    def answer(self, method: str, path: str) -> tuple[int, dict[str, Any]]:
        path = path.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, {"error": "use GET"}
        if path in ("/healthz", "/livez"):
            return 200, {"live": True, "uptime_seconds": round(time.monotonic() - self.started,
                                                                1),
                         "draining": self.draining()}
        if path == "/readyz":
            ok, body = self.readiness()
            return (200 if ok else 503), body
        return 404, {"error": "not found (GET /healthz or /readyz)"}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_SECONDS)
            line = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            status, body = (self.answer(line[0], line[1]) if len(line) == 3
                            else (400, {"error": "bad request"}))
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ConnectionError):
            writer.close()
            return
        data = json.dumps(body).encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  503: "Service Unavailable"}.get(status, "")
        writer.write(f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
                     f"content-length: {len(data)}\r\ncache-control: no-store\r\n"
                     "connection: close\r\n\r\n".encode() + (b"" if line[0] == "HEAD" else data))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_HEAD)
        self.address = self._server.sockets[0].getsockname()[:2]
        listeners.register(self, self._server.sockets)  # never an upstream (egress)
        return self.address

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
            self.address = None
            listeners.unregister(self)
