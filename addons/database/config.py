"""The `databases:` rules section (a list): one Postgres listener per entry.

```yaml
databases:
  - name: warehouse
    listen: 127.0.0.1:15432
    upstream: db.internal:5432
    database: analytics
    credential: {user: agent_rw, password_env: WAREHOUSE_PASSWORD}
    server_tls: {mode: verify-full, ca_file: /etc/ssl/db-ca.pem}
    allow_groups: [analysts]
    sql:
      - {name: no-ddl, action: block, match: {kinds: [DDL, DCL]}}
      - {name: writes-need-review, action: approve, approvers: [dba], match: {kinds: [INSERT]}}
    mask_columns:
      - {column: "*.users.email", strategy: redact}
```

Every error names the file, the key path and the reason (config/schema.py). Parsing is
pure; the password is read when the gateway logs in (`read_secret`), never stored here.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from addons.config.schema import (
    Where,
    expect_bool,
    expect_int,
    expect_map,
    expect_str,
    expect_str_list,
)
from addons.database import sqlfacts
from addons.database.rowmask import STRATEGIES  # masking's strategies and `null`
from addons.frame.hosts import is_loopback_host
from addons.policy.config import APPROVAL_KEYS, parse_approval
from addons.policy.engine import ApprovalSpec

DATABASE_KEYS = {"name", "listen", "upstream", "database", "credential", "server_tls",
                 "client_tls", "allow_groups", "allow_subjects", "sql", "sql_default",
                 "mask", "mask_columns", "max_message_bytes", "max_server_message_bytes",
                 "max_sql_bytes", "max_connections",
                 "connect_timeout", "login_timeout"}
CREDENTIAL_KEYS = {"user", "password_env", "password_file"}
SERVER_TLS_KEYS = {"mode", "ca_file"}
SERVER_TLS_MODES = ("verify-full", "disable")
CLIENT_TLS_KEYS = {"required", "cert_file", "key_file"}
SQL_ACTIONS = ("allow", "block", "approve", "observe")
SQL_RULE_KEYS = {"name", "action", "match", "message", "description"} | APPROVAL_KEYS
SQL_MATCH_KEYS = {"groups", "subjects", "kinds", "tables", "functions", "unbounded"}
KINDS = ("SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "TRUNCATE", "COPY", "DDL", "DCL",
         "TRANSACTION", "SET", "SHOW", "CALL", "DO", "LOCK", "LISTEN", "NOTIFY", "EXECUTE",
         "DEALLOCATE", "CURSOR", "MAINTENANCE", "EXPLAIN", "PREPARE", "DANGEROUS", "EMPTY")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_MESSAGE = 1 << 30  # PostgreSQL's own limit (PQ_LARGE_MESSAGE_LIMIT)


@dataclass(frozen=True)
class SqlRule:
    name: str
    action: str
    groups: tuple[str, ...] = ()
    subjects: tuple[str, ...] = ()
    kinds: frozenset[str] = frozenset()
    tables: tuple[str, ...] = ()
    functions: tuple[str, ...] = ()
    unbounded: bool | None = None
    message: str = ""
    approval: ApprovalSpec | None = None


@dataclass(frozen=True)
class Database:
    name: str
    listen_host: str
    listen_port: int
    upstream_host: str
    upstream_port: int
    database: str
    user: str
    password_env: str | None
    password_file: str | None
    server_tls: str = "verify-full"
    server_ca_file: str | None = None
    client_tls_required: bool = True
    client_cert_file: str | None = None
    client_key_file: str | None = None
    allow_groups: tuple[str, ...] = ()
    allow_subjects: tuple[str, ...] = ()
    sql: tuple[SqlRule, ...] = ()
    sql_default: str = "allow"
    mask: bool = True
    mask_columns: tuple[tuple[str, str], ...] = ()
    max_message_bytes: int = 8 << 20
    max_server_message_bytes: int = 64 << 20
    max_sql_bytes: int = 256 << 10
    max_connections: int = 100
    connect_timeout: float = 10.0
    login_timeout: float = 30.0
    where: str = ""

    @property
    def upstream(self) -> str:
        return f"{self.upstream_host}:{self.upstream_port}"

    @property
    def listen(self) -> str:
        return f"{self.listen_host}:{self.listen_port}"

    def describe(self) -> str:
        """One line for `agentgate rules check` (never the password, only where it is)."""
        if self.password_env:
            where = f"password from env {self.password_env}"
            ready = bool(os.environ.get(self.password_env))
        else:
            where = f"password from file {self.password_file}"
            ready = bool(self.password_file) and os.path.isfile(str(self.password_file))
        tls = "TLS required" if self.client_tls_required else "TLS optional (loopback)"
        return (f"{self.name}: listen {self.listen} ({tls}) -> {self.upstream} database "
                f"{self.database} (user {self.user}, {where}, server TLS {self.server_tls}); "
                f"{len(self.sql)} sql rules, default {self.sql_default}, "
                f"{len(self.mask_columns)} column rules, masking "
                f"{'on' if self.mask else 'off'}"
                + ("" if ready else "  [password not set in this environment]"))


def _host_port(value: Any, where: Where) -> tuple[str, int]:
    s = expect_str(value, where)
    host, sep, port = s.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise where.error(f"expected host:port, got {s!r}")
    return host, int(port)


def _file(value: Any, where: Where) -> str:
    p = expect_str(value, where)
    if not Path(p).is_file():
        raise where.error(f"file {p!r} does not exist")
    return p


def _rule(raw: Any, where: Where, names: set[str]) -> SqlRule:
    d = expect_map(raw, where, SQL_RULE_KEYS, required=("name", "action"))
    name = expect_str(d["name"], where.child("name"))
    if name in names:
        raise where.child("name").error(f"rule name {name!r} used twice in this database")
    names.add(name)
    action = expect_str(d["action"], where.child("action"))
    if action not in SQL_ACTIONS:
        raise where.child("action").error(
            f"must be one of {', '.join(SQL_ACTIONS)}, got {action!r}")
    approval = None
    if action == "approve":
        approval = parse_approval(d, where)
    else:
        extra = sorted(APPROVAL_KEYS & set(d))
        if extra:
            raise where.child(extra[0]).error("only allowed with action: approve")
    mw = where.child("match")
    m = expect_map(d.get("match"), mw, SQL_MATCH_KEYS)
    kinds = expect_str_list(m.get("kinds", []), mw.child("kinds"))
    bad = [k for k in kinds if k.upper() not in KINDS]
    if bad:
        raise mw.child("kinds").error(f"unknown kind {bad[0]!r} (known: {', '.join(KINDS)})")
    unbounded = None
    if "unbounded" in m:
        unbounded = expect_bool(m["unbounded"], mw.child("unbounded"))
    tables = tuple(t.lower() for t in expect_str_list(m.get("tables", []), mw.child("tables")))
    functions = tuple(f.lower() for f in
                      expect_str_list(m.get("functions", []), mw.child("functions")))
    return SqlRule(name=name, action=action,
                   groups=expect_str_list(m.get("groups", []), mw.child("groups")),
                   subjects=expect_str_list(m.get("subjects", []), mw.child("subjects")),
                   kinds=frozenset(k.upper() for k in kinds), tables=tables,
                   functions=functions, unbounded=unbounded,
                   message=expect_str(d.get("message", ""), where.child("message"),
                                      nonempty=False),
                   approval=approval)


def parse_database(raw: Any, where: Where) -> Database:
    d = expect_map(raw, where, DATABASE_KEYS,
                   required=("name", "listen", "upstream", "database", "credential"))
    name = expect_str(d["name"], where.child("name"))
    if not NAME_RE.match(name):
        raise where.child("name").error("letters, digits, '_', '.', '-' only (max 64)")
    lhost, lport = _host_port(d["listen"], where.child("listen"))
    uhost, uport = _host_port(d["upstream"], where.child("upstream"))
    database = expect_str(d["database"], where.child("database"))
    cw = where.child("credential")
    cred = expect_map(d["credential"], cw, CREDENTIAL_KEYS, required=("user",))
    user = expect_str(cred["user"], cw.child("user"))
    penv = expect_str(cred["password_env"], cw.child("password_env")) \
        if "password_env" in cred else None
    pfile = expect_str(cred["password_file"], cw.child("password_file")) \
        if "password_file" in cred else None
    if (penv is None) == (pfile is None):
        raise cw.error("exactly one of password_env / password_file is required")

    sw = where.child("server_tls")
    stls = expect_map(d.get("server_tls"), sw, SERVER_TLS_KEYS)
    mode = expect_str(stls.get("mode", "verify-full"), sw.child("mode"))
    if mode not in SERVER_TLS_MODES:
        raise sw.child("mode").error(f"must be one of {', '.join(SERVER_TLS_MODES)}, "
                                     f"got {mode!r}")
    if mode == "disable" and not is_loopback_host(uhost):
        raise sw.child("mode").error(
            "cleartext to the database server is allowed only for a loopback upstream: "
            "the real credential and the data would cross the network unprotected")
    ca = _file(stls["ca_file"], sw.child("ca_file")) if "ca_file" in stls else None
    if ca and mode == "disable":
        raise sw.child("ca_file").error("a CA file needs mode: verify-full")

    tw = where.child("client_tls")
    ctls = expect_map(d.get("client_tls"), tw, CLIENT_TLS_KEYS)
    required = expect_bool(ctls.get("required", not is_loopback_host(lhost)),
                           tw.child("required"))
    if not required and not is_loopback_host(lhost):
        raise tw.child("required").error(
            "a listener on a non-loopback address must require TLS: agents send their "
            "token as the password")
    cert = _file(ctls["cert_file"], tw.child("cert_file")) if "cert_file" in ctls else None
    key = _file(ctls["key_file"], tw.child("key_file")) if "key_file" in ctls else None
    if (cert is None) != (key is None):
        raise tw.error("cert_file and key_file go together")

    rules: list[SqlRule] = []
    names: set[str] = set()
    sqw = where.child("sql")
    raw_rules = d.get("sql") or []
    if not isinstance(raw_rules, list):
        raise sqw.error(f"expected a list, got {type(raw_rules).__name__}")
    for i, r in enumerate(raw_rules):
        rules.append(_rule(r, sqw.child(i), names))
    default = expect_str(d.get("sql_default", "allow"), where.child("sql_default"))
    if default not in ("allow", "block", "observe"):
        raise where.child("sql_default").error(f"must be allow, block or observe, got "
                                               f"{default!r}")

    mcw = where.child("mask_columns")
    cols: list[tuple[str, str]] = []
    raw_cols = d.get("mask_columns") or []
    if not isinstance(raw_cols, list):
        raise mcw.error(f"expected a list, got {type(raw_cols).__name__}")
    for i, c in enumerate(raw_cols):
        cw_ = mcw.child(i)
        cm = expect_map(c, cw_, {"column", "strategy"}, required=("column", "strategy"))
        col = expect_str(cm["column"], cw_.child("column")).lower()
        if col.count(".") < 1:
            raise cw_.child("column").error("expected table.column or schema.table.column "
                                            "(globs allowed)")
        strategy = expect_str(cm["strategy"], cw_.child("strategy"))
        if strategy not in STRATEGIES:
            raise cw_.child("strategy").error(f"must be one of {', '.join(STRATEGIES)}")
        cols.append((col, strategy))

    return Database(
        name=name, listen_host=lhost, listen_port=lport, upstream_host=uhost,
        upstream_port=uport, database=database, user=user, password_env=penv,
        password_file=pfile, server_tls=mode, server_ca_file=ca,
        client_tls_required=required, client_cert_file=cert, client_key_file=key,
        allow_groups=expect_str_list(d.get("allow_groups", []), where.child("allow_groups")),
        allow_subjects=expect_str_list(d.get("allow_subjects", []),
                                       where.child("allow_subjects")),
        sql=tuple(rules), sql_default=default,
        mask=expect_bool(d.get("mask", True), where.child("mask")), mask_columns=tuple(cols),
        max_message_bytes=expect_int(d.get("max_message_bytes", 8 << 20),
                                     where.child("max_message_bytes"), minimum=1024,
                                     maximum=MAX_MESSAGE),
        max_server_message_bytes=expect_int(d.get("max_server_message_bytes", 64 << 20),
                                            where.child("max_server_message_bytes"),
                                            minimum=1024, maximum=MAX_MESSAGE),
        max_sql_bytes=expect_int(d.get("max_sql_bytes", 256 << 10), where.child("max_sql_bytes"),
                                 minimum=1024, maximum=8 << 20),
        max_connections=expect_int(d.get("max_connections", 100),
                                   where.child("max_connections"), minimum=1, maximum=10000),
        connect_timeout=float(expect_int(d.get("connect_timeout", 10),
                                         where.child("connect_timeout"), minimum=1,
                                         maximum=600)),
        login_timeout=float(expect_int(d.get("login_timeout", 30), where.child("login_timeout"),
                                       minimum=1, maximum=600)),
        where=f"{where.file}: {where.key}")


def parse_databases(items: list[tuple[Any, Where]]) -> tuple[Database, ...]:
    out: list[Database] = []
    names: dict[str, str] = {}
    listens: dict[tuple[str, int], str] = {}
    for raw, where in items:
        try:
            sqlfacts.parser()
        except ImportError as e:
            raise where.error(f"the Postgres path needs the pgparse package (SQL parser), "
                              f"which cannot be imported here ({e})") from None
        db = parse_database(raw, where)
        if db.name in names:
            raise where.child("name").error(f"database name {db.name!r} already used at "
                                            f"{names[db.name]}")
        names[db.name] = db.where
        key = (db.listen_host, db.listen_port)
        if key in listens:
            raise where.child("listen").error(f"{db.listen} already used at {listens[key]}")
        listens[key] = db.where
        out.append(db)
    return tuple(out)


def table_matches(pattern: str, table: str) -> bool:
    """`users` matches the relation name in any schema; `public.users` / `*.users` match the
    schema-qualified name (an unqualified table is taken as `public.<name>`; a rule on
    search_path changes, kind SET, closes that gap)."""
    if "." not in pattern:
        return fnmatch.fnmatchcase(table.rsplit(".", 1)[-1], pattern)
    full = table if "." in table else f"public.{table}"
    if pattern.count(".") == 1 and full.count(".") == 2:
        full = full.split(".", 1)[1]
    return fnmatch.fnmatchcase(full, pattern)

