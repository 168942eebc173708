"""Masking x recorder through a real mitmdump, with real `openai` / `anthropic` clients.

1. `restore: true`: the agent gets its originals back, and yet no raw value reaches the
   audit store (bodies, flow state, metadata; the DuckDB file, its WAL, and SQL over every
   column, since DuckDB may store strings compressed) nor an `agentgate export` file, nor
   the gateway's log.
2. A session named in the request body (LangGraph's `metadata.thread_id`) is known before
   masking: two threads on one connection get their own placeholder numbering, and the
   record carries the thread's session id.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import anthropic
import duckdb
import openai
import pytest

from tests.conftest import Gateway, standin_upstreams_yaml
from tests.recording.test_e2e import assert_no_secrets, cli

pytestmark = pytest.mark.integration

EMAIL = "marta.kowalska@example.com"
SSN = "536-22-4519"
CARD = "4111 1111 1111 1111"
EMAIL_A = "thread.alpha@example.com"
EMAIL_B = "thread.beta@example.com"
RAW = (EMAIL, SSN, CARD, "4111111111111111", EMAIL_A, EMAIL_B)
PROMPT = f"I am {EMAIL}, ssn {SSN}, card {CARD}"


def rules(standin) -> str:
    ups = standin_upstreams_yaml(standin)
    for dialect in ("openai", "anthropic"):
        ups = ups.replace(f"    dialect: {dialect}\n",
                          f"    dialect: {dialect}\n    restore: true\n")
    assert ups.count("restore: true") == 2
    return (ups + "identity:\n  required: false\n" + "approvals:\n  listen: \"off\"\n"
            + "recorder:\n  batch_interval_ms: 20\n")


def oa(gw: Gateway, session: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(api_key="x", max_retries=0, timeout=30,
                         default_headers={"X-Agent-Session": session} if session else None,
                         http_client=openai.DefaultHttpxClient(proxy=gw.proxy_url(),
                                                               verify=str(gw.ca_cert)))


def an(gw: Gateway, session: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key="x", max_retries=0, timeout=30,
                               default_headers={"X-Agent-Session": session},
                               http_client=anthropic.DefaultHttpxClient(
                                   proxy=gw.proxy_url(), verify=str(gw.ca_cert)))


def upstream_saw(standin) -> str:
    return "\n".join(json.dumps(r, ensure_ascii=False) for r in standin.requests)


def wait_rows(db: Path, n: int) -> None:
    deadline = time.monotonic() + 10
    while True:  # the writer batches every 20 ms; the CLI asks the running gateway
        q = cli("audit", "query", "--db", str(db), "--format", "json",
                "SELECT count(*) AS n FROM flows")
        assert q.returncode == 0, q.stderr
        if json.loads(q.stdout.splitlines()[0])["n"] >= n or time.monotonic() > deadline:
            return
        time.sleep(0.1)


def test_restore_never_puts_raw_values_in_the_store(gateway_factory, standin,
                                                    tmp_path: Path) -> None:
    gw = gateway_factory(rules(standin))
    standin.clear()
    # OpenAI chat, not streamed: restored for the agent
    r = oa(gw, "rr-chat").chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": PROMPT}])
    assert r.choices[0].message.content == f"echo: {PROMPT}"
    standin.stream_defaults["delta_chars"] = 3  # placeholders cut across events
    try:
        # OpenAI chat, streamed
        chunks = oa(gw, "rr-stream").chat.completions.create(
            model="gpt-4o-mini", stream=True, messages=[{"role": "user", "content": PROMPT}])
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) \
            == f"echo: {PROMPT}"
        # Anthropic messages, streamed
        with an(gw, "rr-anthropic").messages.stream(
                model="claude-sonnet-4-5", max_tokens=100,
                messages=[{"role": "user", "content": PROMPT}]) as s:
            assert "".join(s.text_stream) == f"echo: {PROMPT}"
    finally:
        standin.stream_defaults["delta_chars"] = 8
    seen = upstream_saw(standin)
    assert len(standin.requests) == 3 and "[EMAIL_1]" in seen
    for v in RAW:
        assert v not in seen

    db = gw.data_dir / "agentgate.duckdb"
    wait_rows(db, 3)
    exports = []
    for session in ("rr-chat", "rr-stream", "rr-anthropic"):
        out = tmp_path / f"{session}.mitm"
        e = cli("export", "--db", str(db), "--session", session, "-o", str(out))
        assert e.returncode == 0 and "wrote 1 flows" in e.stdout, e.stdout + e.stderr
        exports.append(out)
    assert gw.stop() == 0

    con = duckdb.connect(str(db), read_only=True)
    # flow_bodies: bodies whole, inline or content-addressed (schema 2)
    rows = con.execute("SELECT f.session_id, decode(b.request_body), decode(b.response_body), "
                       "f.response_body_note, f.findings_total FROM flows f "
                       "JOIN flow_bodies b USING (seq) ORDER BY seq").fetchall()
    con.close()
    assert [r[0] for r in rows] == ["rr-chat", "rr-stream", "rr-anthropic"]
    for session, req, resp, note, findings in rows:
        # the record is what the model answered, masked: placeholders, no originals
        assert "[EMAIL_1]" in req and "[EMAIL_1]" in resp, session
        assert len(set(re.findall(r"\[[A-Z_]+_\d+\]", resp))) >= 3, (session, resp)
        assert note and "restored" in note, (session, note)
        assert findings >= 3
    assert "chat.completion.chunk" in rows[1][2] and "[DONE]" in rows[1][2]
    assert "content_block_delta" in rows[2][2]
    # bytes of the DuckDB file and its WAL, every column through SQL, the exports
    assert_no_secrets(db, *exports, values=RAW)
    # the exports carry the masked answers too (and mitmproxy reads them back)
    from mitmproxy import io
    for out in exports:
        with out.open("rb") as fh:
            (flow,) = list(io.FlowReader(fh).stream())
        body = flow.response.get_content(strict=False) or b""
        assert b"[EMAIL_1]" in body and EMAIL.encode() not in body
    logs = gw.logs()
    for v in RAW:
        assert v not in logs


def test_body_named_sessions_are_known_before_masking(gateway_factory, standin) -> None:
    gw = gateway_factory(rules(standin))
    standin.clear()
    client = oa(gw)  # no session header: one connection, two LangGraph threads
    a = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": f"mail {EMAIL_A}"}],
        metadata={"thread_id": "thread-A"})
    b = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": f"mail {EMAIL_B}"}],
        metadata={"thread_id": "thread-B"})
    again = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": f"mail {EMAIL_A}"}],
        metadata={"thread_id": "thread-A"})
    # each thread numbers its own placeholders (one connection-wide map would give
    # EMAIL_B the placeholder [EMAIL_2]), and restores its own values only
    sent = [json.loads(r["body"])["messages"][0]["content"] for r in standin.requests]
    assert sent == ["mail [EMAIL_1]", "mail [EMAIL_1]", "mail [EMAIL_1]"]
    assert a.choices[0].message.content == f"echo: mail {EMAIL_A}"
    assert b.choices[0].message.content == f"echo: mail {EMAIL_B}"
    assert again.choices[0].message.content == f"echo: mail {EMAIL_A}"
    assert gw.stop() == 0
    con = duckdb.connect(str(gw.data_dir / "agentgate.duckdb"), read_only=True)
    rows = con.execute("SELECT session_id, client, metadata->>'$.recorder.session_source' "
                       "FROM flows ORDER BY seq").fetchall()
    con.close()
    assert [r[0] for r in rows] == ["thread-A", "thread-B", "thread-A"]
    assert len({r[1] for r in rows}) == 1  # really one client connection
    assert {r[2] for r in rows} == {"body:metadata.thread_id"}
    assert_no_secrets(gw.data_dir / "agentgate.duckdb", values=(EMAIL_A, EMAIL_B))
