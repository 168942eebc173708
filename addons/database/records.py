"""One audit record per SQL statement, in the same DuckDB `flows` table as every HTTP flow,
hash-chained with them (addons/recording/store.py: the writer chains every row it appends,
whatever built it).

The relay calls the recorder made by `make_statement_recorder(recorder)` (the hook in
addons/database/hooks.py) once per statement with a plain dict (see hooks.py: identity,
session, masked SQL, kinds, tables, decision, rule, approval, rows, command tag, error,
findings, times). The row (`statement_row`, pure) is built in the gateway as plain data
and handed to the recorder, whose writer process chains and stores it:

    method      "SQL"
    url         postgresql://<databases[].name>/<database>   (the agent's view)
    upstream    <databases[].name>; host: the server's host; upstream_url: postgresql://
                <server host:port>/<database>
    request_body the SQL as the relay recorded it (literals already replaced by $n by
                 addons/database/sqlfacts.py), gateway secrets scrubbed by value, capped at
                 recorder.max_body_bytes with size + sha256 of the whole
    decision / rule / approval  as the relay decided; approvals land in `approvals` too
    outcome     refused (blocked, or a hold denied / timed out / cancelled, or a result the
                gateway refused to unmask), error (the server's error), forwarded
    error       "SQLSTATE: message" (masked by the result masker)
    latency_ms  the statement's duration
    findings    {ENTITY: count} masked in the results (never values)
    metadata    {"kind": "pg", "pg": {"statement_kind", "kinds", "tables", "functions",
                 "rows", "command", "duration_ms", "db", "database"}}
    flow_state  NULL: a statement is not a mitmproxy flow (exports skip it)

Fail closed: `record()` raises RecorderUnavailable while the store is not open; the relay
must ask `record.unavailable()` (None, or why not) before it forwards a statement, so
nothing runs that could not be recorded (a failing store's records stay queued and are
written when it recovers; its backlog full also counts as unavailable).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from addons.recording.store import Direct, Scrubber, cjson, micros, truncation_note

MAX_NAMES = 200  # tables / functions / kinds kept per record
MAX_TEXT = 4096  # characters of an error message kept
SECRETS_TTL = 5.0  # seconds; password files may be rotated


def _names(v: Any) -> list[str]:
    if not isinstance(v, list | tuple):
        return []
    return [str(x)[:256] for x in list(v)[:MAX_NAMES]]


def _findings(v: Any) -> dict[str, int]:
    if isinstance(v, dict):
        out = {}
        for k, e in v.items():
            n = e.get("count", 0) if isinstance(e, dict) else e
            try:
                out[str(k)] = int(n)
            except (TypeError, ValueError):
                out[str(k)] = 0
        return out
    if isinstance(v, int) and v > 0:
        return {"TOTAL": v}
    return {}


def _approval(v: Any) -> tuple[str | None, dict[str, Any] | None]:
    if isinstance(v, dict):
        aid = v.get("id")
        return (str(aid) if aid is not None else None), v
    if isinstance(v, str) and v:
        return v, None
    return None, None


def _outcome(stmt: dict[str, Any], approval: dict[str, Any] | None) -> tuple[str, str | None,
                                                                              str | None]:
    """(outcome, refusal_code, refusal_step)."""
    decision = stmt.get("decision")
    if decision == "block":
        return "refused", "sql_blocked", "policy"
    state = approval.get("state") if approval else None
    if decision == "approve" and state in ("denied", "timeout", "cancelled", "expired"):
        return "refused", f"approval_{state}", "approval"
    error = str(stmt.get("error") or "")
    if stmt.get("refused") or "agentgate: result refused" in error:
        return "refused", "result_refused", "masking"
    if stmt.get("error"):
        return "error", None, None
    return "forwarded", None, None


def statement_row(stmt: dict[str, Any], secrets: tuple[str, ...] = (),
                  max_body: int = 256 * 1024, record_id: str | None = None) -> dict[str, Any]:
    """The `flows` row of one statement (every column but seq, prev_hash, hash)."""
    scrub = Scrubber(secrets)
    db = str(stmt.get("db") or "")
    database = str(stmt.get("database") or "")
    upstream = str(stmt.get("upstream") or "")
    ident = stmt.get("identity") if isinstance(stmt.get("identity"), dict) else {}
    groups = ident.get("groups") if isinstance(ident.get("groups"), list | tuple) else []
    now = time.time()
    started = stmt.get("started") if isinstance(stmt.get("started"), int | float) else now
    ended = stmt.get("ended") if isinstance(stmt.get("ended"), int | float) else now
    duration = stmt.get("duration_ms")
    if not isinstance(duration, int | float):
        duration = (float(ended) - float(started)) * 1000.0
    sql = stmt.get("sql")
    body = scrub.bytes(sql.encode("utf-8", "replace")) if isinstance(sql, str) else None
    note = None
    size = len(body) if body is not None else None
    if body is not None and len(body) > max_body:
        note = truncation_note(body, max_body)
        body = body[:max_body]
    error = stmt.get("error")
    error = scrub.str(str(error))[:MAX_TEXT] if error else None
    aid, approval = _approval(stmt.get("approval"))
    outcome, rcode, rstep = _outcome(stmt, approval)
    kinds = _names(stmt.get("kinds"))
    rows = stmt.get("rows") if isinstance(stmt.get("rows"), int) else None
    command = stmt.get("command")
    findings = _findings(stmt.get("findings_by_entity") or stmt.get("findings"))
    meta = {"kind": "pg", "pg": {
        "statement_kind": kinds[0] if kinds else None, "kinds": kinds,
        "tables": _names(stmt.get("tables")), "functions": _names(stmt.get("functions")),
        "rows": rows, "command": str(command)[:200] if command else None,
        "duration_ms": round(float(duration), 3), "db": db, "database": database}}
    host = upstream.rsplit(":", 1)[0].strip("[]") if upstream else None
    url = f"postgresql://{db}/{database}"
    return {
        "id": record_id or f"pg-{uuid.uuid4()}",
        "session_id": str(stmt.get("session") or f"pg-conn-{stmt.get('peer') or '-'}"),
        "started": micros(started),
        "ended": micros(ended),
        "identity_sub": ident.get("sub"),
        "identity_iss": ident.get("iss"),
        "identity_groups": [str(g) for g in groups][:MAX_NAMES],
        "client": str(stmt.get("peer")) if stmt.get("peer") else None,
        "method": "SQL",
        "url": url,
        "host": host,
        "upstream": db or None,
        "upstream_url": f"postgresql://{upstream}/{database}" if upstream else None,
        "model": None,
        "status": None,
        "outcome": outcome,
        "decision": stmt.get("decision"),
        "rule": stmt.get("rule"),
        "refusal_code": rcode,
        "refusal_step": rstep,
        "error": error,
        "approval_id": aid,
        "approval": cjson(scrub.walk(approval)) if approval else None,
        "findings": cjson(findings),
        "findings_total": sum(findings.values()),
        "request_headers": None,
        "request_body": body,
        "request_body_note": note,
        "request_size": size,
        "response_headers": None,
        "response_body": None,
        "response_body_note": "result rows are not stored",
        "response_size": None,
        "latency_ms": round(float(duration), 3),
        "is_replay": None,
        "metadata": cjson(scrub.walk(meta)),
        "flow_state": None,
    }


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def database_secrets(rules: Any) -> set[str]:
    """The databases' real passwords (from their env variable or file), to scrub by value."""
    out: set[str] = set()
    for db in getattr(rules, "databases", ()) or ():
        env = getattr(db, "password_env", None)
        value = os.environ.get(env) if env else None
        path = getattr(db, "password_file", None)
        if not value and path:
            value = _read(path)
        if value:
            out.add(value)
    return out


