"""Issue 11, class 7 (request side): masking everywhere a value can travel, through a real
mitmdump. Each value is sent where masking used to be blind (non-credential headers, URL
path and query, multipart field and file names, JSON keys that look structural, values
split across sibling fields / array items / NDJSON lines, separators other than space, dash
and dot); the stand-in upstream must receive none of them (raw, JSON-decoded, URL-decoded)
and the audit store must not hold them."""

from __future__ import annotations

import json
from urllib.parse import unquote, unquote_plus

import duckdb
import httpx
import pytest

from tests.conftest import Gateway

pytestmark = pytest.mark.integration

HOOK = "https://hooks.example.com"
OPENAI = "https://api.openai.com"
EMAIL = "ann.lee@example.com"
SSN = "536-22-4519"
VALUES = [EMAIL, "ann.lee%40example.com", "4111-1111-1111-1111", "4111,1111,1111,1111",
          "4111/1111/1111/1111", "4111_1111_1111_1111", "4111\n1111\n1111\n1111",
          "4111111111111111", SSN, "536_22_4519", "536/22/4519", "536\n22\n4519",
          "GB82WEST12345698765432", "GB82/WEST/1234/5698/7654/32"]


def views(text: str) -> list[str]:
    out = [text, unquote(text), unquote_plus(text)]
    try:
        out.append(json.dumps(json.loads(text), ensure_ascii=False))
    except ValueError:
        pass
    for t in list(out):
        out.append(t.replace("\\n", "\n").replace("\\/", "/"))
    return out


def leaked(text: str) -> list[str]:
    return sorted({v for t in views(text) for v in VALUES if v in t})


def received(standin) -> str:
    """Everything the upstream got: path, headers and body of each request, and each body
    JSON-decoded (recursively through JSON strings)."""
    parts = []
    for r in standin.requests:
        parts += [r["path"], json.dumps(r["headers"], ensure_ascii=False), r["body"]]
        for line in r["body"].split("\n"):
            try:
                parts.append(json.dumps(json.loads(line), ensure_ascii=False))
            except ValueError:
                pass
    return "\n".join(parts)


@pytest.fixture
def gw(gateway_factory, no_identity) -> Gateway:
    return gateway_factory("{standin_upstreams}" + no_identity)


def client(gw: Gateway) -> httpx.Client:
    return httpx.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=60)


def normal_request_works(gw: Gateway, standin) -> None:
    standin.clear()
    with client(gw) as c:
        r = c.post(HOOK + "/ok", json={"hello": "world"})
    assert r.status_code == 200, r.text
    assert json.loads(standin.requests[0]["body"]) == {"hello": "world"}


def test_headers_path_query_multipart_names(gw, standin) -> None:
    standin.clear()
    with client(gw) as c:
        r = c.post(HOOK + "/customers/ann.lee%40example.com/cards/4111/1111/1111/1111",
                   params={"ssn": "536_22_4519", "note": "GB82/WEST/1234/5698/7654/32"},
                   headers={"x-customer": EMAIL, "x-card": "4111,1111,1111,1111",
                            "x-ssn": "536/22/4519", "user-agent": "agent/1"},
                   json={"ok": True})
        assert r.status_code == 200, r.text
        files = {"file": ("statement 4111_1111_1111_1111.pdf", b"%PDF-1.4", "application/pdf")}
        r = c.post(HOOK + "/upload", files=files, data={EMAIL: "owner"})
        assert r.status_code == 200, r.text
    got = received(standin)
    assert len(standin.requests) == 2
    assert leaked(got) == [], got[:3000]
    # what is not PII is left as it was
    assert "user-agent" in got and "agent/1" in got and "/customers/" in got
    normal_request_works(gw, standin)


def test_structural_keys_split_values_and_separators_in_bodies(gw, standin) -> None:
    standin.clear()
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"who": {"type": "string",
                                                  "format": f"like {EMAIL}",
                                                  "description": "x"}}}}}
    bodies = [
        (HOOK + "/ev", {"format": f"ssn {SSN}", "id": "4111-1111-1111-1111",
                        "type": "GB82WEST12345698765432", "status": "536/22/4519",
                        "parts": ["4111", "1111", "1111", "1111"],
                        "mail": ["ann.lee@", "example.com"],
                        "ints": [4111, 1111, 1111, 1111]}),
        (OPENAI + "/v1/chat/completions",
         {"model": "gpt-4o-mini", "tools": [tool], "messages": [
             {"role": "user", "content": [{"type": "text", "text": "card 4111\n1111"},
                                          {"type": "text", "text": "\n1111\n1111 and 536\n22"},
                                          {"type": "text", "text": "\n4519"}]}]}),
    ]
    with client(gw) as c:
        for url, body in bodies:
            r = c.post(url, json=body, headers={"authorization": "Bearer x"})
            assert r.status_code == 200, (url, r.text[:300])
        lines = [json.dumps({"model": "m", "message": {"content": p}})
                 for p in ["my mail is ann.l", "ee@exam", "ple.com and ssn 536-2", "2-4519"]]
        r = c.post(HOOK + "/batch", content="\n".join(lines).encode(),
                   headers={"content-type": "application/x-ndjson"})
        assert r.status_code == 200, r.text
    got = received(standin)
    assert len(standin.requests) == 3
    assert leaked(got) == [], got[:3000]
    ndjson = standin.requests[2]["body"]
    for part in ("ann.l", "ee@exam", "536-2"):
        assert part not in ndjson, ndjson
    assert all(json.loads(line)["model"] == "m" for line in ndjson.split("\n"))
    normal_request_works(gw, standin)


def test_record_holds_what_was_forwarded(gw, standin) -> None:
    standin.clear()
    with client(gw) as c:
        r = c.post(HOOK + "/p/ann.lee%40example.com", params={"q": "4111/1111/1111/1111"},
                   headers={"x-who": EMAIL}, json={"id": SSN})
        assert r.status_code == 200, r.text
    assert leaked(received(standin)) == []
    assert gw.stop() == 0
    db = gw.data_dir / "agentgate.duckdb"
    raw = db.read_bytes() + b"".join(p.read_bytes() for p in db.parent.glob("*.wal"))
    assert leaked(raw.decode("latin-1")) == []
    con = duckdb.connect(str(db), read_only=True)
    try:
        cols = [r[0] for r in con.execute("DESCRIBE flows").fetchall()]
        rows = con.execute(f"SELECT {', '.join(f'CAST({c} AS VARCHAR)' for c in cols)} "
                           "FROM flows").fetchall()
    finally:
        con.close()
    text = json.dumps(rows, default=str, ensure_ascii=False)
    assert "/p/" in text
    assert leaked(text) == [], text[:3000]
