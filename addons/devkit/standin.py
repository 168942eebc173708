"""A local HTTPS stand-in for the LLM upstreams and a webhook receiver.

It speaks enough of the OpenAI (`/v1/chat/completions`, `/v1/responses`, `/v1/models`) and
Anthropic (`/v1/messages`) wire formats for the real SDKs, non-streaming and SSE, with
tool calls, and records every request it received (headers and body) so tests can assert
what actually left the gateway. It serves a certificate from its own throwaway CA.

Deterministic replies: the model answers "echo: <last user text>"; when the request
defines tools and holds no tool result yet, it calls the first tool, filling every string
parameter with the last user text; after a tool result it answers "done: <tool result>".
`script()` queues exact replies and stream shapes (delta size, split TCP writes).

Run alone: `python -m addons.devkit.standin --port 9443 --certdir /tmp/standin`.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
import uuid
import zlib
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

log = logging.getLogger("agentgate.standin")


# ---------------------------------------------------------------- certificates
def make_test_ca(certdir: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a leaf for localhost/127.0.0.1/::1. Returns (ca, leaf, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    certdir.mkdir(parents=True, exist_ok=True)
    ca_path, leaf_path, key_path = certdir / "ca.pem", certdir / "leaf.pem", certdir / "leaf.key"
    if ca_path.exists() and leaf_path.exists() and key_path.exists():
        return ca_path, leaf_path, key_path
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agentgate stand-in test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=29))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1")),
            ]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    leaf_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(leaf_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    key_path.chmod(0o600)
    return ca_path, leaf_path, key_path


# ---------------------------------------------------------------- request helpers
def decode_body(body: bytes, encoding: str) -> bytes:
    enc = encoding.strip().lower()
    if not enc or enc == "identity":
        return body
    if enc == "gzip":
        return gzip.decompress(body)
    if enc == "deflate":
        try:
            return zlib.decompress(body)
        except zlib.error:
            return zlib.decompress(body, -zlib.MAX_WBITS)
    if enc == "br":
        import brotli
        return brotli.decompress(body)
    if enc == "zstd":
        import zstandard
        return zstandard.ZstdDecompressor().decompressobj().decompress(body)
    raise ValueError(f"unsupported content-encoding {encoding!r}")


def _text_of(content: Any) -> str:
    """Plain text of an OpenAI/Anthropic message content (string or list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, dict):
                if isinstance(p.get("text"), str):
                    parts.append(p["text"])
                elif p.get("type") == "tool_result":
                    parts.append(_text_of(p.get("content")))
            elif isinstance(p, str):
                parts.append(p)
        return " ".join(parts)
    return ""


def _string_params(schema: Any) -> list[str]:
    if not isinstance(schema, dict):
        return []
    props = schema.get("properties") or {}
    return [k for k, v in props.items() if isinstance(v, dict) and v.get("type") == "string"] \
        or list(props)[:1]


class Conversation:
    """What the stand-in needs to know about a chat request, in any dialect."""

    def __init__(self, last_user: str, tool_result: str | None,
                 tool: tuple[str, list[str]] | None) -> None:
        self.last_user = last_user
        self.tool_result = tool_result
        self.tool = tool  # (name, string params) of the first declared tool

    def default_reply(self) -> dict[str, Any]:
        if self.tool_result is not None:
            return {"text": f"done: {self.tool_result}"}
        if self.tool is not None:
            name, params = self.tool
            return {"tool_call": {"name": name, "arguments": {p: self.last_user for p in params}}}
        return {"text": f"echo: {self.last_user}"}


def openai_chat_conversation(req: dict) -> Conversation:
    last_user, tool_result = "", None
    for m in req.get("messages") or []:
        if not isinstance(m, dict):
            continue
        if m.get("role") == "user":
            last_user, tool_result = _text_of(m.get("content")), None
        elif m.get("role") == "tool":
            tool_result = _text_of(m.get("content"))
    tool = None
    for t in req.get("tools") or []:
        fn = t.get("function") if isinstance(t, dict) else None
        if isinstance(fn, dict) and fn.get("name"):
            tool = (fn["name"], _string_params(fn.get("parameters")))
            break
    return Conversation(last_user, tool_result, tool)


def openai_responses_conversation(req: dict) -> Conversation:
    inp = req.get("input")
    last_user, tool_result = "", None
    if isinstance(inp, str):
        last_user = inp
    elif isinstance(inp, list):
        for item in inp:
            if not isinstance(item, dict):
                continue
            if item.get("role") == "user":
                last_user, tool_result = _text_of(item.get("content")), None
            elif item.get("type") == "function_call_output":
                tool_result = str(item.get("output", ""))
    tool = None
    for t in req.get("tools") or []:
        if isinstance(t, dict) and t.get("type") == "function" and t.get("name"):
            tool = (t["name"], _string_params(t.get("parameters")))
            break
    return Conversation(last_user, tool_result, tool)


