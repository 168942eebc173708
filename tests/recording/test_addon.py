"""The recorder addon with mitmproxy's taddons/tflow: sessions, every kind of finished flow,
redaction by name and by value, fail-closed behaviour, shutdown; and its rules section."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import duckdb
import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow

from addons.config.holder import RulesHolder
from addons.config.loader import load_rules
from addons.config.schema import ConfigError
from addons.frame.guard import refuse
from addons.recording import store
from addons.recording.addon import Recorder
from addons.recording.config import RecorderConfig
from addons.recording.sessions import Sessions, body_session, clean_session
from addons.recording.writer import ask_gateway

REAL = "sk-proj-UNITREALKEY-000000000000000000000000"
FAULT = Path(__file__).resolve().parents[1] / "hostile" / "_store_fault"


def make_rules(tmp_path: Path, recorder: str = "") -> object:
    d = tmp_path / "rules"
    d.mkdir(exist_ok=True)
    (d / "r.yaml").write_text(textwrap.dedent("""\
        upstreams:
          - name: openai
            hosts: [api.openai.com]
            dialect: openai
            credential: {header: Authorization, prefix: "Bearer ", env: UNIT_OPENAI_KEY}
        """) + recorder)
    return load_rules(d)


@pytest.fixture
def rec(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("UNIT_OPENAI_KEY", REAL)
    holder = RulesHolder()
    holder.install(make_rules(tmp_path, "recorder:\n  batch_interval_ms: 5\n"))
    r = Recorder(holder)
    with taddons.context(r):
        r.start(tmp_path / "a.duckdb")
        assert r.writer is not None
        yield r
        r.done()


def rows(r: Recorder, sql: str = "SELECT * FROM flows ORDER BY seq") -> list[dict]:
    """Read the store through the writer process's query socket (it owns the file)."""
    assert r.writer is not None and r.writer.flush(10)
    out = ask_gateway(r.writer.path, {"op": "query", "sql": sql})
    assert out is not None and "error" not in out, out
    return [dict(zip(out["columns"], v, strict=True)) for v in out["rows"]]


def verified(r: Recorder) -> bool:
    assert r.writer is not None and r.writer.flush(10)
    out = ask_gateway(r.writer.path, {"op": "verify"})
    assert out is not None and "error" not in out, out
    return bool(out["result"]["ok"])


def openai_flow(body: dict | None = None, headers: dict | None = None) -> http.HTTPFlow:
    f = tflow.tflow()
    f.request.scheme, f.request.host, f.request.port = "https", "api.openai.com", 443
    f.request.path = "/v1/chat/completions"
    f.request.headers["content-type"] = "application/json"
    f.request.content = json.dumps(body or {"model": "gpt-4o-mini", "messages": []}).encode()
    for k, v in (headers or {}).items():
        f.request.headers[k] = v
    f.metadata["upstream"] = {"name": "openai", "dialect": "openai"}
    return f


def run(r: Recorder, f: http.HTTPFlow, *, forward: bool = True) -> None:
    r.requestheaders(f)
    Sessions(r.holder).request(f)  # the body-named session, before masking
    if forward:  # what credentials does: the real key goes upstream, to another address
        f.request.headers["authorization"] = f"Bearer {REAL}"
        f.request.host, f.request.port = "127.0.0.1", 9443
    if f.response is None:
        f.response = tflow.tresp(content=b'{"model": "gpt-4o-mini", "choices": []}')
    r.response(f)


# ---------------------------------------------------------------- sessions
def test_session_from_header_body_or_connection(rec: Recorder) -> None:
    a = openai_flow(headers={"X-Agent-Session": "run-1"})
    rec.requestheaders(a)
    assert a.metadata["session"] == "run-1"  # set early: annotate shows it in mitmweb
    b = openai_flow({"model": "m", "metadata": {"thread_id": "lg-9"}})
    rec.requestheaders(b)
    assert b.metadata["session"] == f"conn-{b.client_conn.id}"
    Sessions(rec.holder).request(b)
    assert b.metadata["session"] == "lg-9"
    assert b.metadata["recorder"]["session_source"] == "body:metadata.thread_id"
    c = openai_flow({"model": "m"})
    rec.requestheaders(c)
    Sessions(rec.holder).request(c)
    assert c.metadata["session"] == f"conn-{c.client_conn.id}"


