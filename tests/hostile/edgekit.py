"""Raw clients for hostile edge tests: CONNECT tunnels, hand-made TLS (split ClientHello),
exact request bytes, and the gateway's health (a normal request still works, RSS bounded)."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from tests.conftest import Gateway

AGENT_KEY = "sk-agent-side-key-that-must-never-reach-upstream-0000"
RSS_LIMIT_KB = 600 * 1024  # a gateway that buffered an attack body would blow through this


def connect_tunnel(gw: Gateway, target: str, timeout: float = 10) -> tuple[socket.socket, bytes]:
    """Open a CONNECT tunnel; returns the socket and the proxy's response head."""
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            break
        head += chunk
    return s, head


def read_until_closed(s: socket.socket, limit: int = 1 << 20) -> bytes:
    out = b""
    try:
        while len(out) < limit:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return out


class SplitTLS:
    """A TLS client over a raw socket that sends its ClientHello in pieces."""

    def __init__(self, sock: socket.socket, cafile: Path | str, server_name: str | None,
                 first_split: int = 2, alpn: list[str] | None = None) -> None:
        self.sock = sock
        ctx = ssl.create_default_context(cafile=str(cafile))
        if server_name is None or _is_ip(server_name):
            ctx.check_hostname = False
        if alpn:
            ctx.set_alpn_protocols(alpn)
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_hostname=server_name)
        self.first_split = first_split

    def _flush(self) -> None:
        data = self.out.read()
        if data:
            self.sock.sendall(data)

    def handshake(self) -> None:
        first = True
        while True:
            try:
                self.obj.do_handshake()
                self._flush()
                return
            except ssl.SSLWantReadError:
                data = self.out.read()
                if first and data and self.first_split:
                    # Two TCP segments: a record header cut after `first_split` bytes.
                    self.sock.sendall(data[:self.first_split])
                    time.sleep(0.3)
                    self.sock.sendall(data[self.first_split:])
                    first = False
                elif data:
                    self.sock.sendall(data)
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed during the TLS handshake")
                self.inc.write(chunk)

    def send(self, data: bytes) -> None:
        self.obj.write(data)
        self._flush()

    def recv_all(self, limit: int = 1 << 20) -> bytes:
        out = b""
        while len(out) < limit:
            try:
                out += self.obj.read(65536)
                continue
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break
            try:
                chunk = self.sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            self.inc.write(chunk)
        return out

    def peer_issuer(self) -> str:
        cert = self.obj.getpeercert()
        return json.dumps(cert.get("issuer") if cert else None)


def _is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        return True
    except OSError:
        return False


def tls_request(gw: Gateway, target: str, request: bytes, sni: str | None,
                first_split: int = 0) -> bytes:
    """CONNECT `target`, TLS with `sni` (verified against the gateway's CA), send `request`
    exactly as given and return everything the gateway answered."""
    s, head = connect_tunnel(gw, target)
    assert b" 200 " in head.split(b"\r\n", 1)[0], head
    t = SplitTLS(s, gw.ca_cert, sni, first_split=first_split)
    t.handshake()
    t.send(request)
    out = t.recv_all()
    s.close()
    return out


def status_of(response: bytes) -> int:
    first = response.split(b"\r\n", 1)[0].split()
    return int(first[1]) if len(first) > 1 else 0


def http_req(method: str, path: str, host: str, body: bytes = b"",
             headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close",
             f"Content-Length: {len(body)}", "Content-Type: application/json",
             f"Authorization: Bearer {AGENT_KEY}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


CHAT = json.dumps({"model": "gpt-4o-mini",
                   "messages": [{"role": "user", "content": "ping"}]}).encode()


def client(gw: Gateway, **kw) -> httpx.Client:
    return httpx.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=30, **kw)


def rss_kb(gw: Gateway) -> int:
    for line in Path(f"/proc/{gw.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def assert_healthy(gw: Gateway, standin) -> None:
    """The gateway still serves a normal request, and its memory stayed bounded."""
    assert gw.proc.poll() is None, "gateway died"
    with client(gw) as c:
        r = c.post("https://api.openai.com/v1/chat/completions", content=CHAT,
                   headers={"content-type": "application/json",
                            "authorization": f"Bearer {AGENT_KEY}"})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "echo: ping"
    assert rss_kb(gw) < RSS_LIMIT_KB


class RawRecorder:
    """A plain TCP server recording every byte it receives; answers any byte with a banner."""

    def __init__(self) -> None:
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.received = bytearray()
        self.lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                with self.lock:
                    self.received += data
                conn.sendall(b"RAW-UPSTREAM-SAW-BYTES\n")

    def close(self) -> None:
        self.srv.close()


def serve_tls(handler: type[BaseHTTPRequestHandler], standin) -> tuple[ThreadingHTTPServer, str]:
    """A threaded HTTPS server on loopback answering with `handler`, under the stand-in's
    certificate (which the test gateways trust), serving in a daemon thread: (server, url).
    Stop it with server.shutdown(); server.server_close()."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(standin._leaf), str(standin._key))
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"https://127.0.0.1:{server.server_address[1]}"


class ChunkedHandler(BaseHTTPRequestHandler):
    """An upstream's handler that answers HTTP/1.1 in chunks it writes one at a time (the
    streaming tests' servers subclass it and add do_POST), quietly."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *a) -> None:  # noqa: ANN002
        pass

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()
