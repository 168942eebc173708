"""SQL policy for one statement: guards, then the database's `sql` rules in order.

Pure. Guards come first and cannot be allowed by a rule: several statements in one string
(each must be judged and recorded on its own; send them one by one), COPY … PROGRAM or to/from
a server file, functions that read/write server files, run programs or open connections
(sqlfacts.DANGEROUS_FUNCTIONS), DO blocks and function bodies (code the parser cannot see
into), LOAD, changing client_encoding or the session role. Then the first `sql` rule whose
`match` fits decides (all given conditions must hold; a list condition holds when any entry
matches); no rule fitting → the database's `sql_default`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

from addons.database.config import Database, SqlRule, table_matches
from addons.database.sqlfacts import Statement
from addons.policy.engine import ApprovalSpec

GUARD_REASONS = {
    "multi_statement": "several statements in one query string (send them one at a time)",
    "copy_program": "COPY … PROGRAM runs a program on the database server",
    "copy_server_file": "COPY to or from a file on the database server",
    "dangerous_function": "a function that reaches the server's files, programs or "
                          "connections",
    "opaque_code": "procedural code (DO / function bodies) the gateway cannot inspect",
    "load_library": "LOAD of a server library",
    "client_encoding": "changing client_encoding (the gateway reads SQL and rows as UTF-8)",
    "change_role": "changing the session role or authorization",
    "search_path": "changing search_path (rules resolve unqualified tables as public.<name>)",
    "string_syntax": "changing standard_conforming_strings (the gateway reads string "
                     "literals as the default, on, does)",
}


@dataclass(frozen=True)
class Verdict:
    action: str                # allow | block | approve | observe
    rule: str | None           # rule name, "guard:<name>" or None (sql_default)
    message: str = ""
    approval: ApprovalSpec | None = None


def _fits(rule: SqlRule, st: Statement, ident: dict[str, Any]) -> bool:
    if rule.groups:
        groups = ident.get("groups") or []
        if not any(g in groups for g in rule.groups):
            return False
    if rule.subjects and ident.get("sub") not in rule.subjects:
        return False
    if rule.kinds and not (rule.kinds & set(st.kinds or ("EMPTY",))):
        return False
    if rule.tables and not any(table_matches(p, t) for p in rule.tables for t in st.tables):
        return False
    if rule.functions and not any(
            fnmatch.fnmatchcase(f, p) or fnmatch.fnmatchcase(f.rsplit(".", 1)[-1], p)
            for p in rule.functions for f in st.functions):
        return False
    return rule.unbounded is None or rule.unbounded == bool(st.unbounded)


def evaluate(db: Database, st: Statement, ident: dict[str, Any]) -> Verdict:
    if st.multi:
        return Verdict("block", "guard:multi_statement", GUARD_REASONS["multi_statement"])
    for g in st.guards:
        return Verdict("block", f"guard:{g}", GUARD_REASONS.get(g, g))
    for rule in db.sql:
        if _fits(rule, st, ident):
            return Verdict(rule.action, rule.name, rule.message, rule.approval)
    return Verdict(db.sql_default, None)
