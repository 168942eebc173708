"""What a statement really reaches: the relations and functions behind the names it writes.

Pure (no mitmproxy). A `sql` rule on `tables: [secret]` judged only the names in the SQL
text, so `SELECT * FROM secret_view`, `SELECT leak()` (a function reading `secret`) or an
INSERT into a table whose trigger writes to `secret` passed it. `resolve()` asks the
server's catalog, through the gateway's own catalog login (addon.py), what each name
depends on, transitively:

- a relation: the rewrite rules on it (a view's query, `CREATE RULE … DO ALSO`), its row
  security policies, column defaults and CHECK constraints — every relation and function
  they reference (pg_depend); for a write, also its triggers' functions;
- a function: in pg_catalog / information_schema (built in) or in C / internal (native code
  only a superuser can install) it adds nothing; a SQL function's `BEGIN ATOMIC` body has its
  references in pg_depend and a string body is parsed with the same parser as the agent's
  SQL; any other language (plpgsql, …) is code the gateway cannot read: it is *unresolved*.

Names resolve as the agent's session resolves them: same login, same search_path (changing
it is a guard), `to_regclass` for relations, the session's schemas for unqualified
functions (every overload of the name counts). The caller refuses a statement with anything
unresolved when a rule names tables or functions (fail closed), and judges the resolved
statement otherwise. Bounded: at most MAX_ROUNDS rounds of look-ups and MAX_OBJECTS objects,
beyond which the statement counts as unresolved.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from addons.database.config import Database
from addons.database.sqlfacts import DANGEROUS_FUNCTIONS, WRITES, SqlError, Statement, analyze

# (sql, text parameters) -> rows of text values
Query = Callable[[str, list[str]], Awaitable[list[tuple[Any, ...]]]]

MAX_ROUNDS = 16
MAX_OBJECTS = 2048
CACHE_SIZE = 512
# a view or function redefined by the DBA is seen within this time; the agent cannot
# redefine one unnoticed (CREATE VIEW … names what it reads, function bodies are a guard)
CACHE_TTL_S = 2.0
BUILTIN_SCHEMAS = frozenset({"pg_catalog", "information_schema"})
# catalog relations that show other tables' values (the planner's sampled most common values
# and histograms of every column the login may read): a rule on `secret` cannot tell
# which table's values a row of them holds, so they count as unresolved
STATISTICS = frozenset({"pg_catalog.pg_stats", "pg_catalog.pg_stats_ext",
                        "pg_catalog.pg_stats_ext_exprs", "pg_catalog.pg_statistic",
                        "pg_catalog.pg_statistic_ext_data"})
NATIVE_LANGUAGES = frozenset({"c", "internal"})
CATALOG_KINDS = frozenset({"DDL", "DCL"})  # statement kinds that may change what names reach
FIRST_USER_OID = 16384  # PostgreSQL's FirstNormalObjectId: below it, built in at initdb

# relation names as written (each part quoted) -> oid, schema, name
RELATIONS_SQL = """
SELECT r.n, c.oid::int8, ns.nspname, c.relname
FROM unnest($1::text[]) AS r(n)
JOIN pg_class c ON c.oid = to_regclass(r.n)
JOIN pg_namespace ns ON ns.oid = c.relnamespace
"""
# function ('f') and operator ('o') names (schema or '' for the session's schemas, name) ->
# oids of every overload's function; a qualified column's last field ('a': `u.leakf`) -> the
# functions of that name whose first argument is a row type or a pseudo-type (attribute
# notation calls them);
# oids of every overload's function; cast target types ('t', the quoted name) -> the
# functions of casts to them and of their domain CHECK constraints
FUNCTIONS_SQL = """
SELECT p.oid::int8
FROM unnest($1::text[], $2::text[], $3::text[]) AS f(k, s, n)
JOIN pg_proc p ON f.k = 'f' AND p.proname = f.n
JOIN pg_namespace ns ON ns.oid = p.pronamespace
WHERE CASE WHEN f.s = '' THEN ns.nspname = ANY (current_schemas(true)) ELSE ns.nspname = f.s END
UNION
SELECT o.oprcode::oid::int8
FROM unnest($1::text[], $2::text[], $3::text[]) AS f(k, s, n)
JOIN pg_operator o ON f.k = 'o' AND o.oprname = f.n
JOIN pg_namespace ns ON ns.oid = o.oprnamespace
WHERE CASE WHEN f.s = '' THEN ns.nspname = ANY (current_schemas(true)) ELSE ns.nspname = f.s END
UNION
SELECT c.castfunc::int8
FROM unnest($1::text[], $2::text[], $3::text[]) AS f(k, s, n)
JOIN pg_cast c ON f.k = 't' AND c.casttarget = to_regtype(f.n) AND c.castfunc <> 0
UNION
SELECT d.refobjid::int8
FROM unnest($1::text[], $2::text[], $3::text[]) AS f(k, s, n)
JOIN pg_constraint con ON f.k = 't' AND con.contypid = to_regtype(f.n)
JOIN pg_depend d ON d.classid = 'pg_constraint'::regclass AND d.objid = con.oid
  AND d.refclassid = 'pg_proc'::regclass