def anthropic_conversation(req: dict) -> Conversation:
    last_user, tool_result = "", None
    for m in req.get("messages") or []:
        if not isinstance(m, dict) or m.get("role") != "user":
            continue
        content = m.get("content")
        results = [p for p in content if isinstance(p, dict) and p.get("type") == "tool_result"] \
            if isinstance(content, list) else []
        if results:
            tool_result = _text_of(results[-1].get("content"))
        else:
            last_user, tool_result = _text_of(content), None
    tool = None
    for t in req.get("tools") or []:
        if isinstance(t, dict) and t.get("name"):
            tool = (t["name"], _string_params(t.get("input_schema")))
            break
    return Conversation(last_user, tool_result, tool)


def _chunks(text: str, size: int) -> list[str]:
    size = max(1, size)
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


# ---------------------------------------------------------------- the server
class TLSTestServer:
    """A threaded HTTPS server on loopback with a certificate from its own throwaway CA
    (`ca_path` is what a client must trust). Subclasses give the handler class; start()
    returns once it accepts connections. Shared by the stand-in and devkit's other peers."""

    thread_name = "tlsserver"

    def __init__(self, handler: type[BaseHTTPRequestHandler], host: str = "127.0.0.1",
                 port: int = 0, certdir: str | Path | None = None,
                 prefix: str = "tlsserver-") -> None:
        import tempfile
        self.host = host
        self._certdir = Path(certdir) if certdir else Path(tempfile.mkdtemp(prefix=prefix))
        self.ca_path, self._leaf, self._key = make_test_ca(self._certdir)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(self._leaf), str(self._key))
        self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name=self.thread_name)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class StandIn(TLSTestServer):
    """The stand-in server. Thread-safe; start() returns once it accepts connections."""

    thread_name = "standin"

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 certdir: str | Path | None = None) -> None:
        self._lock = threading.Lock()
        self._requests: list[dict[str, Any]] = []
        self._script: deque[dict[str, Any]] = deque()
        self.stream_defaults: dict[str, Any] = {"delta_chars": 8, "delay": 0.0,
                                                "split_writes": False}
        handler = type("Handler", (_Handler,), {"standin": self})
        super().__init__(handler, host, port, certdir, prefix="standin-")

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    # -- what it received
    @property
    def requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()
            self._script.clear()

    def record(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self._requests.append(entry)

    # -- what it answers
    def script(self, text: str | None = None, tool_call: dict | None = None,
               **stream: Any) -> None:
        """Queue the next model reply: exact text or a tool call, and stream shape
        (delta_chars, delay, split_writes)."""
        reply: dict[str, Any] = {}
        if text is not None:
            reply["text"] = text
        if tool_call is not None:
            reply["tool_call"] = tool_call
        reply["stream"] = stream
        with self._lock:
            self._script.append(reply)

    def next_reply(self, conv: Conversation) -> tuple[dict[str, Any], dict[str, Any]]:
        with self._lock:
            scripted = self._script.popleft() if self._script else None
        reply = conv.default_reply()
        stream = dict(self.stream_defaults)
        if scripted:
            if "text" in scripted or "tool_call" in scripted:
                reply = {k: scripted[k] for k in ("text", "tool_call") if k in scripted}
            stream.update(scripted.get("stream") or {})
        return reply, stream


class _Handler(BaseHTTPRequestHandler):
    standin: StandIn
    protocol_version = "HTTP/1.1"
    server_version = "agentgate-standin/1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        log.debug(format, *args)

    def setup(self) -> None:
        # Headers and body go out in separate writes: without NODELAY, Nagle + delayed ACK
        # add ~40 ms to every keep-alive request.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().setup()

    # -- plumbing
    def _read_body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("content-length") or 0)
        return self.rfile.read(n) if n else b""

    def _send_json(self, status: int, obj: Any, extra: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _start_sse(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _sse(self, events: list[tuple[str | None, Any]], stream: dict[str, Any]) -> None:
        self._start_sse()
        delay = float(stream.get("delay") or 0)
        for name, data in events:
            payload = data if isinstance(data, str) else json.dumps(data)
            raw = (f"event: {name}\n" if name else "") + f"data: {payload}\n\n"
            b = raw.encode()
            if stream.get("split_writes") and len(b) > 2:
                # one event across two TCP writes: the gateway must reassemble it
                half = len(b) // 2
                self._write_chunk(b[:half])
                time.sleep(0.02)
                self._write_chunk(b[half:])
            else:
                self._write_chunk(b)
            if delay:
                time.sleep(delay)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # -- entry points
    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        raw = self._read_body()
        path = self.path.split("?", 1)[0]
        if path.startswith("/_standin/"):
            self._control(method, path, raw)
            return
        try:
            body = decode_body(raw, self.headers.get("content-encoding", ""))
        except Exception as e:  # noqa: BLE001 - report, do not crash the test server
            self._send_json(400, {"error": {"message": f"bad body encoding: {e}"}})
            return
        text = body.decode("utf-8", "replace")
        self.standin.record({
            "method": method, "path": self.path,
            "host": self.headers.get("host", ""),
            "headers": [[k.lower(), v] for k, v in self.headers.items()],
            "body": text, "raw_len": len(raw), "time": time.time(),
        })
        req: Any = None
        if text.strip():
            try:
                req = json.loads(text)
            except ValueError:
                req = None
        if method == "POST" and path.endswith("/chat/completions") and isinstance(req, dict):
            self._openai_chat(req)
        elif method == "POST" and path.endswith("/responses") and isinstance(req, dict):
            self._openai_responses(req)
        elif method == "POST" and path.endswith("/messages") and isinstance(req, dict):
            self._anthropic(req)
        elif method == "GET" and path.endswith("/models"):
            self._send_json(200, {"object": "list", "data": [
                {"id": "gpt-4o-mini", "object": "model", "created": 0, "owned_by": "standin"}]})
        else:
            self._send_json(200, {"ok": True, "received": len(body), "path": path})

    def _control(self, method: str, path: str, raw: bytes) -> None:
        if path == "/_standin/requests":
            self._send_json(200, self.standin.requests)
        elif path == "/_standin/reset" and method == "POST":
            self.standin.clear()
            self._send_json(200, {"ok": True})
        elif path == "/_standin/script" and method == "POST":
            spec = json.loads(raw or b"{}")
            self.standin.script(spec.get("text"), spec.get("tool_call"),
                                **(spec.get("stream") or {}))
            self._send_json(200, {"ok": True})
        else:
            self._send_json(404, {"error": "unknown control path"})

    # -- OpenAI chat completions
    def _openai_chat(self, req: dict) -> None:
        reply, stream = self.standin.next_reply(openai_chat_conversation(req))
        model = req.get("model", "gpt-4o-mini")
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:12]}", int(time.time())
        usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        tc = reply.get("tool_call")
        tool_calls = None
        if tc:
            tool_calls = [{"id": f"call_{uuid.uuid4().hex[:8]}", "type": "function",
                           "function": {"name": tc["name"],
                                        "arguments": json.dumps(tc["arguments"])}}]
        finish = "tool_calls" if tc else "stop"
        if not req.get("stream"):
            msg: dict[str, Any] = {"role": "assistant", "content": reply.get("text")}
            if tool_calls:
                msg["tool_calls"] = tool_calls
            self._send_json(200, {"id": cid, "object": "chat.completion", "created": created,
                                  "model": model, "usage": usage,
                                  "choices": [{"index": 0, "message": msg,
                                               "finish_reason": finish, "logprobs": None}]})
            return
        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}

        def chunk(delta: dict, finish_reason: str | None = None) -> dict:
            return {**base, "choices": [{"index": 0, "delta": delta,
                                         "finish_reason": finish_reason, "logprobs": None}]}

        events: list[tuple[str | None, Any]] = [(None, chunk({"role": "assistant",
                                                               "content": ""}))]
        size = int(stream.get("delta_chars") or 8)
        if tool_calls:
            call = tool_calls[0]
            events.append((None, chunk({"tool_calls": [{
                "index": 0, "id": call["id"], "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""}}]})))
            for piece in _chunks(call["function"]["arguments"], size):
                events.append((None, chunk({"tool_calls": [{
                    "index": 0, "function": {"arguments": piece}}]})))
        else:
            for piece in _chunks(reply.get("text") or "", size):
                events.append((None, chunk({"content": piece})))
        events.append((None, chunk({}, finish)))
        if (req.get("stream_options") or {}).get("include_usage"):
            events.append((None, {**base, "choices": [], "usage": usage}))
        events.append((None, "[DONE]"))
        self._sse(events, stream)

    # -- OpenAI responses
    def _openai_responses(self, req: dict) -> None:
        reply, stream = self.standin.next_reply(openai_responses_conversation(req))
        rid = f"resp_{uuid.uuid4().hex[:12]}"
        tc = reply.get("tool_call")
        if tc:
            item = {"type": "function_call", "id": f"fc_{uuid.uuid4().hex[:8]}",
                    "call_id": f"call_{uuid.uuid4().hex[:8]}", "name": tc["name"],
                    "arguments": json.dumps(tc["arguments"]), "status": "completed"}
        else:
            item = {"type": "message", "id": f"msg_{uuid.uuid4().hex[:8]}", "role": "assistant",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": reply.get("text") or "",
                                 "annotations": []}]}
        full = {"id": rid, "object": "response", "created_at": int(time.time()),
                "status": "completed", "model": req.get("model", "gpt-4o-mini"),
                "output": [item], "parallel_tool_calls": True, "tool_choice": "auto",
                "tools": [], "usage": {"input_tokens": 10, "output_tokens": 5,
                                       "total_tokens": 15,
                                       "input_tokens_details": {"cached_tokens": 0},
                                       "output_tokens_details": {"reasoning_tokens": 0}}}
        if not req.get("stream"):
            self._send_json(200, full)
            return
        size = int(stream.get("delta_chars") or 8)
        seq = iter(range(1_000_000))
        pending = {**full, "status": "in_progress", "output": []}
        events: list[tuple[str | None, Any]] = [
            ("response.created", {"type": "response.created", "sequence_number": next(seq),
                                  "response": pending})]
        if tc:
            events.append(("response.output_item.added", {
                "type": "response.output_item.added", "sequence_number": next(seq),
                "output_index": 0, "item": {**item, "arguments": "", "status": "in_progress"}}))
            for piece in _chunks(item["arguments"], size):
                events.append(("response.function_call_arguments.delta", {
                    "type": "response.function_call_arguments.delta",
                    "sequence_number": next(seq), "item_id": item["id"], "output_index": 0,
                    "delta": piece}))
        else:
            text = reply.get("text") or ""
            events.append(("response.output_item.added", {
                "type": "response.output_item.added", "sequence_number": next(seq),
                "output_index": 0, "item": {**item, "content": [], "status": "in_progress"}}))
            for piece in _chunks(text, size):
                events.append(("response.output_text.delta", {
                    "type": "response.output_text.delta", "sequence_number": next(seq),
                    "item_id": item["id"], "output_index": 0, "content_index": 0,
                    "delta": piece, "logprobs": []}))
            events.append(("response.output_text.done", {
                "type": "response.output_text.done", "sequence_number": next(seq),
                "item_id": item["id"], "output_index": 0, "content_index": 0, "text": text,
                "logprobs": []}))
        events.append(("response.output_item.done", {
            "type": "response.output_item.done", "sequence_number": next(seq),
            "output_index": 0, "item": item}))
        events.append(("response.completed", {"type": "response.completed",
                                               "sequence_number": next(seq), "response": full}))
        self._sse(events, stream)

    # -- Anthropic messages
    def _anthropic(self, req: dict) -> None:
        reply, stream = self.standin.next_reply(anthropic_conversation(req))
        mid, model = f"msg_{uuid.uuid4().hex[:12]}", req.get("model", "claude-sonnet-4-5")
        tc = reply.get("tool_call")
        if tc:
            block = {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:8]}",
                     "name": tc["name"], "input": tc["arguments"]}
        else:
            block = {"type": "text", "text": reply.get("text") or ""}
        stop = "tool_use" if tc else "end_turn"
        usage = {"input_tokens": 10, "output_tokens": 5}
        if not req.get("stream"):
            self._send_json(200, {"id": mid, "type": "message", "role": "assistant",
                                  "model": model, "content": [block], "stop_reason": stop,
                                  "stop_sequence": None, "usage": usage})
            return
        size = int(stream.get("delta_chars") or 8)
        events: list[tuple[str | None, Any]] = [("message_start", {
            "type": "message_start", "message": {
                "id": mid, "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": 10, "output_tokens": 1}}})]
        if tc:
            events.append(("content_block_start", {"type": "content_block_start", "index": 0,
                                                   "content_block": {**block, "input": {}}}))
            for piece in _chunks(json.dumps(tc["arguments"]), size):
                events.append(("content_block_delta", {
                    "type": "content_block_delta", "index": 0,
                    "delta": {"type": "input_json_delta", "partial_json": piece}}))
        else:
            events.append(("content_block_start", {"type": "content_block_start", "index": 0,
                                                   "content_block": {"type": "text",
                                                                     "text": ""}}))
            for piece in _chunks(block["text"], size):
                events.append(("content_block_delta", {
                    "type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": piece}}))
        events += [
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta",
                               "delta": {"stop_reason": stop, "stop_sequence": None},
                               "usage": {"output_tokens": 5}}),
            ("message_stop", {"type": "message_stop"}),
        ]
        self._sse(events, stream)


def main() -> None:
    ap = argparse.ArgumentParser(description="agentgate's local LLM/webhook stand-in")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9443)
    ap.add_argument("--certdir", default=None)
    args = ap.parse_args()
    s = StandIn(args.host, args.port, args.certdir).start()
    print(f"stand-in on {s.url}, CA {s.ca_path}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        s.stop()


if __name__ == "__main__":
    main()