def test_session_header_any_case_first_configured_wins(rec: Recorder) -> None:
    """Header names match in any case; the first configured header with a usable value
    names the session (an empty or unusable one is skipped), as headers.get() reads it."""
    cases = [({"x-agent-session": "s-low"}, "s-low", "header:X-Agent-Session"),
             ({"X-THREAD-ID": "t-1", "X-Run-Id": "r-1"}, "t-1", "header:X-Thread-Id"),
             ({"X-Agent-Session": "", "x-run-id": "r-2"}, "r-2", "header:X-Run-Id"),
             ({"X-Other": "o"}, None, "connection")]
    for headers, want, source in cases:
        f = openai_flow(headers=headers)
        rec.requestheaders(f)
        assert f.metadata["session"] == (want or f"conn-{f.client_conn.id}"), headers
        assert f.metadata["recorder"]["session_source"] == source, headers


def test_session_headers_follow_a_rules_change(rec: Recorder, tmp_path: Path) -> None:
    """The configured names (encoded once per list) are the ones in force: after a reload
    with other session_headers, the new name is read and an old one no longer is."""
    f = openai_flow(headers={"x-agent-session": "s-1", "X-Conv": "c-1"})
    rec.requestheaders(f)
    assert f.metadata["session"] == "s-1"
    rec.holder.install(make_rules(tmp_path, "recorder:\n  session_headers: [X-Conv]\n"))
    g = openai_flow(headers={"x-agent-session": "s-1", "x-CONV": "c-1"})
    rec.requestheaders(g)
    assert (g.metadata["session"], g.metadata["recorder"]["session_source"]) == \
        ("c-1", "header:X-Conv")


def test_session_values_are_cleaned() -> None:
    assert clean_session("  a b\nc<script>  ") == "a_b_c_script_"
    assert clean_session("x" * 500) == "x" * 128
    assert clean_session(True) is None and clean_session({"a": 1}) is None
    assert body_session({"metadata": {"run_id": 7}}, ("metadata.thread_id", "metadata.run_id")) \
        == ("metadata.run_id", "7")


# ---------------------------------------------------------------- every finished flow
def test_forwarded_flow_is_recorded_redacted(rec: Recorder) -> None:
    f = openai_flow(headers={"X-Agent-Session": "s1", "Cookie": "sid=agent-cookie"})
    f.response = tflow.tresp()
    f.response.content = json.dumps({"echo": REAL, "model": "gpt-4o-mini"}).encode()
    run(rec, f)
    (row,) = rows(rec)
    assert row["session_id"] == "s1" and row["outcome"] == "forwarded"
    assert row["url"] == "https://api.openai.com/v1/chat/completions"
    assert row["upstream_url"] == "https://127.0.0.1:9443/v1/chat/completions"
    hdrs = dict(json.loads(row["request_headers"]))
    assert hdrs["authorization"] == hdrs["Cookie"] == store.REDACTED
    for col in ("request_headers", "response_body", "flow_state", "metadata"):
        v = row[col]
        assert REAL.encode() not in (v if isinstance(v, bytes) else str(v).encode()), col
    assert row["model"] == "gpt-4o-mini" and row["status"] == 200


def test_flow_answered_earlier_is_recorded(rec: Recorder) -> None:
    """A flow refused by another addon's requestheaders still reaches `response`."""
    f = openai_flow(headers={"Authorization": "Bearer agent-oidc-token-xyz-123"})
    refuse(f, 403, "blocked by policy", "blocked", "policy", rule="no-secrets")
    f.metadata["decision"] = {"action": "block", "rule": "no-secrets"}
    rec.requestheaders(f)
    assert f.response.status_code == 403  # not replaced by the recorder
    Sessions(rec.holder).request(f)
    rec.response(f)
    (row,) = rows(rec)
    assert (row["outcome"], row["decision"], row["rule"], row["status"]) == \
        ("refused", "block", "no-secrets", 403)
    assert b"agent-oidc-token" not in row["flow_state"]


