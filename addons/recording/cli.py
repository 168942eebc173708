"""CLI of the recorder: `agentgate audit verify|query|sessions` and `agentgate export`.

Every command works whether or not the gateway is running. DuckDB allows only one process to
open the database file while it is being written, so when a gateway serves the store these
commands ask it over its local query socket (`<db>.sock`, see addons/recording/writer.py);
otherwise they open the file read-only. Either way only read-only statements run.

  agentgate audit verify                     exit 0: chain intact; exit 1: first bad record
  agentgate audit query "SELECT …"           read-only SQL (--format table|csv|json)
  agentgate audit sessions [--since 7d]      recent sessions: LLM calls, MCP tool calls and SQL
                                             statements side by side; policy blocks, approval
                                             denials, timeouts and cancels counted apart
  agentgate audit sessions --session ID      one session's records in order (llm/tool/sql/http)
  agentgate export --session ID -o FILE.mitm flows for mitmdump -nr / --server-replay / -C

With `--lake [CATALOG]` every command reads the audit lake instead (every replica's records,
column `replica` says whose; addons/recording/lake.py); without a CATALOG, the rules'
`audit_lake:`. `audit verify --lake` walks every replica's chain across its segments.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import duckdb

DB_NAME = "agentgate.duckdb"
# flows per export request (as store.EXPORT_PAGE; not imported: the CLI starts without store)
EXPORT_PAGE = 500


# ---------------------------------------------------------------- plumbing
def default_db() -> Path:
    """--db, else $AGENTGATE_DB, else the rules' recorder.path, else <data>/agentgate.duckdb."""
    if os.environ.get("AGENTGATE_DB"):
        return Path(os.environ["AGENTGATE_DB"])
    data = Path(os.environ.get("AGENTGATE_DATA", "data"))
    try:
        from addons.config.loader import load_rules
        rules = load_rules(os.environ.get("AGENTGATE_RULES", "rules"))
        path = getattr(rules.recorder, "path", None)
        if path:
            p = Path(path).expanduser()
            return p if p.is_absolute() else data / p
    except Exception:  # noqa: BLE001, S110 - rules are optional for the audit commands
        pass
    return data / DB_NAME


def parse_since(text: str | None) -> float | None:
    """`7d`, `12h`, `30m`, `90s` ago, or an ISO date/time (UTC unless it has an offset)."""
    if not text:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if m:
        mult = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
        return time.time() - float(m.group(1)) * mult
    try:
        dt = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--since: expected e.g. 7d, 12h, 30m or an ISO time, got {text!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.UTC)
    return dt.timestamp()


class AuditError(Exception):
    pass


def call(db: Any, req: dict[str, Any]) -> dict[str, Any]:
    """Run a read-only operation through the gateway's socket or on the file directly."""
    from addons.recording import writer as audit_writer
    if not isinstance(db, Path):
        return call_lake(db, req)
    try:
        resp = audit_writer.ask_gateway(db, req)
    except OSError as e:  # a socket not to be asked, or the gateway went away mid-answer
        raise AuditError(str(e)) from None
    if resp is None:
        if not db.exists():
            raise AuditError(f"no audit store at {db} (set --db or AGENTGATE_DATA)")
        try:
            con = audit_writer.open_db(db, read_only=True)
        except Exception as e:  # noqa: BLE001 - duckdb raises IOException for the lock
            hint = audit_writer.open_failure_hint(db, e)
            if not hint or "another process" in hint:
                hint = ("If a gateway is writing it, enable its query socket "
                        "(recorder.query_socket) so the CLI can ask it.")
            raise AuditError(
                f"cannot open {db} read-only ({type(e).__name__}: {str(e).splitlines()[0]}). "
                f"{hint[:1].upper()}{hint[1:]}") from None
        try:
            resp = audit_writer.handle_op(con, req)
        except ValueError as e:
            raise AuditError(str(e)) from None
        except duckdb.Error as e:  # bad SQL: one clear line, not a traceback
            raise AuditError(f"{type(e).__name__}: {str(e).splitlines()[0]}") from None
        finally:
            con.close()
    if "error" in resp:
        raise AuditError(resp["error"])
    return resp