def make_statement_recorder(recorder: Any) -> Callable[[dict[str, Any]], None]:
    """addons/database/hooks.py's factory: `record(stmt_dict)` queues one statement's row
    (never blocks; raises RecorderUnavailable when the store cannot take it)."""
    cache: dict[str, Any] = {"at": -1e9, "secrets": ()}

    def secrets() -> tuple[str, ...]:
        now = time.monotonic()
        if now - cache["at"] > SECRETS_TTL:
            vals = set(recorder.secret_values())
            vals |= database_secrets(getattr(recorder.holder, "rules", None))
            cache["secrets"] = tuple(sorted(vals))
            cache["at"] = now
        return cache["secrets"]

    def record(stmt: dict[str, Any]) -> None:
        snapshot = json.loads(json.dumps(stmt, default=str))  # later changes cannot race
        rid = f"pg-{uuid.uuid4()}"
        sec = secrets()
        max_body = recorder.cfg.max_body_bytes
        db = str(snapshot.get("db") or "")
        size = len(snapshot.get("sql") or "") + 2048
        # Built here, as plain data: the writer process cannot import this package (and a
        # closure cannot cross a pipe); a statement row costs little (no bodies, no state).
        recorder.record(Direct(
            row=statement_row(snapshot, sec, max_body, rid), id=rid,
            session=str(snapshot.get("session") or f"pg-conn-{snapshot.get('peer') or '-'}"),
            method="SQL", url=f"postgresql://{db}/{snapshot.get('database') or ''}",
            size=size))

    def unavailable() -> str | None:
        """Why a statement must not run now (the store cannot record it), or None. The relay
        asks before it forwards each statement: fail closed, as HTTP flows get 503."""
        return recorder.unavailable()

    record.unavailable = unavailable  # type: ignore[attr-defined]
    return record