def test_error_connect_error_and_dedupe(rec: Recorder) -> None:
    e = tflow.tflow(err=True)
    rec.requestheaders(e)
    rec.error(e)
    rec.error(e)  # recorded once
    c = tflow.tflow()
    c.request.method = "CONNECT"
    c.request.host, c.request.port = "evil.example.org", 443
    c.request.headers["Proxy-Authorization"] = "Basic YWdlbnQ6c2VjcmV0LXRva2Vu"
    refuse(c, 403, "not a declared upstream", "destination_not_allowed", "upstreams")
    rec.http_connect_error(c)
    out = rows(rec)
    assert [r["outcome"] for r in out] == ["error", "refused"]
    assert out[1]["url"] == "evil.example.org:443" and out[1]["method"] == "CONNECT"
    assert b"YWdlbnQ6" not in out[1]["flow_state"]
    assert verified(rec)


def test_findings_and_approval_are_recorded(rec: Recorder) -> None:
    f = openai_flow()
    f.metadata["findings"] = {"EMAIL": {"count": 2, "strategy": "placeholder"}}
    f.metadata["approval"] = {"id": "ap-1", "state": "approved", "rule": "bulk",
                              "approvers": ["alice"], "reason": "ok", "decided_at": 1.5}
    f.metadata["identity"] = {"sub": "bot-7", "iss": "https://idp", "groups": ["g"]}
    run(rec, f)
    (row,) = rows(rec)
    assert json.loads(row["findings"]) == {"EMAIL": 2} and row["findings_total"] == 2
    assert row["identity_sub"] == "bot-7" and row["approval_id"] == "ap-1"
    (a,) = rows(rec, "SELECT * FROM approvals")
    assert (a["id"], a["flow_id"], a["requester"], a["decision"], a["approvers"]) == \
        ("ap-1", row["id"], "bot-7", "approved", ["alice"])


# ---------------------------------------------------------------- fail closed
def test_store_failure_refuses_new_flows_then_recovers(tmp_path: Path, monkeypatch) -> None:
    # The store fails inside the writer process (which owns it): tests/hostile/_store_fault
    # is that process's sitecustomize; the flag file is "the disk fails".
    flag = tmp_path / "store-fails"
    monkeypatch.setenv("AGENTGATE_TEST_STORE_FAULT", str(flag))
    monkeypatch.setenv("PYTHONPATH", str(FAULT))
    monkeypatch.setenv("UNIT_OPENAI_KEY", REAL)
    holder = RulesHolder(make_rules(tmp_path, "recorder:\n  batch_interval_ms: 5\n"))
    rec = Recorder(holder)
    with taddons.context(rec):
        rec.start(tmp_path / "a.duckdb")
        assert rec.writer is not None
        flag.write_text("x")
        f = openai_flow()
        run(rec, f)  # in flight when the store fails: kept queued, retried
        assert not rec.writer.flush(2)
        assert "injected: the audit disk failed" in (rec.writer.failure or "")
        g = openai_flow()
        rec.requestheaders(g)
        assert g.response is not None and g.response.status_code == 503
        body = json.loads(g.response.content)
        assert body["error"]["code"] == "recorder_unavailable"
        assert "audit store unavailable" in body["error"]["message"]
        flag.unlink()
        assert rec.writer.flush(20) and rec.writer.failure is None
        h = openai_flow()
        rec.requestheaders(h)
        assert h.response is None  # accepted again
        assert len(rows(rec)) == 1  # the in-flight flow was not lost
        rec.done()


