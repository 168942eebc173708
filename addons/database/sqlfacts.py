"""What a SQL string does, read with PostgreSQL's own parser (libpg_query via `pgparse`).

Pure. `analyze(sql)` returns a `Statement`: the statement kinds it contains (a data-modifying
CTE inside a SELECT counts as its INSERT/UPDATE/DELETE too; EXPLAIN, PREPARE, DECLARE and
CREATE … AS count as the statement they wrap), the tables and functions it names, whether it
is several statements, whether an UPDATE/DELETE anywhere in it has no WHERE (or a WHERE that
reads no column, like `WHERE true` or `WHERE 1=1`), and the *guards* it trips: things the
gateway refuses whatever the rules say because it cannot vet what they do
(COPY … PROGRAM, COPY to/from a server file, functions reading/writing server files or
running code, DO blocks, changing client_encoding (the relay reads SQL and rows as UTF-8)).

Why pgparse and not pglast: pglast is GPL-3.0-or-later, which does not fit an MIT project;
pgparse (BSD-3-Clause, by Gavin M. Roy) binds the same libpg_query (BSD) and returns its
JSON parse tree. No regexes: a statement libpg_query cannot parse is refused.

The masked SQL for records and reviewers is libpg_query's normalize(): every literal becomes
`$n`, so values never reach DuckDB or a reviewer's screen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

_pgparse: ModuleType | None = None


def parser() -> ModuleType:
    """pgparse, imported on first use: only a gateway with `databases:` in its rules needs
    it (its libpg_query maps ~1 MiB more into every gateway otherwise). The rules loader
    calls this for a `databases:` section (database/config.py), so a missing or broken
    pgparse refuses those rules, naming the file and key, before any listener opens.
    Raises ImportError."""
    global _pgparse  # noqa: PLW0603 - set once
    if _pgparse is None:
        import pgparse
        _pgparse = pgparse
    return _pgparse

# statement node -> kind
KINDS = {
    "SelectStmt": "SELECT", "InsertStmt": "INSERT", "UpdateStmt": "UPDATE",
    "DeleteStmt": "DELETE", "MergeStmt": "MERGE", "TruncateStmt": "TRUNCATE",
    "CopyStmt": "COPY", "TransactionStmt": "TRANSACTION", "VariableSetStmt": "SET",
    "VariableShowStmt": "SHOW", "DiscardStmt": "SET", "CallStmt": "CALL", "DoStmt": "DO",
    "LockStmt": "LOCK", "ListenStmt": "LISTEN", "UnlistenStmt": "LISTEN",
    "NotifyStmt": "NOTIFY", "ExecuteStmt": "EXECUTE", "DeallocateStmt": "DEALLOCATE",
    "ClosePortalStmt": "CURSOR", "FetchStmt": "CURSOR", "VacuumStmt": "MAINTENANCE",
    "ClusterStmt": "MAINTENANCE", "ReindexStmt": "MAINTENANCE", "CheckPointStmt": "MAINTENANCE",
    "LoadStmt": "DANGEROUS", "GrantStmt": "DCL", "GrantRoleStmt": "DCL",
    "CreateRoleStmt": "DCL", "AlterRoleStmt": "DCL", "AlterRoleSetStmt": "DCL",
    "DropRoleStmt": "DCL", "AlterDefaultPrivilegesStmt": "DCL", "ReassignOwnedStmt": "DCL",
    "DropOwnedStmt": "DCL", "AlterSystemStmt": "DDL", "ExplainStmt": "EXPLAIN",
    "PrepareStmt": "PREPARE", "DeclareCursorStmt": "CURSOR",
}
# statements that wrap another whose kind they take on
WRAPPERS = {"ExplainStmt": "query", "PrepareStmt": "query", "DeclareCursorStmt": "query",
            "CreateTableAsStmt": "query", "ViewStmt": "query"}
WRITES = {"INSERT", "UPDATE", "DELETE", "MERGE", "TRUNCATE", "COPY"}

# functions that read or write the server's files, run programs or open other connections:
# a database credential in the gateway must not become a shell or a file browser
SETTINGS_VIEWS = frozenset({"pg_settings", "pg_catalog.pg_settings"})
DANGEROUS_FUNCTIONS = frozenset({
    "pg_read_file", "pg_read_binary_file", "pg_ls_dir", "pg_stat_file", "pg_ls_logdir",
    "pg_ls_waldir", "pg_ls_tmpdir", "pg_ls_archive_statusdir", "pg_ls_logicalmapdir",
    "pg_ls_logicalsnapdir", "pg_ls_replslotdir", "pg_file_write", "pg_file_rename",
    "pg_file_unlink", "pg_logdir_ls", "pg_file_sync", "lo_import", "lo_export",
    "pg_execute_server_program", "dblink", "dblink_exec", "dblink_connect",
    "dblink_connect_u", "dblink_send_query", "pg_terminate_backend", "pg_cancel_backend",
    "pg_reload_conf", "pg_rotate_logfile", "pg_promote", "pg_switch_wal",
    "pg_create_restore_point", "pg_backup_start", "pg_backup_stop",
    "pg_log_backend_memory_contexts",
    "pg_replication_origin_create", "pg_create_logical_replication_slot",
    "pg_create_physical_replication_slot", "pg_drop_replication_slot", "set_config",
    "current_setting_set", "pg_advisory_lock", "query_to_xml", "query_to_xml_and_xmlschema",
    "table_to_xml", "cursor_to_xml", "database_to_xml", "schema_to_xml",
    "query_to_xmlschema", "pg_sleep", "pg_sleep_for", "pg_sleep_until",
})
# why: query_to_xml & co run a SQL string given as a value, which the gateway never parsed;
# set_config can change client_encoding/search_path/role behind the parser's back; pg_sleep
# ties up a server connection the agent does not pay for.

# set_config(name, …) of these settings stays allowed (asyncpg turns jit off around its type
# introspection): none changes which object a name means, who the session is, how the relay
# reads bytes, or a custom setting row-level security may read (app.tenant_id). The name must
# be a string constant; search_path stays out (the policy resolves unqualified tables as
# public.<name>, so moving the path would make a rule judge the wrong table).
SAFE_SETTINGS = frozenset({
    "jit", "jit_above_cost", "jit_inline_above_cost", "jit_optimize_above_cost",
    "statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout",
    "application_name", "timezone", "datestyle", "intervalstyle", "extra_float_digits",
    "work_mem", "plan_cache_mode",
})

class SqlError(Exception):
    """The SQL cannot be parsed: it is refused (SQLSTATE 42601)."""

    def __init__(self, message: str, position: int | None = None) -> None:
        super().__init__(message)
        self.position = position


@dataclass(frozen=True)
class Statement:
    sql: str
    masked: str
    count: int                       # statements in the string
    kinds: tuple[str, ...]           # every kind inside, the top-level one first
    tables: tuple[str, ...]          # "schema.table" or "table" as written, lowercased
    functions: tuple[str, ...]       # called functions, lowercased, schema-qualified as written
    unbounded: tuple[str, ...] = ()  # "DELETE t" / "UPDATE t" without a WHERE reading a column
    guards: tuple[str, ...] = ()     # guard names tripped (see module docstring)
    prepared: str | None = None      # SQL PREPARE name, for EXECUTE name later
    executes: str | None = None      # SQL EXECUTE name
    deallocates: str | None = None   # SQL DEALLOCATE name; "*" = every prepared statement
    # the same relations and functions with their names' case kept (catalog look-ups in
    # depends.py: a view's or a function's own dependencies)
    relation_refs: tuple[tuple[str, ...], ...] = ()
    function_refs: tuple[tuple[str, ...], ...] = ()
    operator_refs: tuple[tuple[str, ...], ...] = ()  # operators run functions too
    type_refs: tuple[tuple[str, ...], ...] = ()      # cast targets (cast and CHECK functions)
    # the last field of a qualified column (`u.leakf`, `(u).leakf`): PostgreSQL calls a
    # function leakf(users) for it when users has no such column (attribute notation)
    attribute_refs: tuple[tuple[str, ...], ...] = ()

    @property
    def kind(self) -> str:
        return self.kinds[0] if self.kinds else "EMPTY"

    @property
    def multi(self) -> bool:
        return self.count > 1


@dataclass
class _Walk:
    kinds: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    functions: list[str] = field(default_factory=list)
    unbounded: list[str] = field(default_factory=list)
    guards: list[str] = field(default_factory=list)
    relation_refs: list[tuple[str, ...]] = field(default_factory=list)
    function_refs: list[tuple[str, ...]] = field(default_factory=list)
    operator_refs: list[tuple[str, ...]] = field(default_factory=list)
    type_refs: list[tuple[str, ...]] = field(default_factory=list)
    attribute_refs: list[tuple[str, ...]] = field(default_factory=list)
    prepared: str | None = None
    executes: str | None = None
    deallocates: str | None = None

    def add(self, lst: list[str], v: str) -> None:
        if v not in lst:
            lst.append(v)


def _strings(nodes: list[Any] | None) -> list[str]:
    out = []
    for n in nodes or ():
        if isinstance(n, dict) and "String" in n:
            out.append(str(n["String"].get("sval", "")))
    return out


def _reads_a_column(node: Any) -> bool:
    # a subquery, function or parameter may depend on the row; only a WHERE made of
    # constants alone is known to match every row (iterative: no recursion limit to hit)
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, dict):
            if "ColumnRef" in n or "SubLink" in n or "FuncCall" in n or "ParamRef" in n:
                return True
            stack.extend(n.values())
        elif isinstance(n, list):
            stack.extend(n)
    return False


def _const_text(args: Any) -> str | None:
    """The first argument when it is a string constant (optionally cast), lower-cased."""
    if not isinstance(args, list) or not args or not isinstance(args[0], dict):
        return None
    node = args[0]
    if "TypeCast" in node:
        node = node["TypeCast"].get("arg") or {}
    const = node.get("A_Const") if isinstance(node, dict) else None
    sval = const.get("sval") if isinstance(const, dict) else None
    text = sval.get("sval") if isinstance(sval, dict) else None
    return text.lower() if isinstance(text, str) else None


def _relname(rv: dict[str, Any]) -> str:
    parts = [rv.get("catalogname"), rv.get("schemaname"), rv.get("relname")]
    return ".".join(p for p in parts if p).lower()


def _visit(root: Any, w: _Walk) -> None:
    """Pre-order walk (a statement's own kind before the kinds nested in it), iterative:
    libpg_query accepts expressions far deeper than Python's recursion limit.

    Each node carries the CTE names in scope where it stands, as PostgreSQL scopes them: a
    WITH's names are visible in its own statement and in the CTE bodies after them (all of
    them with RECURSIVE), nowhere else. Why: `WITH secret AS (SELECT * FROM secret) …` reads
    the real table inside the CTE, and a CTE in a subquery does not hide a table of the same
    name beside it; a set of every CTE name in the string let both through unlisted."""
    stack: list[tuple[Any, frozenset[str]]] = [(root, frozenset())]
    while stack:
        node, scope = stack.pop()
        if isinstance(node, list):
            stack.extend((n, scope) for n in reversed(node))
            continue
        if not isinstance(node, dict):
            continue
        children: list[tuple[Any, frozenset[str]]] = []
        inner = scope
        with_clause = node.get("withClause")
        if isinstance(with_clause, dict):
            ctes = [c for c in with_clause.get("ctes") or () if isinstance(c, dict)]
            names = [str((c.get("CommonTableExpr") or {}).get("ctename") or "").lower()
                     for c in ctes]
            inner = scope | frozenset(names)
            for i, cte in enumerate(ctes):
                seen = inner if with_clause.get("recursive") else scope | frozenset(names[:i])
                children.append((cte, seen))
        for key, val in node.items():
            if key == "withClause" and isinstance(with_clause, dict):
                continue
            if isinstance(val, dict):
                _facts(key, val, w, inner)
            children.append((val, inner))
        stack.extend(reversed(children))


def _facts(key: str, val: dict[str, Any], w: _Walk, ctes: frozenset[str]) -> None:
    if key in KINDS:
        w.add(w.kinds, KINDS[key])
    elif key.endswith("Stmt") and key[0].isupper() and key not in WRAPPERS:
        w.add(w.kinds, "DDL")
    elif key in ("CreateTableAsStmt", "ViewStmt"):
        w.add(w.kinds, "DDL")
    if key == "SelectStmt" and val.get("intoClause"):
        w.add(w.kinds, "DDL")  # SELECT … INTO creates a table
    # a RangeVar (FROM item) may name a CTE in scope; the target of INSERT/UPDATE/DELETE/
    # MERGE/COPY (`relation`) is always a table
    if key == "RangeVar" or (key in ("relation", "rel") and "relname" in val):
        name = _relname(val)
        if name and not (key == "RangeVar" and "." not in name and name in ctes):
            w.add(w.tables, name)
            ref = tuple(str(val[k]) for k in ("catalogname", "schemaname", "relname")
                        if val.get(k))
            if ref not in w.relation_refs:
                w.relation_refs.append(ref)
    elif key in ("FuncCall", "funccall"):  # funccall: CALL's, a FuncCall unwrapped
        parts = tuple(_strings(val.get("funcname")))
        fn = ".".join(parts).lower()
        w.add(w.functions, fn)
        if parts not in w.function_refs:
            w.function_refs.append(parts)
        base = fn.rsplit(".", 1)[-1]
        if base in DANGEROUS_FUNCTIONS and not (
                base == "set_config" and fn in ("set_config", "pg_catalog.set_config")
                and _const_text(val.get("args")) in SAFE_SETTINGS):
            w.add(w.guards, "dangerous_function")
    elif key == "A_Expr":
        parts = tuple(_strings(val.get("name")))
        if parts and parts not in w.operator_refs:
            w.operator_refs.append(parts)
    elif key in ("ColumnRef", "A_Indirection"):
        fields = val.get("fields") if key == "ColumnRef" else val.get("indirection")
        names = [f["String"].get("sval") for f in fields or ()
                 if isinstance(f, dict) and isinstance(f.get("String"), dict)]
        if key == "ColumnRef":  # `u.leakf`, not `leakf` nor `u.*`
            last = (fields or [{}])[-1]
            names = names[-1:] if len(fields) >= 2 and isinstance(last, dict) \
                and "String" in last else []
        if names:
            for n in names:
                if n and (n,) not in w.attribute_refs:
                    w.attribute_refs.append((n,))
    elif key == "TypeCast":
        parts = tuple(_strings((val.get("typeName") or {}).get("names")))
        if parts and parts not in w.type_refs:
            w.type_refs.append(parts)
    if key in ("UpdateStmt", "InsertStmt", "DeleteStmt", "MergeStmt") \
            and _relname(val.get("relation") or {}) in SETTINGS_VIEWS:
        # its rules run set_config (search_path, role …) for each row written
        w.add(w.guards, "dangerous_function")
    if key in ("DeleteStmt", "UpdateStmt"):
        if not _reads_a_column(val.get("whereClause")):
            rel = _relname(val.get("relation") or {})
            w.add(w.unbounded, f"{KINDS[key]} {rel}")
    elif key == "CopyStmt":
        if val.get("is_program"):
            w.add(w.guards, "copy_program")
        elif val.get("filename"):
            w.add(w.guards, "copy_server_file")
    elif key == "DoStmt":
        w.add(w.guards, "opaque_code")
    elif key == "LoadStmt":
        w.add(w.guards, "load_library")
    elif key in ("VariableSetStmt", "setstmt"):
        # `setstmt`: ALTER ROLE / DATABASE … SET, the default of every later session of
        # that login: the gateway's catalog login (depends.py) is one of them, and an
        # agent that reconnects under another search_path would resolve names unlike it
        name = str(val.get("name") or "").lower()
        if name in ("client_encoding", "names") or val.get("kind") == "VAR_RESET_ALL":
            w.add(w.guards, "client_encoding")
        if name in ("session_authorization", "role"):
            w.add(w.guards, "change_role")
        if name == "search_path":  # unqualified names would no longer mean public.<name>
            w.add(w.guards, "search_path")
        if name == "standard_conforming_strings":
            # libpg_query reads '\' in a string as the default `on` does; turned off, the
            # server reads \' as a quote inside it: 'a\''; SELECT … FROM secret; --' is
            # one literal here and two statements there (any change, RESET and a role's
            # default included: the gateway reads SQL as the server does, or not at all)
            w.add(w.guards, "string_syntax")
    elif key == "PrepareStmt":
        w.prepared = str(val.get("name") or "")
    elif key == "ExecuteStmt":
        w.executes = str(val.get("name") or "")
    elif key == "DeallocateStmt":
        w.deallocates = "*" if val.get("isall") or not val.get("name") else str(val["name"])
    elif key == "DiscardStmt" and val.get("target") == "DISCARD_ALL":
        w.deallocates = "*"
    elif key == "CreateFunctionStmt":
        # a function body is code the parser does not see into (LANGUAGE plpgsql, …)
        w.add(w.guards, "opaque_code")


def scrub_literals(sql: str) -> str:
    """What normalize() leaves of values: it replaces constants in queries, not in utility
    statements (EXECUTE p('ann@…'), COPY … 'file', NOTIFY payloads, COMMENT, DEFAULT,
    PREPARE bodies) nor comments. A lexical pass over the normalized text: comments are
    dropped, every string literal ('…', E'…', $tag$…$tag$) becomes '?' and every number
    that is not part of a name or a $n parameter becomes ?. Quoted identifiers stay."""
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c == "-" and sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j
            continue
        if c == "/" and sql.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if sql.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif sql.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            out.append(" ")
            continue
        if c == '"':
            j = i + 1
            while j < n and not (sql[j] == '"' and not sql.startswith('""', j)):
                j += 2 if sql.startswith('""', j) else 1
            out.append(sql[i:j + 1])
            i = j + 1
            continue
        if c == "'":
            backslash = i > 0 and sql[i - 1] in "eE" and (i < 2 or not (
                sql[i - 2].isalnum() or sql[i - 2] == "_"))
            j = i + 1
            while j < n:
                if backslash and sql[j] == "\\":
                    j += 2
                elif sql[j] == "'":
                    if sql.startswith("''", j):
                        j += 2
                    else:
                        break
                else:
                    j += 1
            out.append("'?'")
            i = j + 1
            continue
        if c == "$":
            j = i + 1
            while j < n and (sql[j].isalnum() or sql[j] == "_"):
                j += 1
            tag = sql[i:j + 1]
            if j < n and sql[j] == "$" and not sql[i + 1:j].isdigit() and not (
                    i + 1 < n and sql[i + 1].isdigit()):
                end = sql.find(tag, j + 1)
                out.append("'?'")
                i = n if end < 0 else end + len(tag)
                continue
            out.append(sql[i:j])  # a $n parameter
            i = j
            continue
        if c.isdigit() and not (out and out[-1] and (out[-1][-1].isalnum()
                                                     or out[-1][-1] in "_$")):
            j = i
            while j < n and (sql[j].isalnum() or sql[j] in "._"):
                j += 1
            out.append("?")
            i = j
            continue
        out.append(c)
        i += 1
    return "".join(out)


def analyze(sql: str) -> Statement:
    """Parse and describe one Query / Parse string. Raises SqlError when it does not parse."""
    if "\x00" in sql:
        raise SqlError("NUL byte in SQL")
    try:
        pgparse = parser()
    except ImportError as e:  # checked when the rules loaded; refuse, never pass
        raise SqlError(f"the SQL parser cannot be imported ({e})") from None
    try:
        tree = pgparse.parse(sql)
    except pgparse.PGQueryError as e:
        pos = e.args[1] if len(e.args) > 1 and isinstance(e.args[1], int) else None
        raise SqlError(str(e.args[0]) if e.args else "syntax error", pos) from None
    except (RecursionError, MemoryError, ValueError) as e:
        raise SqlError(f"statement too deeply nested or too large ({type(e).__name__})"
                       ) from None
    w = _Walk()
    for raw in tree:
        _visit(raw.get("stmt") or {}, w)
    try:
        masked = scrub_literals(pgparse.normalize(sql) if tree else sql)
    except pgparse.PGQueryError:
        masked = "(statement could not be normalized)"
    return Statement(sql=sql, masked=masked, count=len(tree), kinds=tuple(w.kinds),
                     tables=tuple(w.tables), functions=tuple(w.functions),
                     unbounded=tuple(w.unbounded), guards=tuple(w.guards),
                     prepared=w.prepared, executes=w.executes, deallocates=w.deallocates,
                     relation_refs=tuple(w.relation_refs),
                     function_refs=tuple(w.function_refs),
                     operator_refs=tuple(w.operator_refs),
                     type_refs=tuple(w.type_refs),
                     attribute_refs=tuple(w.attribute_refs))