def _cell(v: Any) -> str:
    if isinstance(v, bytes | bytearray):
        return f"<{len(v)} bytes>"
    if v is None:
        return ""
    if isinstance(v, list | tuple | dict):
        return json.dumps(v, default=str)
    return str(v)


def print_rows(cols: list[str], rows: list, fmt: str, out: Any = None) -> None:
    out = out or sys.stdout
    if fmt == "json":
        from addons.recording.store import to_jsonable
        for r in rows:
            out.write(json.dumps(to_jsonable(dict(zip(cols, r, strict=False)))) + "\n")
        return
    if fmt == "csv":
        w = csv.writer(out)
        w.writerow(cols)
        for r in rows:
            w.writerow([_cell(v) for v in r])
        return
    cells = [[_cell(v).replace("\n", "\\n") for v in r] for r in rows]
    widths = [min(60, max([len(c)] + [len(r[i]) for r in cells])) for i, c in enumerate(cols)]
    out.write("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip() + "\n")
    for r in cells:
        out.write("  ".join((v if len(v) <= w else v[:w - 1] + "…").ljust(w)
                            for v, w in zip(r, widths, strict=True)).rstrip() + "\n")
    out.write(f"({len(rows)} row{'s' if len(rows) != 1 else ''})\n")


# ---------------------------------------------------------------- commands
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="query and verify the audit store (DuckDB)")
    asub = p.add_subparsers(dest="audit_command", required=True)

    def db_arg(q: argparse.ArgumentParser) -> None:
        q.add_argument("--db", type=Path, default=None,
                       help="audit store (default: $AGENTGATE_DB, the rules' recorder.path, "
                            "or $AGENTGATE_DATA/agentgate.duckdb)")
        q.add_argument("--lake", nargs="?", const="", default=None, metavar="CATALOG",
                       help="read the audit lake (every replica) instead: a DuckLake catalog "
                            "(postgresql://… or a .ducklake file); without CATALOG the "
                            "rules' audit_lake")

    v = asub.add_parser("verify", help="walk the hash chain; exit 1 at the first bad record")
    db_arg(v)
    v.add_argument("--json", action="store_true", help="print the result as JSON")
    v.add_argument("--head", help="also require this head hash (anchored elsewhere)")
    v.set_defaults(func=cmd_verify)

    q = asub.add_parser("query", help="run read-only SQL against the audit store")
    db_arg(q)
    q.add_argument("sql", help='e.g. "SELECT session_id, count(*) FROM flows GROUP BY 1"')
    q.add_argument("--format", choices=("table", "csv", "json"), default="table")
    q.add_argument("--max-rows", type=int, default=10_000)
    q.set_defaults(func=cmd_query)

    s = asub.add_parser("sessions", help="recent sessions: LLM calls, tool calls and SQL side "
                                         "by side, with blocks, denials, timeouts, cancels")
    db_arg(s)
    s.add_argument("--since", help="only sessions active since (7d, 12h, 2026-11-01T00:00)")
    s.add_argument("--session", help="list this session's records in order instead")
    s.add_argument("--limit", type=int, default=50)
    s.add_argument("--format", choices=("table", "csv", "json"), default="table")
    s.set_defaults(func=cmd_sessions)

    e = sub.add_parser("export", help="write a session's recorded flows as a mitmproxy .mitm "
                                      "file (mitmdump -nr / --server-replay / --client-replay)")
    db_arg(e)
    e.add_argument("--session", help="session id (see `agentgate audit sessions`)")
    e.add_argument("--all", action="store_true", help="every session")
    e.add_argument("--since", help="only flows that ended since (7d, 12h, ISO time)")
    e.add_argument("-o", "--output", type=Path, required=True, help="FILE.mitm to write")
    e.add_argument("--as-forwarded", action="store_true",
                   help="keep the address the gateway forwarded to (forward_to) instead of "
                        "the host the agent asked for")
    e.add_argument("--via", metavar="PROXY_URL",
                   help="prepare the flows for `mitmdump --client-replay FILE --mode "
                        "upstream:PROXY_URL` (re-send through a gateway, e.g. "
                        "http://127.0.0.1:8080); mitmproxy requires the recorded proxy mode "
                        "to match")
    e.set_defaults(func=cmd_export)


