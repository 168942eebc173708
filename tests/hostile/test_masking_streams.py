"""Issue 11, class 7 (response side): SSE read exactly per the WHATWG rules, streams of no
known dialect held back as text channels, response headers masked — through a real
mitmdump, with an upstream that answers hostile bytes verbatim. The agent must receive none
of the values (raw, JSON-decoded, URL-decoded), and the audit store must hold none."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from urllib.parse import unquote_plus

import duckdb
import httpx
import pytest

from tests.conftest import Gateway
from tests.hostile.edgekit import serve_tls

pytestmark = pytest.mark.integration

EMAIL = "ann.lee@example.com"
CARD = "4111 1111 1111 1111"
SSN = "536-22-4519"
VALUES = [EMAIL, "ann.lee", CARD, "4111111111111111", SSN, "536224519"]


def chat_ev(text: str) -> str:
    return json.dumps({"id": "c", "object": "chat.completion.chunk", "model": "m",
                       "choices": [{"index": 0, "delta": {"content": text},
                                    "finish_reason": None}]})


def split(text: str, n: int) -> list[str]:
    return [text[i:i + n] for i in range(0, len(text), n)]


MSG = f"Your card {CARD}, mail {EMAIL} and ssn {SSN}."
# name -> (content type, list of raw writes)
STREAMS: dict[str, tuple[str, list[bytes]]] = {
    # '\n\r\n' ends an event (a line end, then a blank line): it used to run events together
    "lfcrlf": ("text/event-stream", [
        "".join(f"data: {chat_ev(p)}\n\r\n" for p in split(MSG, 5)).encode(),
        b"data: [DONE]\n\r\n"]),
    "cr_only": ("text/event-stream", [
        "".join(f"data: {chat_ev(p)}\r\r" for p in split(MSG, 4)).encode(),
        b"data: [DONE]\r\r"]),
    "bom_comments_fields": ("text/event-stream", [
        b"\xef\xbb\xbf", f": {EMAIL}\n".encode(), f"id: {SSN}\nevent: {EMAIL}\n".encode(),
        f"retry: {CARD}\ndata: {chat_ev('hi')}\n\n".encode(), b"data: [DONE]\n\n"]),
    "plain_text_sse": ("text/event-stream", [
        f"data: {p}\n\n".encode() for p in split(MSG, 3)]),
    "ollama_sse": ("text/event-stream", [
        f"data: {json.dumps({'model': 'llama3', 'message': {'content': p}})}\n\n".encode()
        for p in split(MSG, 3)]),
    "ollama_ndjson": ("application/x-ndjson", [
        (json.dumps({"model": "llama3", "message": {"role": "assistant", "content": p},
                     "done": False}) + "\n").encode() for p in split(MSG, 3)]),
    "generate_ndjson": ("application/x-ndjson", [
        (json.dumps({"model": "llama3", "response": p, "done": False}) + "\n").encode()
        for p in split(MSG, 2)]),
}


class Upstream:
    """An HTTPS upstream (the stand-in's certificate) that answers canned bytes, chunked,
    one TCP write per piece, with a response header carrying a value."""

    def __init__(self, standin) -> None:
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a) -> None:  # noqa: ANN002
                pass

            def do_POST(self) -> None:  # noqa: N802
                n = int(self.headers.get("content-length") or 0)
                self.rfile.read(n)
                name = self.path.rstrip("/").rsplit("/", 1)[-1]
                ctype, writes = STREAMS.get(name, ("application/json", [b"{}"]))
                self.send_response(200)
                self.send_header("content-type", ctype)
                self.send_header("x-debug", f"owner {EMAIL} card {CARD}")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                for w in writes:
                    self.wfile.write(f"{len(w):x}\r\n".encode() + w + b"\r\n")
                    self.wfile.flush()
                    time.sleep(0.002)
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
                outer.served += 1

        self.served = 0
        self.server, self.url = serve_tls(H, standin)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def upstream(standin) -> Iterator[Upstream]:
    u = Upstream(standin)
    yield u
    u.stop()


@pytest.fixture
def gw(gateway_factory, no_identity, upstream) -> Gateway:
    extra = f"""  - name: local-llm
    hosts: [llm.example.com]
    dialect: generic
    forward_to: {upstream.url}
"""
    return gateway_factory("{standin_upstreams}" + extra + no_identity)


def views(text: str) -> list[str]:
    out = [text, unquote_plus(text)]
    for line in text.replace("\r", "\n").split("\n"):
        line = line[5:].strip() if line.startswith("data:") else line
        try:
            out.append(json.dumps(json.loads(line), ensure_ascii=False))
        except ValueError:
            pass
    # the text as a client reassembles it: every delta / token joined
    joined = []
    for v in out[2:]:
        try:
            o = json.loads(v)
        except ValueError:
            continue
        for path in (("choices", 0, "delta", "content"), ("message", "content"), ("response",)):
            node = o
            try:
                for k in path:
                    node = node[k]
            except (KeyError, IndexError, TypeError):
                continue
            if isinstance(node, str):
                joined.append(node)
    out.append("".join(joined))
    out.append("".join(ln[5:].lstrip() for ln in text.split("\n") if ln.startswith("data:")))
    return out


def leaked(text: str) -> list[str]:
    return sorted({v for t in views(text) for v in VALUES if v in t})


def fetch(gw: Gateway, url: str) -> httpx.Response:
    with httpx.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=60) as c:
        return c.post(url, json={"stream": True}, headers={"authorization": "Bearer x"})


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_stream_never_reaches_the_agent_raw(gw, upstream, name) -> None:
    r = fetch(gw, f"https://llm.example.com/s/{name}")
    assert r.status_code == 200, r.text[:500]
    text = r.content.decode("utf-8", "replace")
    assert leaked(text) == [], text[:2000]
    assert leaked(json.dumps(dict(r.headers))) == [], dict(r.headers)
    assert "[" in text  # the values were replaced, not the stream dropped


def test_streams_are_not_recorded_raw(gw, upstream) -> None:
    for name in ("lfcrlf", "bom_comments_fields", "ollama_ndjson", "plain_text_sse"):
        assert fetch(gw, f"https://llm.example.com/s/{name}").status_code == 200
    # the gateway still serves a normal request afterwards
    assert fetch(gw, "https://llm.example.com/s/other").status_code == 200
    assert gw.stop() == 0
    db = gw.data_dir / "agentgate.duckdb"
    con = duckdb.connect(str(db), read_only=True)
    try:
        cols = [r[0] for r in con.execute("DESCRIBE flows").fetchall()]
        rows = con.execute(f"SELECT {', '.join(f'CAST({c} AS VARCHAR)' for c in cols)} "
                           "FROM flows").fetchall()
    finally:
        con.close()
    assert len(rows) >= 5
    text = json.dumps(rows, default=str, ensure_ascii=False)
    assert not [v for v in VALUES if v in text], text[:3000]