UNION
SELECT p.oid::int8
FROM unnest($1::text[], $2::text[], $3::text[]) AS f(k, s, n)
JOIN pg_proc p ON f.k = 'a' AND p.proname = f.n AND p.pronargs >= 1
JOIN pg_namespace ns ON ns.oid = p.pronamespace
JOIN pg_type t ON t.oid = p.proargtypes[0]
WHERE ns.nspname = ANY (current_schemas(true)) AND (t.typrelid <> 0 OR t.typtype = 'p')
"""
# what the rewrite rules (a view's query, DO ALSO), row security policies, column defaults
# and CHECK constraints of relations $1 and the BEGIN ATOMIC bodies of functions $2 reference
# in pg_class ('pg_class') or pg_proc ('pg_proc')
_REFERENCED = """
  SELECT d.refobjid FROM pg_depend d
  WHERE d.refclassid = '{0}'::regclass AND (
    (d.classid = 'pg_rewrite'::regclass  -- a read fires only the SELECT rule (a view's)
     AND d.objid IN (SELECT oid FROM pg_rewrite WHERE ev_class = ANY ($1::oid[])
                     AND (ev_type = '1' OR $3 = 't')))
    OR (d.classid = 'pg_policy'::regclass
        AND d.objid IN (SELECT oid FROM pg_policy WHERE polrelid = ANY ($1::oid[])))
    OR (d.classid = 'pg_attrdef'::regclass
        AND d.objid IN (SELECT oid FROM pg_attrdef WHERE adrelid = ANY ($1::oid[])))
    OR (d.classid = 'pg_constraint'::regclass AND d.objid IN (
        SELECT oid FROM pg_constraint WHERE conrelid = ANY ($1::oid[]) AND contype = 'c'))
    -- a domain's CHECK runs on every value coerced to it: a column of $1, an argument of $2
    -- (and of the domains under it: a domain over a domain checks both)
    OR (d.classid = 'pg_constraint'::regclass AND d.objid IN (
        WITH RECURSIVE ty(oid) AS (
          SELECT atttypid FROM pg_attribute WHERE attrelid = ANY ($1::oid[]) AND attnum > 0
          UNION SELECT unnest(proargtypes::oid[]) FROM pg_proc WHERE oid = ANY ($2::oid[])
          UNION SELECT t.typbasetype FROM pg_type t JOIN ty ON t.oid = ty.oid
          WHERE t.typbasetype <> 0)
        SELECT con.oid FROM pg_constraint con
        WHERE con.contypid <> 0 AND con.contypid IN (SELECT oid FROM ty)))
    -- a write computes $1's index expressions and predicates
    OR ($3 = 't' AND d.classid = 'pg_class'::regclass AND d.objid IN (
        SELECT indexrelid FROM pg_index WHERE indrelid = ANY ($1::oid[])))
    OR (d.classid = 'pg_proc'::regclass AND d.objid = ANY ($2::oid[])))"""
# those relations (and $1's partitions / inheritance children, and for a write the tables
# its foreign keys cascade to), and those functions with $2 themselves and, when $3 = 't'
# (a write), $1's triggers' functions
DEPENDS_SQL = f"""
SELECT 'r', c.oid::int8, ns.nspname, c.relname, NULL, NULL, NULL, NULL
FROM pg_class c JOIN pg_namespace ns ON ns.oid = c.relnamespace
WHERE c.relkind <> 'S' AND (c.oid IN (
  -- a parent's partitions and inheritance children are read with it
  SELECT inhrelid FROM pg_inherits WHERE inhparent = ANY ($1::oid[]))
  -- a write to $1 deletes or updates the rows of tables whose foreign keys cascade from it
  OR ($3 = 't' AND c.oid IN (
    SELECT conrelid FROM pg_constraint WHERE contype = 'f' AND confrelid = ANY ($1::oid[])
      AND (confdeltype IN ('c', 'n', 'd') OR confupdtype IN ('c', 'n', 'd'))))
  OR c.oid IN ({_REFERENCED.format("pg_class")}))
UNION
SELECT 'f', p.oid::int8, ns.nspname, p.proname, l.lanname, p.prosrc,
       (p.prosqlbody IS NOT NULL)::text, array_to_string(p.proconfig, ',')
FROM pg_proc p JOIN pg_namespace ns ON ns.oid = p.pronamespace
JOIN pg_language l ON l.oid = p.prolang
WHERE p.oid = ANY ($2::oid[]) OR p.oid IN ({_REFERENCED.format("pg_proc")})
  OR ($3 = 't' AND p.oid IN (
    SELECT tgfoid FROM pg_trigger WHERE tgrelid = ANY ($1::oid[]) AND NOT tgisinternal))
  -- an implicit or assignment cast runs its function where no cast is written (f(1) for
  -- f(ticket), INSERT of 1 into a ticket column): every user-made one to an argument type
  -- of $2 or a column type of $1 counts (which ones run depends on types not inferred here)
  OR p.oid IN (SELECT c.castfunc FROM pg_cast c WHERE c.castcontext <> 'e'
               AND c.castfunc >= {FIRST_USER_OID} AND (c.casttarget IN (
                 SELECT unnest(pp.proargtypes::oid[]) FROM pg_proc pp
                 WHERE pp.oid = ANY ($2::oid[]))
               OR c.casttarget IN (SELECT a.atttypid FROM pg_attribute a
                                   WHERE a.attrelid = ANY ($1::oid[]) AND a.attnum > 0)))
"""  # noqa: S608 - built from the constants above only


@dataclass(frozen=True)
class Resolved:
    tables: tuple[str, ...] = ()      # "schema.relation", lowercased, as rules match them
    functions: tuple[str, ...] = ()   # "schema.function", lowercased
    guards: tuple[str, ...] = ()      # guards tripped inside SQL function bodies
    unresolved: tuple[str, ...] = ()  # what the gateway cannot see into (named for the error)
    # DDL / DCL inside SQL function bodies: the statement changes the catalog as it runs
    kinds: tuple[str, ...] = ()


def needed(db: Database) -> bool:
    """Only a rule that names tables or functions depends on what the names reach."""
    return any(r.tables or r.functions for r in db.sql)


def quote_ident(part: str) -> str:
    return '"' + part.replace('"', '""') + '"'


def _array(values: list[str]) -> str:
    """A text[] literal (text format) for a parameter."""
    return "{" + ",".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
                          for v in values) + "}"


def _function_names(funcs: list[tuple[str, ...]], ops: list[tuple[str, ...]],
                    types: list[tuple[str, ...]],
                    attrs: list[tuple[str, ...]] | None = None) -> list[str]:
    """The three text[] parameters of FUNCTIONS_SQL: kinds, schemas, names."""
    kinds, schemas, names = [], [], []
    for kind, refs in (("f", funcs), ("o", ops), ("a", attrs or [])):
        for parts in dict.fromkeys(refs):
            if not parts or len(parts) > 3:
                continue
            kinds.append(kind)
            schemas.append(parts[-2] if len(parts) >= 2 else "")
            names.append(parts[-1])
    for parts in dict.fromkeys(types):
        if parts and len(parts) <= 3:
            kinds.append("t")
            schemas.append("")
            names.append(".".join(quote_ident(p) for p in parts))
    return [_array(kinds), _array(schemas), _array(names)]


async def resolve(st: Statement, query: Query) -> Resolved:
    """The relations and functions `st` reaches through the catalog (see module doc).
    Raises whatever `query` raises (the caller refuses the statement)."""
    write = bool(WRITES & set(st.kinds))
    tables: list[str] = []
    functions: list[str] = []
    guards: list[str] = []
    unresolved: list[str] = []
    kinds: list[str] = []
    seen_rel: set[int] = set()
    queried_fn: set[int] = set()     # passed as $2: their pg_depend references are known
    judged_fn: set[int] = set()      # classified (built in, native, SQL, opaque)
    rel_refs = list(st.relation_refs)
    fn_refs = list(st.function_refs)
    op_refs = list(st.operator_refs)
    type_refs = list(st.type_refs)
    attr_refs = list(st.attribute_refs)
    pending_rel: set[int] = set()
    pending_fn: set[int] = set()
    for _ in range(MAX_ROUNDS):
        if rel_refs:
            written = {".".join(quote_ident(p) for p in r): ".".join(r).lower()
                       for r in rel_refs if r}
            for ref, oid, nsp, rel in await query(RELATIONS_SQL, [_array(list(written))]):
                if int(oid) not in seen_rel:
                    seen_rel.add(int(oid))
                    pending_rel.add(int(oid))
                    full = f"{nsp}.{rel}".lower()
                    if full in STATISTICS:
                        _add(unresolved, f"{full} (sampled values of other tables)")
                    if write and full == "pg_catalog.pg_settings":  # its rules: set_config
                        _add(guards, "dangerous_function")
                    # the statement's own `orders` already says public.orders to a rule;
                    # a name inside a function body is not in the statement's tables
                    as_written = written.get(ref, "")
                    if not (as_written in st.tables
                            and full in (as_written, f"public.{as_written}")):
                        _add(tables, full)
        if fn_refs or op_refs or type_refs or attr_refs:
            for (oid,) in await query(FUNCTIONS_SQL, _function_names(
                    fn_refs, op_refs, type_refs, attr_refs)):
                if int(oid) not in queried_fn:
                    pending_fn.add(int(oid))
        rel_refs, fn_refs, op_refs, type_refs, attr_refs = [], [], [], [], []
        if not pending_rel and not pending_fn:
            return _done(tables, functions, guards, unresolved, kinds)
        if len(seen_rel) + len(judged_fn) > MAX_OBJECTS:
            break
        rows = await query(DEPENDS_SQL, [_array([str(o) for o in sorted(pending_rel)]),
                                         _array([str(o) for o in sorted(pending_fn)]),
                                         "t" if write else "f"])
        queried_fn |= pending_fn
        pending_rel, pending_fn = set(), set()
        for kind, oid, nsp, name, lang, src, atomic, config in rows:
            oid = int(oid)
            if kind == "r":
                if oid not in seen_rel:
                    seen_rel.add(oid)
                    pending_rel.add(oid)
                    _add(tables, f"{nsp}.{name}".lower())
                    if write and f"{nsp}.{name}" == "pg_catalog.pg_settings":
                        _add(guards, "dangerous_function")  # a view over it, written
                continue
            if oid in judged_fn:
                continue
            judged_fn.add(oid)
            _add(functions, f"{nsp}.{name}".lower())
            if nsp in BUILTIN_SCHEMAS and name.lower() in DANGEROUS_FUNCTIONS:
                # one a statement does not name but reaches: UPDATE pg_settings runs
                # set_config (search_path = …) through the view's rule
                _add(guards, "dangerous_function")
            if nsp in BUILTIN_SCHEMAS or lang in NATIVE_LANGUAGES:
                continue
            if lang != "sql":
                _add(unresolved, f"{nsp}.{name} (LANGUAGE {lang})")
                continue
            if atomic == "true":
                if oid not in queried_fn:  # its references are in pg_depend: next round
                    pending_fn.add(oid)
                continue
            if config and "search_path=" in config.lower():
                # its unqualified names resolve in another search_path than the agent's
                _add(unresolved, f"{nsp}.{name} (sets search_path)")
                continue
            try:
                body = analyze(src or "")
            except SqlError:
                _add(unresolved, f"{nsp}.{name} (body does not parse)")
                continue
            for g in body.guards:
                _add(guards, g)
            for k in CATALOG_KINDS.intersection(body.kinds):
                _add(kinds, k)
            rel_refs.extend(body.relation_refs)
            fn_refs.extend(body.function_refs)
            op_refs.extend(body.operator_refs)
            type_refs.extend(body.type_refs)
            attr_refs.extend(body.attribute_refs)
    _add(unresolved, f"dependencies deeper than {MAX_ROUNDS} look-ups or over "
                     f"{MAX_OBJECTS} objects")
    return _done(tables, functions, guards, unresolved, kinds)


def _done(tables: list[str], functions: list[str], guards: list[str],
          unresolved: list[str], kinds: list[str]) -> Resolved:
    for t in tables:
        if t in STATISTICS:
            _add(unresolved, f"{t} (sampled values of other tables)")
    return Resolved(tuple(tables), tuple(functions), tuple(guards), tuple(unresolved),
                    tuple(kinds))


def _add(lst: list[str], v: str) -> None:
    if v not in lst:
        lst.append(v)


def widen(st: Statement, r: Resolved) -> Statement:
    """`st` with what it reaches added to its tables, functions and guards (and the DDL its
    functions run to its kinds: rules on DDL see it, the session forgets the cache after)."""
    return dataclasses.replace(
        st, kinds=tuple(dict.fromkeys((*st.kinds, *r.kinds))),
        tables=tuple(dict.fromkeys((*st.tables, *r.tables))),
        functions=tuple(dict.fromkeys((*st.functions, *r.functions))),
        guards=tuple(dict.fromkeys((*st.guards, *r.guards))))


class Cache:
    """Resolutions per (relation, function and operator refs, write), bounded, CACHE_TTL_S long:
    agents repeat the same statements, and the catalog login is one per database."""

    def __init__(self, size: int = CACHE_SIZE, ttl: float = CACHE_TTL_S) -> None:
        self.size, self.ttl = size, ttl
        self._d: OrderedDict[Any, tuple[float, Resolved]] = OrderedDict()
        # bumped by forget(): a resolution that began before it read the old catalog
        self.generation = 0

    def forget(self) -> None:
        """DDL went through the gateway (an agent renamed a function, dropped a view …):
        what names reached before may not hold now, so nothing cached is reused."""
        self._d.clear()
        self.generation += 1

    async def resolve(self, st: Statement, query: Query) -> Resolved:
        """`resolve(st, query)`, cached; a result read across a forget() is not kept."""
        hit = self.get(st)
        if hit is None:
            gen = self.generation
            hit = await resolve(st, query)
            if gen == self.generation:
                self.put(st, hit)
        return hit

    def key(self, st: Statement) -> Any:
        return (st.relation_refs, st.function_refs, st.operator_refs, st.type_refs,
                st.attribute_refs,
                bool(WRITES & set(st.kinds)))

    def get(self, st: Statement) -> Resolved | None:
        k = self.key(st)
        hit = self._d.get(k)
        if hit is None or time.monotonic() - hit[0] > self.ttl:
            return None
        self._d.move_to_end(k)
        return hit[1]

    def put(self, st: Statement, r: Resolved) -> None:
        k = self.key(st)
        self._d[k] = (time.monotonic(), r)
        self._d.move_to_end(k)
        while len(self._d) > self.size:
            self._d.popitem(last=False)