def _db(args: argparse.Namespace) -> Any:
    if getattr(args, "lake", None) is not None:
        return lake_config(args.lake)
    return args.db or default_db()


def lake_config(catalog: str) -> Any:
    """The lake to read: CATALOG, else the rules' audit_lake (AuditError if neither)."""
    from addons.recording.lake import LakeConfig
    if catalog:
        return LakeConfig(catalog=catalog)
    try:
        from addons.config.loader import load_rules
        cfg = load_rules(os.environ.get("AGENTGATE_RULES", "rules")).audit_lake
    except Exception as e:  # noqa: BLE001 - said to the user
        raise AuditError(f"--lake without a catalog reads the rules' audit_lake: {e}") from None
    if cfg is None:
        raise AuditError("no audit_lake in the rules: give --lake CATALOG")
    return cfg


def call_lake(cfg: Any, req: dict[str, Any]) -> dict[str, Any]:
    """A read-only operation on the audit lake (read-only attach, read-only SQL only)."""
    from addons.recording import lake
    from addons.recording import writer as audit_writer
    try:
        con = lake.open_for_queries(cfg)
    except lake.LakeError as e:
        raise AuditError(str(e)) from None
    try:
        if req.get("op") == "verify":
            return {"lake": lake.verify(con).to_dict()}
        return audit_writer.handle_op(con, req)
    except ValueError as e:
        raise AuditError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - e.g. a Parquet file gone: say so, exit non-zero
        raise AuditError(lake.redact_catalog(
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", cfg.catalog)
        ) from None
    finally:
        con.close()


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        resp = call(_db(args), {"op": "verify"})
    except AuditError as e:
        print(f"agentgate audit verify: {e}", file=sys.stderr)
        return 2
    if "lake" in resp:
        return print_lake_verify(resp["lake"], args.json)
    r = resp["result"]
    if r["ok"] and args.head and r["head_hash"] != args.head:
        r["ok"] = False
        r["problem"] = (f"head is {r['head_hash']} (seq {r['head_seq']}), expected {args.head}: "
                        "records were removed or the chain was rewritten")
    if args.json:
        print(json.dumps(r))
    elif r["ok"]:
        start = f" after retention checkpoint seq {r['checkpoint_seq']}" \
            if r["checkpoint_seq"] else ""
        print(f"OK: {r['count']} records verified{start}; head seq {r['head_seq']} "
              f"hash {r['head_hash']}")
    else:
        print(f"TAMPERED: {r['problem']}", file=sys.stderr)
        print(f"({r['count']} records verified before it)", file=sys.stderr)
    return 0 if r["ok"] else 1


def print_lake_verify(r: dict[str, Any], as_json: bool) -> int:
    if as_json:
        print(json.dumps(r))
    else:
        for rep in r["replicas"]:
            if rep["ok"]:
                print(f"OK: replica {rep['replica']}: {rep['count']} records in "
                      f"{rep['segments']} segments; head seq {rep['head_seq']} "
                      f"hash {rep['head_hash']}")
        for p in r["problems"]:
            print(f"TAMPERED: {p}", file=sys.stderr)
        if not r["replicas"]:
            print("OK: the lake holds no records yet")
    return 0 if r["ok"] else 1


def cmd_query(args: argparse.Namespace) -> int:
    try:
        resp = call(_db(args), {"op": "query", "sql": args.sql, "max_rows": args.max_rows})
    except AuditError as e:
        print(f"agentgate audit query: {e}", file=sys.stderr)
        return 1
    print_rows(resp["columns"], resp["rows"], args.format)
    return 0


# What each record is, from the columns every record has: LLM calls are flows to an
# openai/anthropic upstream, tool calls carry metadata.mcp (addons/mcp), SQL statements are
# the database path's records (method SQL, metadata.kind pg). Approval outcomes come from the
# hashed approval column, policy blocks from the decision and refusal code.
_KINDS = """
WITH f AS (
  SELECT *,
         json_extract_string(metadata, '$.upstream.dialect') AS _dialect,
         json_extract_string(metadata, '$.mcp.method') AS _mcp_method,
         json_extract_string(approval, '$.state') AS _approval_state,
         coalesce(method = 'SQL' OR json_extract_string(metadata, '$.kind') = 'pg', FALSE)
           AS _is_sql
  FROM flows
  WHERE {where}
), k AS (
  SELECT *,
         CASE WHEN _is_sql THEN 'sql'
              WHEN _mcp_method IS NOT NULL THEN 'tool'
              WHEN _dialect IN ('openai', 'anthropic') THEN 'llm'
              ELSE 'http' END AS kind,
         coalesce(decision = 'block' OR refusal_code = 'policy_blocked', FALSE)
           AS _policy_block
  FROM f
)"""

SESSIONS_SQL = _KINDS + """
SELECT session_id,
       min(started) AS first_seen, max(ended) AS last_seen,
       count(*) AS flows,
       count(*) FILTER (WHERE kind = 'llm') AS llm_calls,
       count(*) FILTER (WHERE kind = 'tool' AND _mcp_method = 'tools/call') AS tool_calls,
       count(*) FILTER (WHERE kind = 'tool' AND _mcp_method <> 'tools/call') AS mcp_other,
       count(*) FILTER (WHERE kind = 'sql') AS sql,
       count(*) FILTER (WHERE kind = 'http') AS other,
       count(*) FILTER (WHERE _policy_block) AS policy_blocks,
       count(*) FILTER (WHERE outcome = 'refused' AND NOT _policy_block
                        AND _approval_state IS DISTINCT FROM 'denied'
                        AND _approval_state IS DISTINCT FROM 'timeout'
                        AND _approval_state IS DISTINCT FROM 'cancelled') AS refused_other,
       count(*) FILTER (WHERE approval_id IS NOT NULL) AS holds,
       count(*) FILTER (WHERE _approval_state = 'approved') AS approved,
       count(*) FILTER (WHERE _approval_state = 'denied') AS denied,
       count(*) FILTER (WHERE _approval_state = 'timeout') AS timeouts,
       count(*) FILTER (WHERE _approval_state = 'cancelled') AS cancels,
       coalesce(sum(findings_total), 0) AS findings,
       count(*) FILTER (WHERE outcome IN ('error', 'killed')) AS errors,
       string_agg(DISTINCT identity_sub, ',') AS identities
FROM k
GROUP BY session_id
ORDER BY last_seen DESC
LIMIT {limit}
"""

TIMELINE_SQL = _KINDS + """
SELECT seq, started, kind,
       CASE kind
         WHEN 'sql' THEN concat_ws(' ', json_extract_string(metadata, '$.pg.statement_kind'),
                                   json_extract_string(metadata, '$.pg.tables'),
                                   upstream)
         WHEN 'tool' THEN concat_ws(' ', _mcp_method,
                                    coalesce(json_extract_string(metadata, '$.mcp.tool'),
                                             json_extract_string(metadata, '$.mcp.uri'),
                                             json_extract_string(metadata, '$.mcp.prompt')),
                                    '@' || upstream)
         WHEN 'llm' THEN concat_ws(' ', model, '@' || upstream)
         ELSE concat_ws(' ', method, url) END AS what,
       coalesce(decision, '') AS decision, coalesce(rule, '') AS rule,
       outcome, status, coalesce(_approval_state, '') AS approval,
       findings_total AS findings, identity_sub
FROM k
ORDER BY seq
LIMIT {limit}
"""


def _sql_str(value: str) -> str:
    """A SQL string literal (the query op takes no parameters)."""
    return "'" + value.replace("'", "''") + "'"


def sessions_sql(since: float | None, limit: int, session: str | None = None) -> str:
    """The summary (or, with `session`, that session's timeline) as one read-only SELECT."""
    conds = ["TRUE"]
    if since is not None:
        conds.append(f"ended >= make_timestamp({int(round(since * 1_000_000))})")
    if session is not None:
        conds.append(f"session_id = {_sql_str(session)}")
    template = TIMELINE_SQL if session is not None else SESSIONS_SQL
    return template.format(where=" AND ".join(conds), limit=max(1, int(limit)))


def cmd_sessions(args: argparse.Namespace) -> int:
    try:
        since = parse_since(args.since)
        sql = sessions_sql(since, args.limit if args.session is None else 100_000,
                           args.session)
        resp = call(_db(args), {"op": "query", "sql": sql, "max_rows": 100_000})
    except (AuditError, argparse.ArgumentTypeError) as e:
        print(f"agentgate audit sessions: {e}", file=sys.stderr)
        return 1
    if args.session is not None and not resp["rows"]:
        print(f"agentgate audit sessions: no records for session {args.session!r}",
              file=sys.stderr)
        return 1
    print_rows(resp["columns"], resp["rows"], args.format)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if not args.session and not args.all:
        print("agentgate export: give --session ID (or --all)", file=sys.stderr)
        return 2
    try:
        since = parse_since(args.since)
        db = _db(args)
        req = {"op": "export", "session": None if args.all else args.session, "since": since}
        first = call(db, {**req, "limit": EXPORT_PAGE})
        n, masked = write_mitm(_pages(db, req, first), args.output,
                               as_forwarded=args.as_forwarded, via=args.via)
    except (AuditError, argparse.ArgumentTypeError) as e:
        print(f"agentgate export: {e}", file=sys.stderr)
        return 1
    if n == 0:
        print(f"agentgate export: no recorded flows for session {args.session!r}",
              file=sys.stderr)
        return 1
    print(f"wrote {n} flows to {args.output}")
    if masked:
        print(f"note: {masked} of them were masked before they left, so an agent's raw "
              "request will not match them byte for byte; for mitmdump --server-replay add "
              "--set server_replay_ignore_content=true (answers in recorded order)",
              file=sys.stderr)
    return 0


def _pages(db: Any, req: dict[str, Any], first: dict[str, Any]) -> Iterator[Any]:
    """The flows of an export, a page per request (the gateway's socket or the file), so
    neither side holds a whole store's states at once; an answer without "next" (a gateway
    from before pages) was everything."""
    resp = first
    while True:
        yield from resp["rows"]
        if resp.get("next") is None:
            return
        resp = call(db, {**req, "after": resp["next"], "limit": EXPORT_PAGE})


def write_mitm(rows: Iterable[Any], output: Path, as_forwarded: bool = False,
               via: str | None = None) -> tuple[int, int]:
    """Rebuild flows from their stored (already redacted) state and write a .mitm file.

    Returns (flows written, flows whose content the masker changed)."""
    from urllib.parse import urlsplit

    from mitmproxy import flow as mflow
    from mitmproxy import io as mio
    from mitmproxy.io import compat
    from mitmproxy.proxy.mode_specs import ProxyMode

    from addons.recording.store import REDACTED, load_state

    n = masked = 0
    tmp = output.with_name(output.name + ".part")
    with open(tmp, "wb") as fh:
        writer = mio.FlowWriter(fh)
        for _id, url, blob in rows:
            state = compat.migrate_flow(load_state(blob))
            flow = mflow.Flow.from_state(state)
            req = getattr(flow, "request", None)
            if req is not None:
                if url and not as_forwarded and req.method != "CONNECT":
                    u = urlsplit(url)
                    if u.scheme and u.hostname:
                        req.scheme = u.scheme
                        req.host = u.hostname
                        req.port = u.port or (443 if u.scheme == "https" else 80)
                # Redacted credentials are dropped: a client replay through the gateway then
                # carries no placeholder the identity step would reject as a token.
                for name in [k for k, v in req.headers.items(multi=True) if v == REDACTED]:
                    del req.headers[name]
            if flow.metadata.get("findings"):
                masked += 1
            if via:
                flow.client_conn.proxy_mode = ProxyMode.parse(f"upstream:{via}")
            writer.add(flow)
            n += 1
    tmp.replace(output)
    return n, masked
