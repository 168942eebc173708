"""Hostile review of the one-parse JSON path (addons/frame/decode.py JsonFloat, masking's
copy-on-write walk and its serialisation), through a real mitmdump: what the upstream
receives and what the audit store holds must be what masking checked.

Numbers are where text and value part ways: `41111111111111110e-1` is written with 17
digits, but every JSON reader takes it for 4111111111111111.0, and when anything else in
the body is masked the body is re-serialised with that value written as
`4111111111111111.0`. Masking must judge a number in every form it reaches the upstream
in. A value spread over the numbers of a list (`[4111, 1111, 1111, 1111]`) must be seen
whether or not the list also holds something that is not an integer."""

from __future__ import annotations

import json
from typing import Any

import duckdb
import pytest

from tests.conftest import Gateway
from tests.hostile.policykit import client

pytestmark = pytest.mark.integration

HOOK = "https://hooks.example.com"
OPENAI = "https://api.openai.com"
CARD = "4111111111111111"      # Luhn-valid test card
SSN = "536224519"              # 536-22-4519
EMAIL = "ann.lee@example.com"
SECRETS = (CARD, SSN, EMAIL)


def _numbers(node: Any, out: list[str]) -> None:
    """Every way a reader of the decoded JSON sees its numbers: each number as Python
    writes it back (repr), and the digits of each container's numbers read in a row."""
    if isinstance(node, dict):
        items = list(node.values())
    elif isinstance(node, list):
        items = node
    else:
        return
    row = []
    for v in items:
        if isinstance(v, bool):
            continue
        if isinstance(v, int | float):
            out.append(repr(v))
            out.append(f"{v:.0f}" if isinstance(v, float) and v == v and abs(v) < 1e30
                       else repr(v))
            row.append(out[-1].lstrip("-"))
        _numbers(v, out)
    out.append("".join(row))


def views(body: str) -> list[str]:
    out = [body]
    try:
        doc = json.loads(body)
    except ValueError:
        return out
    out.append(json.dumps(doc, ensure_ascii=False))
    _numbers([doc], out)  # (a bare number is a document too)
    return out


def leaked(body: str) -> list[str]:
    return sorted({s for v in views(body) for s in SECRETS if s in v})


# (what, body as sent): each holds a card or SSN only as a number's value or spread over
# a container's numbers; EMAIL beside it makes masking re-serialise the body
BODIES = [
    ("exponent, re-serialised", b'{"note":"' + EMAIL.encode() + b'","n":41111111111111110e-1}'),
    ("exponent alone", b'{"n":4.111111111111111e15}'),
    ("fraction of the exponent", b'{"note":"' + EMAIL.encode() + b'","n":0.4111111111111111e16}'),
    ("list with null", b'{"ints":[4111,1111,1111,1111,null]}'),
    ("list with a float", b'{"ints":[4111,1111,1111,1111.0]}'),
    ("list with a string", b'{"ints":[4111,1111,1111,1111,"x"]}'),
    ("dict of small ints", b'{"a":4111,"b":1111,"c":1111,"d":1111}'),
    ("bare number", b'4111111111111111'),
    ("bare exponent", b'4.111111111111111e15'),
    ("bare negative", b'-4111111111111111'),
]


@pytest.fixture
def gw(gateway_factory, no_identity) -> Gateway:
    return gateway_factory("{standin_upstreams}" + no_identity)


def test_the_views_see_each_body_leak():
    # the check below can fail: every body, as sent, leaks under these views
    for what, body in BODIES:
        assert leaked(body.decode()), what


@pytest.mark.parametrize("what,body", BODIES, ids=[w for w, _ in BODIES])
def test_numbers_reach_the_upstream_only_masked(gw, standin, what, body) -> None:
    standin.clear()
    with client(gw) as c:
        r = c.post(HOOK + "/ev", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 200, (what, r.status_code, r.text[:300])
        got = standin.requests[0]["body"]
        assert leaked(got) == [], (what, got)
        # the body forwarded is JSON a strict reader accepts (no Infinity, no NaN)
        json.loads(got, parse_constant=lambda c: pytest.fail(f"{what}: {c} upstream"))
        # the gateway keeps serving
        standin.clear()
        r = c.post(HOOK + "/ok", json={"hello": "world"})
        assert r.status_code == 200 and json.loads(standin.requests[0]["body"]) == \
            {"hello": "world"}


def test_chat_turn_numbers_and_audit_store(gw, standin) -> None:
    """An LLM turn (message cache, incremental masking) and the recorder: neither the
    upstream nor the audit store holds the card written as an exponent."""
    standin.clear()
    body = {"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": f"mail {EMAIL}"},
        {"role": "tool", "tool_call_id": "t1", "content": "ok"}],
        "metadata": {"ref": 1}, "seed": 7}
    raw = json.dumps(body).encode().replace(b'"ref": 1', b'"ref": 41111111111111110e-1')
    with client(gw) as c:
        r = c.post(OPENAI + "/v1/chat/completions", content=raw,
                   headers={"content-type": "application/json",
                            "authorization": "Bearer sk-agent"})
        assert r.status_code == 200, r.text[:300]
    got = standin.requests[0]["body"]
    assert leaked(got) == [], got
    assert gw.stop() == 0
    db = gw.data_dir / "agentgate.duckdb"
    con = duckdb.connect(str(db), read_only=True)
    try:
        cols = [x[0] for x in con.execute("DESCRIBE flows").fetchall()]
        rows = con.execute(f"SELECT {', '.join(f'CAST({c} AS VARCHAR)' for c in cols)} "
                           "FROM flows").fetchall()
        blobs = con.execute("SELECT CAST(data AS VARCHAR) FROM blobs").fetchall() \
            if "blobs" in {t[0] for t in con.execute("SHOW TABLES").fetchall()} else []
    finally:
        con.close()
    stored = [str(v) for row in rows + blobs for v in row if v is not None]
    assert any("/v1/chat/completions" in s for s in stored)
    for s in stored:
        for piece in [s, *(_json_strings(s))]:
            assert leaked(piece) == [], piece[:500]


def _json_strings(s: str) -> list[str]:
    """The JSON documents inside a stored value (bodies are stored as JSON text)."""
    try:
        doc = json.loads(s)
    except ValueError:
        return []
    out: list[str] = []

    def walk(n: Any) -> None:
        if isinstance(n, str):
            out.append(n)
        elif isinstance(n, dict):
            for v in n.values():
                walk(v)
        elif isinstance(n, list):
            for v in n:
                walk(v)
    walk(doc)
    return out


@pytest.mark.parametrize("number", [b"1e400", b"-1e400", b"1.5e99999"])
def test_a_number_past_a_double_is_refused_not_forwarded_as_infinity(gw, standin, number):
    """1e400 reads as infinity; a masked (re-serialised) body would carry `Infinity`, which
    no strict JSON reader accepts. Refused in the caller's dialect: nothing goes upstream."""
    standin.clear()
    body = b'{"note":"' + EMAIL.encode() + b'","n":' + number + b"}"
    with client(gw) as c:
        r = c.post(HOOK + "/ev", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, (number, r.status_code, r.text[:300])
        assert "out of range" in r.text
        assert standin.requests == []
        r = c.post(OPENAI + "/v1/chat/completions",
                   content=b'{"model":"gpt-4o-mini","temperature":' + number
                   + b',"messages":[{"role":"user","content":"hi"}]}',
                   headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["message"], r.text[:300]
        assert standin.requests == []
        r = c.post(HOOK + "/ok", json={"hello": "world"})
        assert r.status_code == 200
