"""`agentgate audit sessions`: LLM calls, MCP tool calls and SQL statements of one agent
session side by side, policy blocks / approval denials / timeouts / cancels counted apart,
and `--session ID` listing the session's records in order. On a store file built by the
recorder's own row builder (the gateway end to end: tests/mcp/test_langgraph_mcp.py)."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest
from mitmproxy.test import tflow

from addons.cli import main
from addons.recording import store
from addons.recording.addon import build


def flow_row(session: str, *, dialect: str, path: str, body: dict, meta: dict | None = None,
             refused: dict | None = None) -> dict:
    f = tflow.tflow(resp=True)
    f.request.scheme, f.request.host, f.request.port = "https", "api.example", 443
    f.request.path = path
    f.request.content = json.dumps(body).encode()
    f.response.content = b'{"ok": true}'
    f.metadata["upstream"] = {"name": dialect + "-up", "dialect": dialect}
    f.metadata.update(meta or {})
    if refused:
        f.metadata["refusal"] = refused
        f.response.status_code = refused["status"]
    return build(store.Pending(state=f.get_state(), session=session, origin_url=None))


def sql_row(session: str, seq_hint: int, kind: str, tables: list[str]) -> dict:
    # the database path's record shape (contracts: method SQL, metadata.kind pg)
    t = 1_800_000_000 + seq_hint
    return {c: None for c in store.COLUMN_NAMES} | {
        "id": f"sql-{seq_hint}", "session_id": session, "started": store.micros(t),
        "ended": store.micros(t), "identity_groups": [], "method": "SQL",
        "url": "postgresql://crm-db/crm", "upstream": "crm-db", "outcome": "forwarded",
        "decision": "allow", "findings": store.cjson({}), "findings_total": 0,
        "request_body": b"SELECT * FROM customers WHERE id = ?",
        "metadata": store.cjson({"kind": "pg", "pg": {"statement_kind": kind,
                                                      "tables": tables, "rows": 1}})}


def approval(state: str) -> dict:
    return {"approval": {"id": f"ap-{state}", "state": state, "rule": "hold-tools",
                         "approvers": ["rev"], "reason": state}}


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "agentgate.duckdb"
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}

    def call(tool: str, **meta) -> tuple[str, dict]:
        return "/mcp", {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                        "params": {"name": tool, "arguments": {}}}

    rows = [
        flow_row("run-1", dialect="openai", path="/v1/chat/completions", body=chat),
        flow_row("run-1", dialect="mcp", path="/mcp", body={},
                 meta={"mcp": {"method": "tools/list", "tool": None}}),
        flow_row("run-1", dialect="mcp", path="/mcp", body={},
                 meta={"mcp": {"method": "tools/call", "tool": "lookup_customer"},
                       "decision": {"action": "allow", "rule": "tools-ok"}}),
        sql_row("run-1", 1, "select", ["customers"]),
        flow_row("run-1", dialect="anthropic", path="/v1/messages", body=chat),
        flow_row("run-1", dialect="mcp", path="/mcp", body={},
                 meta={"mcp": {"method": "tools/call", "tool": "delete_customer"},
                       "decision": {"action": "block", "rule": "no-deletes"}},
                 refused={"status": 403, "code": "policy_blocked", "step": "policy",
                          "rule": "no-deletes", "message": "blocked"}),
        flow_row("run-1", dialect="mcp", path="/mcp", body={},
                 meta={"mcp": {"method": "tools/call", "tool": "send_email"},
                       "decision": {"action": "approve", "rule": "hold-tools"},
                       **approval("denied")},
                 refused={"status": 403, "code": "approval_denied", "step": "approval",
                          "rule": "hold-tools", "message": "denied"}),
        flow_row("run-1", dialect="mcp", path="/mcp", body={},
                 meta={"mcp": {"method": "tools/call", "tool": "send_email"},
                       "decision": {"action": "approve", "rule": "hold-tools"},
                       **approval("timeout")},
                 refused={"status": 403, "code": "approval_timeout", "step": "approval",
                          "rule": "hold-tools", "message": "timeout"}),
        flow_row("run-1", dialect="mcp", path="/mcp", body={},
                 meta={"mcp": {"method": "tools/call", "tool": "send_email"},
                       "decision": {"action": "approve", "rule": "hold-tools"},
                       **approval("cancelled")},
                 refused={"status": 499, "code": "client_gone", "step": "approval",
                          "rule": "hold-tools", "message": "cancelled"}),
        flow_row("run-1", dialect="mcp", path="/mcp", body={},
                 meta={"mcp": {"method": "tools/call", "tool": "send_email"},
                       "decision": {"action": "approve", "rule": "hold-tools"},
                       **approval("approved")}),
        flow_row("run-1", dialect="openai", path="/v1/chat/completions", body=chat,
                 refused={"status": 401, "code": "token_expired", "step": "identity",
                          "message": "expired"}),
        flow_row("run-2", dialect="webhook", path="/hook", body={}),
        sql_row("run-2", 2, "update", ["orders"]),
    ]
    con = duckdb.connect(str(path))
    store.init_schema(con)
    store.append(con, rows, store.head(con))
    con.close()
    return path


def sessions(db: Path, capsys, *extra: str) -> list[dict]:
    assert main(["audit", "sessions", "--db", str(db), "--format", "json", *extra]) == 0
    return [json.loads(x) for x in capsys.readouterr().out.splitlines()]


def test_summary_counts_each_kind_and_outcome_apart(db: Path, capsys) -> None:
    by = {s["session_id"]: s for s in sessions(db, capsys)}
    r1 = by["run-1"]
    assert (r1["flows"], r1["llm_calls"], r1["tool_calls"], r1["mcp_other"], r1["sql"]) == (
        11, 3, 6, 1, 1)
    assert (r1["policy_blocks"], r1["denied"], r1["timeouts"], r1["cancels"],
            r1["approved"], r1["holds"], r1["refused_other"]) == (1, 1, 1, 1, 1, 4, 1)
    r2 = by["run-2"]
    assert (r2["flows"], r2["llm_calls"], r2["tool_calls"], r2["sql"], r2["other"]) == (
        2, 0, 0, 1, 1)
    # still the verified chain the recorder wrote
    assert main(["audit", "verify", "--db", str(db)]) == 0


def test_timeline_interleaves_llm_tool_and_sql(db: Path, capsys) -> None:
    rows = sessions(db, capsys, "--session", "run-1")
    assert [r["kind"] for r in rows] == ["llm", "tool", "tool", "sql", "llm", "tool", "tool",
                                         "tool", "tool", "tool", "llm"]
    assert rows[2]["what"] == "tools/call lookup_customer @mcp-up"
    assert rows[3]["what"].startswith("select") and "customers" in rows[3]["what"]
    assert rows[0]["what"] == "gpt-4o-mini @openai-up"
    assert (rows[5]["decision"], rows[5]["rule"], rows[5]["outcome"]) == (
        "block", "no-deletes", "refused")
    assert [r["approval"] for r in rows[6:10]] == ["denied", "timeout", "cancelled",
                                                   "approved"]
    # the table form prints too, and a quote in the id is data, not SQL
    assert main(["audit", "sessions", "--db", str(db), "--session", "run-1"]) == 0
    assert "tools/call lookup_customer" in capsys.readouterr().out
    assert main(["audit", "sessions", "--db", str(db), "--session", "x' OR '1'='1"]) == 1
    assert "no records for session" in capsys.readouterr().err


def test_since_filters(db: Path, capsys) -> None:
    # the SQL rows are dated 2027; the flows are from tflow's fixed clock (long ago)
    got = sessions(db, capsys, "--since", "2027-01-01")
    assert {s["session_id"]: s["flows"] for s in got} == {"run-1": 1, "run-2": 1}
