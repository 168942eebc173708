"""Helpers for the connector tests: a fake gateway that records what it received, and a
connector running on its own event loop in a thread. Real sockets on 127.0.0.1, ports picked
by the OS."""

from __future__ import annotations

import asyncio
import base64
import fcntl
import json
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from addons.connect.forwarder import ConnectConfig, Connector
from addons.connect.tokens import TokenSource
from addons.devkit.launch import free_port  # noqa: F401 - re-exported for the connect tests

NODE_DIR = Path(__file__).resolve().parents[2] / "addons" / "connect" / "node"


def ensure_preload_deps() -> str | None:
    """The Node preload's pinned dependencies in NODE_DIR/node_modules, installed as the docs
    say (`npm ci --omit=dev`) when the pinned undici is not there; None, or npm's error.

    `npm ci` wipes node_modules first, so it runs under an exclusive (advisory) lock on
    package-lock.json: test processes running side by side (pytest-xdist workers,
    test_node.py and test_netns.py on a fresh clone) neither install twice at once nor wipe
    the modules another is loading; the version is checked again once the lock is held."""
    lock = json.loads((NODE_DIR / "package-lock.json").read_text())
    want = lock["packages"]["node_modules/undici"]["version"]
    have = NODE_DIR / "node_modules" / "undici" / "package.json"

    def ready() -> bool:
        return have.exists() and json.loads(have.read_text())["version"] == want

    if ready():
        return None
    with open(NODE_DIR / "package-lock.json", "rb") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)  # released when the file is closed
        if ready():
            return None
        p = subprocess.run(["npm", "ci", "--omit=dev", "--no-audit", "--no-fund"],
                           cwd=NODE_DIR, capture_output=True, text=True, timeout=300)
        return None if p.returncode == 0 else p.stderr[-2000:]


def jwt(exp: float | None, sub: str = "agent-1", pad: str = "") -> str:
    """An unsigned JWT-shaped token (the connector never verifies; the fake gateway neither)."""
    def seg(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    claims: dict[str, Any] = {"sub": sub, "jti": pad or sub}
    if exp is not None:
        claims["exp"] = int(exp)
    return f"{seg({'alg': 'RS256', 'typ': 'JWT'})}.{seg(claims)}.c2lnbmF0dXJl"


def token_of(proxy_auth: str) -> str:
    scheme, _, value = proxy_auth.partition(" ")
    assert scheme == "Basic"
    user, _, token = base64.b64decode(value).decode().partition(":")
    assert user == "agent"
    return token


class FakeGateway:
    """Answers CONNECT with 200 (then echoes the tunnel's bytes, prefixed by 'echo:') or with
    `refuse` (status, body); answers a plain request with a keep-alive 200 naming its path."""

    def __init__(self) -> None:
        self.heads: list[dict[str, Any]] = []
        self.refuse: tuple[int, bytes] | None = None
        gw = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                s: socket.socket = self.request
                s.settimeout(10)
                buf = b""
                while b"\r\n\r\n" not in buf:
                    chunk = s.recv(4096)
                    if not chunk:
                        return
                    buf += chunk
                head, _, rest = buf.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = [tuple(x.strip() for x in ln.split(":", 1)) for ln in lines[1:]]
                rec: dict[str, Any] = {"start": lines[0], "headers": headers, "raw": head}
                gw.heads.append(rec)
                method, target, _ = lines[0].split(" ")
                if method == "CONNECT":
                    if gw.refuse is not None:
                        status, body = gw.refuse
                        s.sendall(f"HTTP/1.1 {status} Refused\r\nContent-Length: {len(body)}\r\n"
                                  "Proxy-Authenticate: Bearer\r\n\r\n".encode() + body)
                        return
                    s.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    data = rest
                    while True:
                        if data:
                            s.sendall(b"echo:" + data)
                        data = s.recv(65536)
                        if not data:
                            return
                else:
                    n = int(dict((k.lower(), v) for k, v in headers).get("content-length", 0))
                    while len(rest) < n:
                        rest += s.recv(65536)
                    rec["body"] = rest
                    body = f"plain {method} {target} {len(rest)}".encode()
                    s.sendall(b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n"
                              b"Keep-Alive: timeout=5\r\n"
                              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    def header(self, i: int, name: str) -> str | None:
        return dict((k.lower(), v) for k, v in self.heads[i]["headers"]).get(name.lower())

    def tokens(self) -> list[str]:
        return [token_of(self.header(i, "proxy-authorization") or "")
                for i in range(len(self.heads))]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class RunningConnector:
    def __init__(self, cfg: ConnectConfig, source: TokenSource) -> None:
        self.loop = asyncio.new_event_loop()
        self.conn = Connector(cfg, source)
        self.loop.run_until_complete(self.conn.start())
        self.port = self.conn.port
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self.conn.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def recv_until_closed(s: socket.socket, limit: int = 1 << 20) -> bytes:
    out = b""
    while len(out) < limit:
        chunk = s.recv(65536)
        if not chunk:
            break
        out += chunk
    return out


def recv_head(s: socket.socket) -> bytes:
    """Bytes up to and including the end of a response head (what the client read first)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(1)
        if not chunk:
            break
        buf += chunk
    return buf


def wait_for(pred: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()
