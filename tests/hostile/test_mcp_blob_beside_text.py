"""Hostile, end to end through a real mitmdump with the suite and test_mcp's scripted MCP
server over HTTPS: base64 payloads the blob walk (mcp/blobs.py) skipped.

- a resource contents item with both `text` and `blob` (the schema allows one of them; a
  client may read either): the walk skipped any item that had a text, so a client reading
  `blob` got the base64 of PII past masking. Now a blob of text (or of invalid base64)
  beside a text is dropped; the masked text is what is left.
- a text blob holding one control character (a tool's log in colours, ESC [31m, or a
  single \\x01 a hostile server puts first) counted as binary and passed unread. Now only a
  NUL (UTF-16 text) keeps a UTF-8 payload binary.
A real binary blob (PNG) still passes byte for byte.
"""

from __future__ import annotations

import base64
import json

import pytest

from addons.mcp.blobs import readable
from tests.hostile.test_mcp import evil, post  # noqa: F401 - fixture
from tests.hostile.test_mcp_resources import CARD, EMAIL, PII_TEXT, SSN, _payloads, gw, req  # noqa: F401

pytestmark = pytest.mark.integration


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def test_blob_beside_text_and_control_characters_never_pass_unread(gw, evil  # noqa: F811
                                                                   ) -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    results = {
        "both": {"contents": [{"uri": "mem://a", "mimeType": "text/plain",
                               "text": "nothing here", "blob": _b64(PII_TEXT.encode())}]},
        "both-embedded": {"content": [{"type": "resource", "resource": {
            "uri": "mem://e", "mimeType": "text/plain", "text": "see blob",
            "blob": _b64(PII_TEXT.encode())}}]},
        "ansi": {"contents": [{"uri": "mem://log", "mimeType": "text/plain",
                               "blob": _b64(f"\x1b[31mERROR\x1b[0m {PII_TEXT}\n".encode())}]},
        "ctrl": {"contents": [{"uri": "mem://c", "mimeType": "application/octet-stream",
                               "blob": _b64(b"\x01" + PII_TEXT.encode())}]},
        "ctrl-image": {"content": [{"type": "image", "mimeType": "image/png",
                                    "data": _b64(b"\x02\x03" + PII_TEXT.encode())}]},
        "png": {"contents": [{"uri": "mem://p", "mimeType": "image/png", "text": "a chart",
                              "blob": _b64(png)}]},
    }

    for name, result in results.items():
        evil.script = lambda _m, _b, res=result: (
            200, {"content-type": "application/json"},
            json.dumps({"jsonrpc": "2.0", "id": 5, "result": res}).encode())
        r = post(gw, req("resources/read", 5, uri=name))
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["id"] == 5 and "result" in got, (name, got)
        if name == "png":
            item = got["result"]["contents"][0]
            assert base64.b64decode(item["blob"]) == png and item["text"] == "a chart"
            continue
        text = json.dumps(got)
        decoded = [base64.b64decode(v).decode("utf-8", "replace") for v in _payloads(got)]
        leaked = [p for p in (SSN, EMAIL, CARD)
                  if p in text or any(p in d for d in decoded)]
        assert not leaked, (name, leaked, text[:1500])
        if name == "ansi":  # still the log, masked, colours and all
            assert "\\u001b[31mERROR" in text and "[EMAIL_" in text, text[:1500]


def test_the_walk_itself() -> None:
    pii = _b64(b"SSN 078-05-1120, ann@example.com")
    item = {"uri": "file:///a", "mimeType": "text/plain", "text": "nothing here",
            "blob": pii}
    out, changed = readable({"contents": [item]})
    assert changed
    assert out == {"contents": [{"uri": "file:///a", "mimeType": "text/plain",
                                 "text": "nothing here"}]}
    assert item["blob"] == pii  # the input is not modified
    # invalid base64 beside a text: dropped too (a lenient client would decode it)
    assert readable({"text": "t", "blob": "U1NO-IDA3OC0wNS0xMTIw"})[0] == {"text": "t"}
    # a binary blob beside a text stays (binary payloads are not read, as without text)
    png = _b64(b"\x89PNG\r\n\x1a\n\x00\x00")
    assert readable({"text": "t", "blob": png}) == ({"text": "t", "blob": png}, False)
    # control characters other than NUL keep a UTF-8 payload text
    assert readable({"blob": _b64(b"\x01\x1b[0mx")})[0] == {"text": "\x01\x1b[0mx"}
    assert readable({"blob": _b64("a".encode("utf-16-le"))})[1] is False


def test_a_servers_sampling_request_gets_its_payloads_read_too(gateway_factory,  # noqa: F811
                                                                evil) -> None:  # noqa: F811
    """A sampling/createMessage the rules let through reaches the agent's LLM: an image
    whose data is base64 text (and an embedded resource's blob) in its messages passed
    unread, only results were walked. Now every message the server sends is."""
    from tests.hostile.test_mcp import RULES as MCP_RULES
    from tests.hostile.test_mcp import call, messages, sse

    gate = gateway_factory(MCP_RULES.format(port=evil.port) + "mcp:\n  allow_sampling: true\n")
    sampling = {"jsonrpc": "2.0", "id": "s1", "method": "sampling/createMessage", "params": {
        "maxTokens": 50, "messages": [
            {"role": "user", "content": {"type": "image", "mimeType": "image/png",
                                         "data": _b64(PII_TEXT.encode())}},
            {"role": "user", "content": {"type": "resource", "resource": {
                "uri": "mem://s", "mimeType": "text/plain",
                "blob": _b64(PII_TEXT.encode())}}}]}}
    result = {"jsonrpc": "2.0", "id": 3, "result": {"content": [{"type": "text",
                                                                 "text": "ok"}]}}
    evil.script = lambda method, body: sse(sampling, result) if method == "POST" \
        else (405, {}, b"")
    r = post(gate, call("summarise", 3))
    assert r.status_code == 200, r.text
    got = messages(r)
    assert [m.get("id") for m in got] == ["s1", 3], r.text
    text = json.dumps(got)
    decoded = [base64.b64decode(v).decode("utf-8", "replace") for v in _payloads(got)]
    leaked = [p for p in (SSN, EMAIL, CARD) if p in text or any(p in d for d in decoded)]
    assert not leaked, (leaked, text[:1500])
    assert "[EMAIL_" in text, text[:1500]
