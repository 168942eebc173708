"""Issue 11, class 9 (recorder part): one request cannot poison the audit store.

Through a real mitmdump: a single 12 MB request used to make its audit row exceed DuckDB's
memory limit; the failed batch was retried forever and every later flow of every agent got
503 `recorder_unavailable` until restart. Now the body is stored as its first
`recorder.max_body_bytes` plus size and sha256, a batch the store refuses is split down to
the bad row (stored reduced), and a store that fails (fail closed: 503) recovers by itself
when it works again — with every record present and the hash chain verifying.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pytest

from addons.recording import store
from addons.recording.writer import ask_gateway
from tests.conftest import ROOT

pytestmark = pytest.mark.integration

RULES = ("{standin_upstreams}" + "identity:\n  required: false\n"
         + "approvals:\n  listen: \"off\"\n"
         + "recorder:\n  batch_interval_ms: 20\n")
URL = "https://api.openai.com/v1/chat/completions"


def _client(gw) -> httpx.Client:
    return httpx.Client(proxy=gw.proxy_url(), verify=str(gw.ca_cert), timeout=120)


def _ask(c: httpx.Client, session: str, text: str = "hello") -> httpx.Response:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}
    return c.post(URL, json=body, headers={"X-Agent-Session": session})


def _query(gw, sql: str) -> list[list[Any]]:
    out = ask_gateway(gw.data_dir / "agentgate.duckdb", {"op": "query", "sql": sql})
    assert out is not None and "error" not in out, out
    return out["rows"]


def _until(cond, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def _stored(gw) -> tuple[list[tuple], store.VerifyResult]:
    assert gw.stop() == 0, gw.logs()[-3000:]
    con = duckdb.connect(str(gw.data_dir / "agentgate.duckdb"), read_only=True)
    try:
        # flow_bodies: the bodies whole, inline or content-addressed (schema 2)
        rows = con.execute("SELECT f.session_id, f.status, f.refusal_code, b.request_body, "
                           "f.request_body_note, f.request_size, f.flow_state FROM flows f "
                           "JOIN flow_bodies b USING (seq) ORDER BY seq").fetchall()
        return rows, store.verify(con)
    finally:
        con.close()


def test_a_12mb_request_does_not_stop_the_recorder(gateway_factory, standin) -> None:
    gw = gateway_factory(RULES)
    big_text = "A" * (12 * 1024 * 1024)
    with _client(gw) as c:
        assert _ask(c, "before").status_code == 200
        r = _ask(c, "poison", big_text)
        assert r.status_code == 200, r.text[:500]
        forwarded = standin.requests[-1]
        # the record of the 12 MB flow is written (the writer is not stuck on it) ...
        assert _until(lambda: _query(gw, "SELECT count(*) FROM flows WHERE "
                                         "session_id = 'poison'") == [[1]]), gw.logs()[-3000:]
        # ... and every agent is still served afterwards
        for i in range(5):
            r = _ask(c, f"after-{i}")
            assert r.status_code == 200, r.text[:500]
    rows, ok = _stored(gw)
    assert ok.ok, ok.problem
    sessions = [r[0] for r in rows]
    assert sessions == ["before", "poison"] + [f"after-{i}" for i in range(5)]
    poison = rows[1]
    limit = 256 * 1024
    assert poison[5] > 12 * 1024 * 1024 and len(poison[3]) == limit
    assert "sha256 of the whole" in poison[4] and f"of {poison[5]} bytes" in poison[4]
    assert len(poison[6]) < 4 * limit  # the flow state holds capped copies too
    state = store.load_state(poison[6])
    cut = state["metadata"]["agentgate_truncated"][0]
    assert cut["path"] == ".request.content" and cut["size"] == poison[5]
    assert big_text[:1000] in json.dumps(forwarded)  # the upstream got the whole request
    assert len(json.dumps(forwarded)) > 12 * 1024 * 1024


def test_a_failing_store_refuses_then_recovers_by_itself(gateway_factory, tmp_path: Path
                                                         ) -> None:
    flag = tmp_path / "store-fails"
    # the fault is injected in the writer process, which owns the store (sitecustomize)
    fault = ROOT / "tests" / "hostile" / "_store_fault"
    gw = gateway_factory(RULES, env={"AGENTGATE_TEST_STORE_FAULT": str(flag),
                                     "PYTHONPATH": f"{fault}{os.pathsep}{ROOT}"})
    answered: dict[str, int] = {}
    n = 0

    def ask(c: httpx.Client) -> httpx.Response:
        nonlocal n
        n += 1
        r = _ask(c, f"req-{n}")
        answered[f"req-{n}"] = r.status_code
        return r

    with _client(gw) as c:
        assert ask(c).status_code == 200
        flag.write_text("x")
        # the store fails: new flows are refused (fail closed), in the caller's dialect
        assert _until(lambda: ask(c).status_code == 503), gw.logs()[-3000:]
        r = ask(c)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "recorder_unavailable"
        flag.unlink()
        # the disk works again: the gateway recovers without a restart
        assert _until(lambda: ask(c).status_code == 200), gw.logs()[-3000:]
        for _ in range(3):
            assert ask(c).status_code == 200
    rows, ok = _stored(gw)
    assert ok.ok, ok.problem
    stored = {r[0]: (r[1], r[2]) for r in rows}
    # 0 records lost: every request the gateway answered — served or refused — is recorded
    assert set(stored) == set(answered)
    for session, status in answered.items():
        assert stored[session][0] == status
        if status == 503:
            assert stored[session][1] == "recorder_unavailable"
    assert list(answered.values()).count(200) >= 5



def test_a_lone_surrogate_in_a_body_does_not_wedge_the_store(gateway_factory, standin
                                                             ) -> None:
    """A JSON escape of a lone surrogate ("\\ud800") is valid JSON that Python decodes to a
    string UTF-8 cannot encode. It reached the row (the request's `model`), which then
    could not be hashed, nor its reduced form: only a minimal record (no body, no headers,
    no metadata) was kept. (In a column a minimal record keeps, e.g. a URL, the store
    failed and every later flow got 503 until restart: tests/recording/test_writer_cpu.py.)"""
    gw = gateway_factory(RULES)
    body = b'{"model":"gpt-4o-mini\\ud800","messages":[{"role":"user","content":"hi"}]}'
    with _client(gw) as c:
        r = c.post(URL, content=body, headers={"X-Agent-Session": "surrogate",
                                               "Content-Type": "application/json"})
        assert r.status_code in (200, 400, 403), r.text[:500]
        assert _until(lambda: _query(gw, "SELECT count(*) FROM flows WHERE "
                                         "session_id = 'surrogate'") == [[1]]), \
            gw.logs()[-3000:]
        for i in range(3):
            r = _ask(c, f"after-{i}")
            assert r.status_code == 200, r.text[:500]
    rows, ok = _stored(gw)
    assert ok.ok, ok.problem
    assert [r[0] for r in rows] == ["surrogate", "after-0", "after-1", "after-2"]
    # the whole record, not a minimal one: body as forwarded, model with U+FFFD
    assert bytes(rows[0][3]) == body and rows[0][4] is None, rows[0][:6]
    con = duckdb.connect(str(gw.data_dir / "agentgate.duckdb"), read_only=True)
    try:
        model = con.execute("SELECT model FROM flows WHERE session_id = 'surrogate'"
                            ).fetchall()
    finally:
        con.close()
    assert len(model) == 1 and model[0][0].startswith("gpt-4o-mini\ufffd"), model