def test_backlog_limit_refuses(rec: Recorder) -> None:
    rec.writer.max_pending = 0
    f = openai_flow()
    rec.requestheaders(f)
    assert f.response.status_code == 503 and b"backlog" in f.response.content


def test_after_close_unrecordable_responses_are_killed(rec: Recorder) -> None:
    rec.done()
    f = openai_flow()
    f.response = tflow.tresp()
    f.live = True
    rec.response(f)
    assert f.error is not None and f.error.msg == "Connection killed."
    g = openai_flow()
    rec.requestheaders(g)
    assert g.response.status_code == 503


def test_hook_exception_fails_closed(rec: Recorder, monkeypatch) -> None:
    f = openai_flow()
    rec.requestheaders(f)
    f.response = tflow.tresp()
    monkeypatch.setattr(f.response, "get_state", lambda: 1 / 0)
    rec.response(f)
    assert f.response.status_code == 502
    assert f.metadata["refusal"]["step"] == "recorder"


def test_disabled_records_nothing(tmp_path: Path) -> None:
    holder = RulesHolder(make_rules(tmp_path, "recorder:\n  enabled: false\n"))
    r = Recorder(holder)
    with taddons.context(r):
        f = openai_flow()
        r.requestheaders(f)
        assert f.response is None
        f.response = tflow.tresp()
        r.response(f)
        assert r.writer is None


def test_done_flushes_everything(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("UNIT_OPENAI_KEY", REAL)
    holder = RulesHolder(make_rules(tmp_path, "recorder:\n  batch_interval_ms: 60000\n"
                                              "  batch_size: 100000\n"))
    r = Recorder(holder)
    with taddons.context(r):
        r.start(tmp_path / "b.duckdb")
        for _ in range(300):
            run(r, openai_flow())
        r.done()  # nothing written yet (huge batch/interval): done must write it all
    con = duckdb.connect(str(tmp_path / "b.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM flows").fetchone() == (300,)
    assert store.verify(con).ok
    con.close()
    assert not Path(str(tmp_path / "b.duckdb") + ".sock").exists()


# ---------------------------------------------------------------- rules section
def test_config_defaults_and_values(tmp_path: Path) -> None:
    cfg = make_rules(tmp_path).recorder
    assert cfg == RecorderConfig() and "keep forever" in cfg.describe()
    cfg = make_rules(tmp_path, textwrap.dedent("""\
        recorder:
          retention_days: 30
          path: audit/agentgate.duckdb
          session_headers: [X-Session]
          session_body_keys: [metadata.conversation]
          batch_size: 50
          batch_interval_ms: 10
          max_pending: 1000
          max_body_bytes: 1024
          redact_headers: [X-Internal-Token]
          query_socket: false
        """)).recorder
    assert cfg.retention_days == 30 and cfg.session_headers == ("X-Session",)
    assert cfg.redact_headers == ("X-Internal-Token",) and not cfg.query_socket
    assert "keep 30 days" in cfg.describe()


@pytest.mark.parametrize("text,key", [
    ("recorder:\n  retention: 3\n", "recorder.retention"),
    ("recorder:\n  retention_days: -1\n", "recorder.retention_days"),
    ("recorder:\n  batch_size: 0\n", "recorder.batch_size"),
    ("recorder:\n  session_headers: ['bad header']\n", "recorder.session_headers[0]"),
    ("recorder:\n  session_body_keys: ['a..b']\n", "recorder.session_body_keys[0]"),
    ("recorder:\n  enabled: yes-please\n", "recorder.enabled"),
])
def test_config_errors_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        make_rules(tmp_path, text)
    assert ei.value.key == key and ei.value.file.endswith("r.yaml")


def test_redacts_extra_and_injected_headers(rec: Recorder, tmp_path: Path) -> None:
    rec.holder.install(make_rules(tmp_path, "recorder:\n  redact_headers: [X-Internal]\n"))
    f = openai_flow(headers={"X-Internal": "internal-value-123"})
    run(rec, f)
    (row,) = rows(rec)
    assert dict(json.loads(row["request_headers"]))["X-Internal"] == store.REDACTED


def test_session_shows_in_the_mitmweb_comment(rec: Recorder) -> None:
    from addons.frame.annotate import Annotate
    f = openai_flow(headers={"X-Agent-Session": "run-77"})
    a = Annotate()
    rec.requestheaders(f)  # the recorder runs after annotate in every hook…
    a.request(f)  # …but annotate's next hook already sees the session
    assert "session: run-77" in f.comment


def test_flow_state_equals_mitmproxy_get_state() -> None:
    """The recorder's cached-connection snapshot must stay identical to get_state()."""
    from mitmproxy.test import tflow

    from addons.recording.addon import ConnStates, flow_state
    conns = ConnStates()
    flows = [tflow.tflow(), tflow.tflow(resp=True), tflow.tflow(err=True),
             tflow.twebsocketflow()]
    f = tflow.tflow(resp=True)
    f.backup()
    f.request.content = b"changed"
    f.metadata["x"] = {"nested": [1, 2]}
    flows.append(f)
    for fl in flows:
        assert flow_state(fl, conns) == fl.get_state()
        assert flow_state(fl, conns) == fl.get_state()  # cached connections too
    # a connection that changed is serialised again
    g = tflow.tflow(resp=True)
    first = flow_state(g, conns)
    g.client_conn.timestamp_end = 12345.0
    assert flow_state(g, conns)["client_conn"]["timestamp_end"] == 12345.0
    assert first["client_conn"]["timestamp_end"] != 12345.0


def test_record_is_the_flow_as_it_was_when_recorded(rec: Recorder) -> None:
    """The snapshot is taken without a deep copy of the metadata (the writer's submit
    serialises it at once): what changes on the flow afterwards is not in the row; an
    object in the metadata that is not plain data gives a minimal record, never a hook
    error, and the gateway goes on recording."""
    f = openai_flow()
    f.metadata["findings"] = {"EMAIL": {"count": 1, "strategy": "placeholder"}}
    f.metadata["identity"] = {"sub": "bot-1", "groups": ["g"]}
    run(rec, f)
    f.metadata["findings"]["EMAIL"]["count"] = 99  # after the record: not in it
    f.metadata["identity"]["sub"] = "someone-else"
    f.metadata["late"] = "x"
    g = openai_flow()
    g.metadata["odd"] = object()  # not plain data
    run(rec, g)
    assert g.response is not None and g.response.status_code == 200  # not refused
    h = openai_flow()
    run(rec, h)
    out = rows(rec)
    assert [r["id"] for r in out] == [f.id, g.id, h.id]
    assert json.loads(out[0]["findings"]) == {"EMAIL": 1} and out[0]["identity_sub"] == "bot-1"
    meta = json.loads(out[0]["metadata"])
    assert "late" not in meta and meta["findings"]["EMAIL"]["count"] == 1, meta
    assert out[1]["outcome"] == "record_error" and out[2]["outcome"] != "record_error"
    assert verified(rec)


def test_connection_states_are_bounded_by_bytes(tmp_path) -> None:
    """Served connections' states stay within the byte bound (a certificate chain each), and
    a state still cached is the one serialised for that connection."""
    from mitmproxy import certs
    from mitmproxy.test import tflow

    from addons.recording.addon import ConnStates
    conns = ConnStates(size=100_000, max_bytes=64 << 10)
    cert = certs.CertStore.from_store(tmp_path, "mitmproxy", 2048).get_cert(
        "example.com", []).cert
    for _ in range(500):
        f = tflow.tflow(resp=True)
        f.server_conn.certificate_list = [cert, cert]
        st = conns.get(f.server_conn)
        assert st == f.server_conn.get_state()
        assert conns.get(f.server_conn) is st
    assert 0 < conns.bytes <= 64 << 10
    assert len(conns._cache) < 500  # noqa: SLF001 - the bound evicted old connections
