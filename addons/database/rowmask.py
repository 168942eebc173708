"""Masking of what a Postgres server sends back: result rows, COPY data, errors, notices.

Pure (no mitmproxy import). The relay (addons/database/session.py) gets one `ResultMasker`
per client connection from `make_result_masker(db, masking, identity)` (the hook described
in addons/database/hooks.py) and shows it every frontend message it forwards (`client()`)
and every backend message after login (`server()`, which returns what to send instead).
The ResultMasker follows the protocol (Parse/Bind/Describe/Execute/Sync, portals, formats)
and masks each result with an `ExecutionMasker`. A result that cannot be masked is refused
in band (ErrorResponse 0A000, the connection stays usable); `Desync` means close.

Per result column, decided once from the RowDescription and the Bind's format codes:
- a column rule (`[schema.]table.column` glob -> strategy) names the column by the
  RowDescription's table OID and attribute number, resolved to schema/table/column through
  a `Catalog` (the relay fills it with `CATALOG_SQL` over its own login): an alias
  (`SELECT email AS e`) does not hide the source column. A column the catalog cannot name
  (computed: table OID 0, or no catalog given) is matched by its field name against the
  rule's column part, whatever the table part says (fail closed). A computed column that
  can carry text (table OID 0: `lower(secret)`, `secret || ''`, `array_agg(secret)`,
  `row(secret)`) of a statement that reads a table with column rules gets that table's
  strictest rule, since the gateway cannot tell which columns it derives from (numbers
  stay: `count(*)`). A view's column (the catalog names
  the tables a view reads, through nested views) gets the rule of a base column of its name,
  else, when text, the base tables' strictest rule. Strategies: masking's placeholder /
  redact / partial / hash (same placeholders as LLM traffic; SQL results are never
  restored) and `null`. Text-like columns get the strategy's text, json/jsonb a JSON
  string of it; a column of any other type (int8 card numbers, uuid, arrays, records,
  enums, …) becomes NULL under any rule, since a
  placeholder cannot live in it: the RowDescription stays exactly as the server sent it,
  so every client keeps decoding by the types it was told.
- every other value goes through the same detectors as LLM traffic: text-like and
  user-defined types (citext, …) in text format are masked in place, json/jsonb JSON-aware
  (the document stays valid JSON), binary arrays of text element-wise; a finding in a value
  of another type (a card number in a bigint, an IP in inet) makes the value NULL.
- binary format: text/varchar/bpchar/name/char/xml/unknown, json, jsonb, uuid, int2/4/8,
  oid, float4/8, numeric, inet/cidr and arrays of them are decoded, masked and re-encoded;
  bool, dates, times, intervals, bytea, money and macaddr cannot carry text and pass. A
  binary column of any other type (records, user-defined types, …) cannot be inspected: the
  result is refused (MaskRefused) before its first row.
- ErrorResponse / NoticeResponse: message, detail, hint, where and internal query masked
  (`Key (email)=(a@b.com) already exists.`); NotificationResponse payloads masked.
- COPY TO STDOUT: text and CSV lines masked as text; binary COPY, and any COPY while column
  rules apply (COPY lines carry no column identity), are refused.

Throughput (bench/pg_rowmask.py, BENCHMARKS.md): see there; the work per row is one parse of
the DataRow and one detector pass per text value, so it runs wherever the relay runs it.
"""

from __future__ import annotations

import fnmatch
import json
import math
import struct
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from addons.frame.principal import principal
from addons.masking.bodies import Masked, Unparseable
from addons.masking.masker import (
    Masker,
    Session,
    SessionStore,
    count,
    hmac_key_from_env,
    label,
    partial,
    session_key,
)

STRATEGIES = ("placeholder", "redact", "partial", "hash", "null")

# ---------------------------------------------------------------- type OIDs (pg_type.h)
TEXT_OID = 25
TEXTUAL = frozenset({25, 1043, 1042, 19, 18, 705, 142})  # text varchar bpchar name char unknown xml
JSON_OID, JSONB_OID = 114, 3802
UUID_OID = 2950
INTS = {21: ">h", 23: ">i", 20: ">q", 26: ">I"}  # int2 int4 int8 oid
FLOATS = {700: ">f", 701: ">d"}
NUMERIC_OID = 1700
INET_OIDS = frozenset({869, 650})
# Cannot hold free text: their binary form passes (their text form is still inspected).
INERT_BINARY = frozenset({16, 1082, 1083, 1114, 1184, 1186, 1266, 17, 790, 829, 774})
# array type -> element type, for the element types above
ARRAYS = {1009: 25, 1015: 1043, 1014: 1042, 1003: 19, 1002: 18, 143: 142, 199: 114,
          3807: 3802, 2951: 2950, 1005: 21, 1007: 23, 1016: 20, 1028: 26, 1021: 700,
          1022: 701, 1231: 1700, 1041: 869, 651: 650, 1000: 16, 1182: 1082, 1183: 1083,
          1115: 1114, 1185: 1184, 1187: 1186, 1270: 1266, 1001: 17}
USER_OID_MIN = 16384  # OIDs below are built in


class Desync(Exception):
    """The server sent something the protocol does not allow here: close the connection."""


class MaskRefused(Exception):
    """This result cannot be masked: it is refused (the message is for the client)."""


# ---------------------------------------------------------------- wire helpers
def _cstr(buf: bytes, pos: int) -> tuple[bytes, int]:
    end = buf.index(b"\0", pos)
    return buf[pos:end], end + 1


@dataclass(slots=True)
class Field:
    name: bytes
    table_oid: int
    attnum: int
    type_oid: int
    typlen: int
    typmod: int
    fmt: int


def parse_row_description(payload: bytes) -> list[Field]:
    try:
        (n,) = struct.unpack_from(">h", payload, 0)
        pos = 2
        out = []
        for _ in range(n):
            name, pos = _cstr(payload, pos)
            t, a, ty, ln, mod, f = struct.unpack_from(">IhIhih", payload, pos)
            pos += 18
            out.append(Field(name, t, a, ty, ln, mod, f))
    except (struct.error, ValueError) as e:
        raise Desync(f"malformed RowDescription: {e}") from None
    if pos != len(payload) or n < 0:
        raise Desync("malformed RowDescription: length")
    return out


def build_row_description(fields: Sequence[Field]) -> bytes:
    parts = [struct.pack(">h", len(fields))]
    for f in fields:
        parts.append(f.name + b"\0" + struct.pack(">IhIhih", f.table_oid, f.attnum, f.type_oid,
                                                  f.typlen, f.typmod, f.fmt))
    return b"".join(parts)


def parse_data_row(payload: bytes) -> list[bytes | None]:
    try:
        (n,) = struct.unpack_from(">h", payload, 0)
        pos = 2
        out: list[bytes | None] = []
        for _ in range(n):
            (ln,) = struct.unpack_from(">i", payload, pos)
            pos += 4
            if ln == -1:
                out.append(None)
                continue
            if ln < 0 or pos + ln > len(payload):
                raise Desync("malformed DataRow: value length")
            out.append(payload[pos:pos + ln])
            pos += ln
    except struct.error as e:
        raise Desync(f"malformed DataRow: {e}") from None
    if pos != len(payload) or n < 0:
        raise Desync("malformed DataRow: length")
    return out


def build_data_row(values: Sequence[bytes | None]) -> bytes:
    parts = [struct.pack(">h", len(values))]
    for v in values:
        parts.append(b"\xff\xff\xff\xff" if v is None else struct.pack(">i", len(v)) + v)
    return b"".join(parts)


def parse_fields(payload: bytes) -> list[tuple[int, bytes]]:
    """ErrorResponse / NoticeResponse fields [(code, value)]."""
    out = []
    pos = 0
    try:
        while payload[pos] != 0:
            code = payload[pos]
            val, pos = _cstr(payload, pos + 1)
            out.append((code, val))
    except (IndexError, ValueError):
        raise Desync("malformed error/notice fields") from None
    return out


def build_fields(fields: Iterable[tuple[int, bytes]]) -> bytes:
    return b"".join(bytes([c]) + v.replace(b"\0", b"") + b"\0" for c, v in fields) + b"\0"


# ---------------------------------------------------------------- binary codecs
def _numeric_text(b: bytes) -> str:
    ndigits, weight, sign, dscale = struct.unpack_from(">hhHh", b, 0)
    if sign == 0xC000:
        return "NaN"
    if sign == 0xD000:
        return "Infinity"
    if sign == 0xF000:
        return "-Infinity"
    if len(b) != 8 + 2 * ndigits or sign not in (0, 0x4000):
        raise ValueError("numeric")
    digits = struct.unpack_from(f">{ndigits}H", b, 8)
    value = 0
    for d in digits:
        value = value * 10000 + d
    exp = (weight - ndigits + 1) * 4
    dec = Decimal(value).scaleb(exp)
    if sign:
        dec = -dec
    return f"{dec.quantize(Decimal(1).scaleb(-dscale)) if dscale >= 0 else dec:f}"


def _inet_text(b: bytes) -> str:
    family, bits, _cidr, n = struct.unpack_from(">BBBB", b, 0)
    addr = b[4:4 + n]
    if family == 2 and n == 4:
        text = ".".join(str(x) for x in addr)
    elif family == 3 and n == 16:
        import ipaddress
        text = str(ipaddress.IPv6Address(addr))
    else:
        raise ValueError("inet")
    full = 32 if family == 2 else 128
    return text if bits == full else f"{text}/{bits}"


def _float_text(fmt: str, b: bytes) -> str:
    (v,) = struct.unpack(fmt, b)
    if math.isfinite(v) and v == int(v) and abs(v) < 1e19:
        return str(int(v))  # digits a detector can see (a phone number stored as float8)
    return repr(v)


def _float_digits(text: str) -> str:
    try:
        v = float(text)
    except ValueError:
        return text
    if math.isfinite(v) and v == int(v) and abs(v) < 1e19:
        return str(int(v))
    return text


def binary_text(type_oid: int, b: bytes) -> str | None:
    """The text of a binary value of a type we decode (None: not one of them).
    Raises ValueError on a malformed value."""
    if type_oid in TEXTUAL:
        return b.decode("utf-8")
    if type_oid == JSON_OID:
        return b.decode("utf-8")
    if type_oid == JSONB_OID:
        if b[:1] != b"\x01":
            raise ValueError("jsonb version")
        return b[1:].decode("utf-8")
    if type_oid == UUID_OID:
        return str(uuid.UUID(bytes=b))
    if type_oid in INTS:
        return str(struct.unpack(INTS[type_oid], b)[0])
    if type_oid in FLOATS:
        return _float_text(FLOATS[type_oid], b)
    if type_oid == NUMERIC_OID:
        return _numeric_text(b)
    if type_oid in INET_OIDS:
        return _inet_text(b)
    return None


def decodable_binary(type_oid: int) -> bool:
    return (type_oid in TEXTUAL or type_oid in (JSON_OID, JSONB_OID, UUID_OID, NUMERIC_OID)
            or type_oid in INTS or type_oid in FLOATS or type_oid in INET_OIDS)


def _array_elements(b: bytes) -> tuple[bytes, list[bytes | None], int]:
    """(header bytes, elements, element type) of a binary array."""
    ndim, _flags, elem = struct.unpack_from(">iiI", b, 0)
    if ndim < 0 or ndim > 6:
        raise ValueError("array dims")
    pos = 12 + 8 * ndim
    total = 1
    for i in range(ndim):
        (n,) = struct.unpack_from(">i", b, 12 + 8 * i)
        if n < 0:
            raise ValueError("array dims")
        total *= n
    if ndim == 0:
        total = 0
    header = b[:pos]
    out: list[bytes | None] = []
    for _ in range(total):
        (ln,) = struct.unpack_from(">i", b, pos)
        pos += 4
        if ln == -1:
            out.append(None)
            continue
        if ln < 0 or pos + ln > len(b):
            raise ValueError("array element length")
        out.append(b[pos:pos + ln])
        pos += ln
    if pos != len(b):
        raise ValueError("array length")
    return header, out, elem


def _array_build(header: bytes, elems: Sequence[bytes | None]) -> bytes:
    flags = 1 if any(e is None for e in elems) else 0
    header = header[:4] + struct.pack(">i", flags) + header[8:]
    return header + b"".join(b"\xff\xff\xff\xff" if e is None else struct.pack(">i", len(e)) + e
                             for e in elems)


# ---------------------------------------------------------------- rules and catalog
# which strategy wins when several rules could apply to one computed column
_STRICTNESS = {"placeholder": 0, "partial": 1, "hash": 2, "redact": 3, "null": 4}


@dataclass(frozen=True)
class ColumnRule:
    """`[schema.]table.column` glob (case-insensitive) -> strategy."""

    pattern: str
    strategy: str

    def parts(self) -> tuple[str, str, str]:
        bits = self.pattern.lower().split(".")
        if len(bits) == 1:
            return "*", "*", bits[0]
        if len(bits) == 2:
            return "*", bits[0], bits[1]
        return bits[0], bits[1], ".".join(bits[2:])


class ColumnRules:
    """The first rule (in order) that matches a column wins."""

    def __init__(self, rules: Iterable[ColumnRule] = ()) -> None:
        self.rules = tuple(rules)
        for r in self.rules:
            if r.strategy not in STRATEGIES:
                raise ValueError(f"unknown column masking strategy {r.strategy!r} "
                                 f"(one of {', '.join(STRATEGIES)})")
        self._parts = [(r.parts(), r.strategy) for r in self.rules]

    def __bool__(self) -> bool:
        return bool(self.rules)

    def for_tables(self, tables: Iterable[str]) -> str | None:
        """The strictest strategy of the rules whose table part matches one of `tables`
        ("schema.table" or "table", as a statement names them), or None."""
        best: str | None = None
        for t in tables:
            schema, _, table = t.lower().rpartition(".")
            for (ps, pt, _pc), strategy in self._parts:
                if fnmatch.fnmatchcase(table, pt) and (not schema or fnmatch.fnmatchcase(
                        schema, ps)):
                    if best is None or _STRICTNESS[strategy] > _STRICTNESS[best]:
                        best = strategy
        return best

    def match(self, schema: str | None, table: str | None, column: str) -> str | None:
        col = column.lower()
        for (ps, pt, pc), strategy in self._parts:
            if not fnmatch.fnmatchcase(col, pc):
                continue
            if table is None:  # computed or unnamed: the column part decides (fail closed)
                return strategy
            if fnmatch.fnmatchcase(table.lower(), pt) and \
                    fnmatch.fnmatchcase((schema or "").lower(), ps):
                return strategy
        return None


# The relay runs this (its own login, not the agent's session) for table OIDs the cache
# lacks; $1 is an oid[] of them. Rows: (table oid, attnum, schema, table, column, bases):
# `bases` is, for a view or materialized view, the tables it reads ("schema.table,…",
# through nested views), else NULL — a view column is matched against its base tables' rules.
CATALOG_SQL = (
    "SELECT a.attrelid::int8, a.attnum::int4, n.nspname::text, c.relname::text, "
    "a.attname::text, CASE WHEN c.relkind IN ('v', 'm') THEN (WITH RECURSIVE deps(oid, depth) "
    "AS (SELECT c.oid, 0 UNION SELECT d.refobjid, deps.depth + 1 FROM deps "
    "JOIN pg_catalog.pg_rewrite r ON r.ev_class = deps.oid "
    "JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::regclass "
    "AND d.objid = r.oid AND d.refclassid = 'pg_catalog.pg_class'::regclass "
    "AND d.refobjid <> deps.oid WHERE deps.depth < 8) "
    "SELECT string_agg(DISTINCT bn.nspname || '.' || bc.relname, ',') FROM deps "
    "JOIN pg_catalog.pg_class bc ON bc.oid = deps.oid "
    "JOIN pg_catalog.pg_namespace bn ON bn.oid = bc.relnamespace "
    "WHERE deps.oid <> c.oid AND bc.relkind NOT IN ('v', 'm')) END::text "
    "FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid "
    "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
    "WHERE a.attrelid = ANY($1::oid[]) AND a.attnum > 0")


class Catalog:
    """(table OID, attnum) -> (schema, table, column), per database, kept `ttl` seconds
    (a renamed column is seen again after that)."""

    def __init__(self, ttl: float = 300.0, max_tables: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._cols: dict[tuple[int, int], tuple[str, str, str]] = {}
        self._bases: dict[int, tuple[str, ...]] = {}
        self._loaded: dict[int, float] = {}
        self.ttl = ttl
        self.max_tables = max_tables
        self._clock = clock

    def missing(self, table_oids: Iterable[int]) -> set[int]:
        now = self._clock()
        return {t for t in table_oids
                if t and (t not in self._loaded or now - self._loaded[t] > self.ttl)}

    def put(self, oids: Iterable[int], rows: Iterable[Sequence[Any]]) -> None:
        now = self._clock()
        if len(self._loaded) > self.max_tables:
            self._loaded.clear()
            self._cols.clear()
            self._bases.clear()
        for t in oids:
            self._loaded[int(t)] = now
        for row in rows:
            t, a, s, tb, c = row[:5]
            self._cols[(int(t), int(a))] = (str(s), str(tb), str(c))
            if len(row) > 5 and row[5]:
                self._bases[int(t)] = tuple(x for x in str(row[5]).split(",") if x)

    def names(self, table_oid: int, attnum: int) -> tuple[str, str, str] | None:
        return self._cols.get((table_oid, attnum)) if table_oid else None

    def bases(self, table_oid: int) -> tuple[str, ...]:
        """The tables a view reads ("schema.table"), () for a table."""
        return self._bases.get(table_oid, ())


def wanted_tables(msg_type: bytes, payload: bytes) -> set[int]:
    """Table OIDs a RowDescription names (for the relay to resolve before server())."""
    if msg_type != b"T":
        return set()
    return {f.table_oid for f in parse_row_description(payload) if f.table_oid}


RECORD_OIDS = frozenset({2249, 2287})  # record, record[]


def may_hold_text(type_oid: int) -> bool:
    """Whether a value of this type can carry a text column's content: text-like, json,
    arrays of them, records (`row(secret)`), user-defined types (a table's row type, enums,
    domains' arrays, extension types)."""
    return (type_oid in TEXTUAL or type_oid in (JSON_OID, JSONB_OID)
            or ARRAYS.get(type_oid) in TEXTUAL or ARRAYS.get(type_oid) in (JSON_OID, JSONB_OID)
            or type_oid in RECORD_OIDS or type_oid >= USER_OID_MIN)


# ---------------------------------------------------------------- the plan of one result
_TEXT, _JSON, _OTHER, _ARRAY, _INERT, _OPAQUE = range(6)


def _kind(type_oid: int, fmt: int) -> int:
    if type_oid in (JSON_OID, JSONB_OID):
        return _JSON
    if type_oid in TEXTUAL:
        return _TEXT
    if type_oid in ARRAYS:
        elem = ARRAYS[type_oid]
        if fmt == 1:
            return _ARRAY
        return _TEXT if elem in TEXTUAL or elem in (JSON_OID, JSONB_OID) else _OTHER
    if fmt == 0:
        return _TEXT if type_oid >= USER_OID_MIN else _OTHER  # citext & co: text
    if decodable_binary(type_oid):
        return _OTHER
    if type_oid in INERT_BINARY:
        return _INERT
    return _OPAQUE


@dataclass(slots=True)
class _Col:
    name: str
    type_oid: int
    fmt: int
    kind: int
    rule: str | None
    label: str


class ExecutionMasker:
    """Masks the answer to one execution (a simple Query, or an Execute of a portal),
    planned from its RowDescription and the Bind's format codes; ResultMasker (below) makes
    one per result. Each method takes a message payload and returns the payload to send;
    MaskRefused refuses the result. `findings` counts what was masked (never values)."""

    def __init__(self, masker: Masker | None, session: Session | None, rules: ColumnRules,
                 formats: Sequence[int] = (), catalog: Catalog | None = None,
                 row_description: bytes | None = None, tables: Sequence[str] = ()) -> None:
        self.masker = masker
        # a computed text column of a statement reading a table with column rules gets
        # that table's strictest rule: `lower(secret)` must not get past `t.secret`
        self._computed_rule = rules.for_tables(tables) if rules and tables else None
        self.session = session if session is not None else Session()
        self.rules = rules
        self.catalog = catalog
        self.formats = tuple(formats)
        self.findings: dict[str, dict[str, Any]] = {}
        self.rows = 0
        self._ctx = Masked(masker, self.session, self.findings, restorable=False) \
            if masker is not None else None
        self._cols: list[_Col] | None = None
        # custom detectors may match short numbers (employee ids …): then every value is seen
        cfg = getattr(getattr(masker, "detectors", None), "config", None)
        self._short_numbers_clean = masker is not None and not getattr(cfg, "custom", ())
        if row_description is not None:
            self._plan(row_description, self.formats)

    # -- hooks
    def row_description(self, payload: bytes) -> bytes:
        # A simple query's RowDescription carries the real format codes; one answering a
        # Describe of a portal too. The Bind codes, when given, are what the rows will use.
        self._plan(payload, self.formats or None)
        return payload

    def data_row(self, payload: bytes) -> bytes:
        cols = self._cols
        if cols is None:
            raise MaskRefused("rows of a result whose columns were never described: the "
                              "gateway cannot tell them apart (send Describe first)")
        try:
            values = parse_data_row(payload)
        except Desync as e:
            raise MaskRefused(str(e)) from None
        if len(values) != len(cols):
            raise MaskRefused("a row does not match its RowDescription")
        changed = False
        for i, c in enumerate(cols):
            v = values[i]
            if v is None:
                continue
            nv = self._value(v, c)
            if nv is not v:
                values[i] = nv
                changed = True
        self.rows += 1
        return build_data_row(values) if changed else payload

    def copy_data(self, payload: bytes) -> bytes:
        """COPY TO STDOUT data (text or CSV; the relay refuses binary COPY, see
        copy_out_response)."""
        self.rows += 1
        if self._ctx is None:
            return payload
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise MaskRefused("COPY data that is not UTF-8 cannot be masked") from None
        new = self._ctx.text(text)
        return payload if new == text else new.encode("utf-8")

    def copy_out_response(self, payload: bytes) -> bytes:
        if payload[:1] != b"\x00":
            raise MaskRefused("binary COPY results cannot be masked by the gateway; use "
                              "text or CSV format")
        if self.rules:
            # COPY rows carry no column identity the rules could be matched against
            raise MaskRefused("COPY TO STDOUT is refused while column masking rules apply "
                              "to this database (use SELECT)")
        return payload

    def notice(self, kind: bytes, payload: bytes) -> bytes:
        if kind == b"A":
            return self._notification(payload)
        try:
            fields = parse_fields(payload)
        except Desync as e:
            raise MaskRefused(str(e)) from None
        if self._ctx is None:
            return payload
        out = []
        for code, val in fields:
            if code in _MASKED_FIELDS:
                text = val.decode("utf-8", "replace")
                val = self._ctx.text(text).encode("utf-8")
            out.append((code, val))
        return build_fields(out)

    # -- planning
    def _plan(self, payload: bytes, formats: Sequence[int] | None) -> None:
        try:
            fields = parse_row_description(payload)
        except Desync as e:
            raise MaskRefused(str(e)) from None
        fmts = [f.fmt for f in fields] if formats is None else _formats(formats, len(fields))
        cols = []
        for f, fmt in zip(fields, fmts, strict=True):
            if fmt not in (0, 1):
                raise MaskRefused(f"unknown result format code {fmt}")
            name = f.name.decode("utf-8", "replace")
            names = self.catalog.names(f.table_oid, f.attnum) if self.catalog else None
            if names is not None:
                rule = self.rules.match(*names) if self.rules else None
                lab = label(names[2])
                bases = self.catalog.bases(f.table_oid) if rule is None and self.rules \
                    and self.catalog else ()
                if bases:  # a view: its column as a column of the tables it reads
                    rule = self._view_rule(bases, names[2], f.type_oid)
            else:
                rule = self.rules.match(None, None, name) if self.rules else None
                lab = label(name)
            k = _kind(f.type_oid, fmt)
            if rule is None and f.table_oid == 0 and may_hold_text(f.type_oid):
                rule = self._computed_rule
            if rule is None and k == _OPAQUE and self._ctx is not None:
                raise MaskRefused(
                    f"column {name!r} (type oid {f.type_oid}) is requested in binary format, "
                    "which the gateway cannot inspect for masking; request it in text format")
            if rule is not None and rule != "null" and f.type_oid not in TEXTUAL and \
                    f.type_oid not in (JSON_OID, JSONB_OID):
                # a placeholder cannot live in this type (numbers, arrays, records, enums,
                # extension types: the client parses them by type): the value goes
                rule = "null"
            cols.append(_Col(name, f.type_oid, fmt, k, rule, lab))
        self._cols = cols

    def _view_rule(self, bases: Sequence[str], column: str, type_oid: int) -> str | None:
        """A view column's rule: a base table's rule for a column of that name, else (a
        text or json column: it may be renamed or computed) the strictest rule of any base
        table."""
        for base in bases:
            schema, _, table = base.rpartition(".")
            rule = self.rules.match(schema, table, column)
            if rule is not None:
                return rule
        return self.rules.for_tables(bases) if may_hold_text(type_oid) else None

    # -- values
    def _value(self, v: bytes, c: _Col) -> bytes | None:
        if c.rule is not None:
            return self._by_rule(v, c)
        ctx = self._ctx
        if ctx is None or c.kind == _INERT:
            return v
        try:
            if c.kind == _ARRAY:
                return self._binary_array(v, ctx)
            text = v.decode("utf-8") if c.fmt == 0 else binary_text(c.type_oid, v)
        except (ValueError, struct.error, IndexError) as e:
            raise MaskRefused(f"a value of column {c.name!r} (type oid {c.type_oid}) could "
                              f"not be decoded for masking ({type(e).__name__})") from None
        if text is None:
            return v
        if c.fmt == 0 and c.type_oid in FLOATS:
            text = _float_digits(text)  # "4.111111111111111e+15" hides a card's digits
        if c.kind == _JSON:
            new = self._json(text, ctx)
            if new is None:
                return v
            return b"\x01" + new if c.type_oid == JSONB_OID and c.fmt == 1 else new
        if c.kind == _TEXT:
            masked = ctx.text(text)
            return v if masked == text else masked.encode("utf-8")
        # a type that cannot hold a placeholder: a finding makes the value NULL
        if self._short_numbers_clean and len(text) < 7 and text.lstrip("-").isdigit():
            return v  # no built-in detector matches fewer than 7 digits (ids, counts)
        return None if self._null_if_found(text, ctx) else v

    @staticmethod
    def _json(text: str, ctx: Masked) -> bytes | None:
        try:
            return ctx.json_bytes(text.encode("utf-8"))
        except Unparseable:  # not JSON after all: mask it as text
            masked = ctx.text(text)
            return None if masked == text else masked.encode("utf-8")

    @staticmethod
    def _null_if_found(text: str, ctx: Masked) -> bool:
        found = ctx.masker.find(text)
        for f in found:
            count(ctx.findings, f.entity, "null")
        return bool(found)

    def _binary_array(self, v: bytes, ctx: Masked) -> bytes:
        header, elems, elem = _array_elements(v)
        if elem in INERT_BINARY or not elems:
            return v
        if not decodable_binary(elem):
            raise ValueError(f"array of type oid {elem}")
        out: list[bytes | None] = []
        changed = False
        for e in elems:
            ne = e
            if e is not None:
                text = binary_text(elem, e)
                assert text is not None
                if elem in TEXTUAL:
                    masked = ctx.text(text)
                    ne = e if masked == text else masked.encode("utf-8")
                elif elem in (JSON_OID, JSONB_OID):
                    nj = self._json(text, ctx)
                    ne = e if nj is None else (b"\x01" + nj if elem == JSONB_OID else nj)
                elif self._null_if_found(text, ctx):
                    ne = None
            changed = changed or ne is not e
            out.append(ne)
        return _array_build(header, out) if changed else v

    def _by_rule(self, v: bytes, c: _Col) -> bytes | None:
        strategy = c.rule
        assert strategy is not None
        count(self.findings, c.label, strategy)
        if strategy == "null":
            return None
        if strategy == "redact":
            text_out = f"[REDACTED_{c.label}]"
        else:
            try:
                text = v.decode("utf-8") if c.fmt == 0 else binary_text(c.type_oid, v)
            except (ValueError, struct.error) as e:
                raise MaskRefused(f"a value of masked column {c.name!r} could not be decoded "
                                  f"({type(e).__name__})") from None
            assert text is not None  # _TEXT and _JSON kinds decode in both formats
            if c.kind == _JSON:
                try:
                    text = json.loads(text)
                    text = text if isinstance(text, str) else json.dumps(text, sort_keys=True)
                except ValueError:
                    pass
            if strategy == "partial":
                text_out = partial(text)
            elif strategy == "hash":
                text_out = (self.masker.hash_text(c.label, text) if self.masker is not None
                            else f"[{c.label}_HMAC]")
            else:
                text_out = self.session.placeholder(c.label, text, False)
        if c.kind == _JSON:  # still a JSON document: a string
            out = json.dumps(text_out).encode()
            return b"\x01" + out if c.type_oid == JSONB_OID and c.fmt == 1 else out
        return text_out.encode("utf-8")

    def _notification(self, payload: bytes) -> bytes:
        try:
            chan, pos = _cstr(payload, 4)
            body, end = _cstr(payload, pos)
        except ValueError:
            raise MaskRefused("malformed NotificationResponse") from None
        if self._ctx is None or end != len(payload):
            return payload
        text = body.decode("utf-8", "replace")
        masked = self._ctx.text(text)
        if masked == text:
            return payload
        return payload[:4] + chan + b"\0" + masked.encode("utf-8").replace(b"\0", b"") + b"\0"


_MASKED_FIELDS = frozenset(b"MDHWqp")  # message, detail, hint, where, internal query


def _formats(codes: Sequence[int], n: int) -> list[int]:
    if not codes:
        return [0] * n
    if len(codes) == 1:
        return [codes[0]] * n
    if len(codes) != n:
        raise MaskRefused("result format codes do not match the result's columns")
    return list(codes)


# ---------------------------------------------------------------- one client connection
MAX_NAMED = 10_000  # prepared statements / portals a client may keep on one connection
MAX_QUEUED = 100_000  # frontend messages not answered yet (pipelining)


@dataclass
class _Desc:
    """A described statement or a bound portal: the server's fields and the row formats."""

    row_description: bytes | None  # None: never described
    formats: tuple[int, ...] | None = None  # Bind's codes; None: those in row_description


@dataclass
class StatementResult:
    """One finished simple-Query statement or Execute, for its record (no values)."""

    token: Any
    tag: str | None = None
    rows: int = 0
    entities: dict[str, dict[str, Any]] = field(default_factory=dict)  # {ENTITY: {count, strategy}}
    error: str | None = None  # the server's error message (masked) or the gateway's refusal
    refused: bool = False

    @property
    def findings(self) -> int:
        """How many values were masked (the relay's records take a count)."""
        return sum(int(e.get("count", 0)) for e in self.entities.values())


class ResultMasker:
    """Follows one client connection's protocol and masks what the server sends back.

    The relay calls `client()` for every frontend message it forwards and `server()` for
    every backend message after login (addons/database/hooks.py). Why a state machine: in
    the extended protocol a DataRow carries neither its column types nor its formats; types
    come from a RowDescription that answered a Describe (asyncpg and psycopg describe a
    prepared statement once, then Bind/Execute it many times), formats from the Bind that
    made the portal. So this follows Parse/Bind/Describe/Execute/Close/Sync and the server's
    answers through a FIFO of what each frontend message will be answered with, as the
    server does (after an error it skips to the next Sync).

    A result that cannot be masked (MaskRefused) is refused in band: an ErrorResponse
    (SQLSTATE 0A000) takes the place of its first row, everything else of that protocol
    unit (up to the next ReadyForQuery) is dropped, and the connection stays usable. The
    statement did run on the server (masking is on the way back; policy stops statements
    before they run). `Desync` (a server message the protocol does not allow here) must
    close both connections.
    """

    def __init__(self, masker: Masker | None, session: Session | None,
                 rules: ColumnRules | None = None, catalog: Catalog | None = None) -> None:
        self.masker = masker
        self.session = session if session is not None else Session()
        self.rules = rules or ColumnRules()
        self.catalog = catalog if catalog is not None else Catalog()
        self.results: list[StatementResult] = []  # finished statements; the relay drains it
        self.findings: dict[str, dict[str, Any]] = {}  # the whole connection
        self._q: deque[list[Any]] = deque()  # expected answers: [kind, *args]
        self._statements: dict[bytes, _Desc] = {}
        self._portals: dict[bytes, _Desc] = {}
        self._exec: ExecutionMasker | None = None  # the result rows are arriving for
        self._stmt: StatementResult | None = None
        self._dropping = False  # a refused result: drop until ReadyForQuery
        self._copy = False

    def _execution(self, row_description: bytes | None, formats: Sequence[int] | None,
                   token: Any = None) -> ExecutionMasker:
        statement = getattr(token, "statement", None)
        tables = tuple(getattr(statement, "tables", ()) or ())
        ex = ExecutionMasker(self.masker, self.session, self.rules, formats or (),
                             self.catalog, None, tables)
        if row_description is not None:
            ex._plan(row_description, formats)  # noqa: SLF001 - same module
        return ex

    def _conn_ctx(self) -> Masked | None:
        st = self._stmt
        if self.masker is None:
            return None
        return Masked(self.masker, self.session, st.entities if st else self.findings,
                      restorable=False)

    # ------------------------------------------------------------ frontend
    def client(self, t: bytes, payload: bytes, token: Any = None) -> None:
        try:
            if t == b"Q":
                self._q.append(["Q", token])
            elif t == b"P":
                self._q.append(["P", _cstr(payload, 0)[0]])
            elif t == b"B":
                portal, pos = _cstr(payload, 0)
                stmt, pos = _cstr(payload, pos)
                (nf,) = struct.unpack_from(">h", payload, pos)
                pos += 2 + 2 * nf
                (np_,) = struct.unpack_from(">h", payload, pos)
                pos += 2
                for _ in range(np_):
                    (ln,) = struct.unpack_from(">i", payload, pos)
                    pos += 4 + max(ln, 0)
                (nr,) = struct.unpack_from(">h", payload, pos)
                codes = struct.unpack_from(f">{nr}h", payload, pos + 2)
                self._q.append(["B", portal, stmt, tuple(codes)])
            elif t == b"D":
                self._q.append(["DS" if payload[:1] == b"S" else "DP", _cstr(payload, 1)[0]])
            elif t == b"E":
                self._q.append(["E", _cstr(payload, 0)[0], token])
            elif t == b"C":
                self._q.append(["CS" if payload[:1] == b"S" else "CP", _cstr(payload, 1)[0]])
            elif t == b"S":
                self._q.append(["S"])
            elif t == b"F":
                self._q.append(["F", token])
        except (struct.error, ValueError, IndexError) as e:
            raise Desync(f"malformed frontend message {t!r}: {e}") from None
        if len(self._q) > MAX_QUEUED:
            raise Desync("too many unanswered frontend messages")

    # ------------------------------------------------------------ backend
    def server(self, t: bytes, payload: bytes) -> list[tuple[bytes, bytes]]:
        try:
            if t in (b"N", b"A", b"S"):  # notice, notification, parameter status: any time
                return [(t, self._async_message(t, payload))]
            if t == b"E":
                return self._error(payload)
            if self._dropping:
                if t == b"Z":
                    # the unit ends: everything the client sent up to its Sync (also what it
                    # sent after the error, before it saw it) was skipped by the server or
                    # by us
                    self._dropping = False
                    while self._q:
                        if self._q.popleft()[0] in ("S", "Q", "F"):
                            break
                    self._end_unit(payload)
                    return [(t, payload)]
                return []
            if not self._q:
                raise Desync(f"server message {t!r} answers nothing the client sent")
            head = self._q[0]
            if t == b"D":
                return [(t, self._data_row(head, payload))]
            if t == b"d":
                if not self._copy or self._exec is None:
                    raise Desync("CopyData outside COPY")
                return [(t, self._exec.copy_data(payload))]
            if t == b"T":
                return [(t, self._row_description(head, payload))]
            if head[0] == "Q":
                return [(t, self._in_query(head, t, payload))]
            return [(t, self._extended(head, t, payload))]
        except MaskRefused as e:
            return self._refuse(str(e))

    def _in_query(self, head: list[Any], t: bytes, payload: bytes) -> bytes:
        if t in (b"C", b"I"):
            self._finish(payload if t == b"C" else b"", head[1])
        elif t == b"Z":
            self._q.popleft()
            self._end_unit(payload)
        elif t == b"H":  # CopyOutResponse
            self._start(head[1])
            self._exec = self._execution(None, None)
            payload = self._exec.copy_out_response(payload)
            self._copy = True
        elif t not in (b"c", b"G", b"W", b"n"):
            raise Desync(f"unexpected server message {t!r} in a simple query")
        return payload

    def _extended(self, head: list[Any], t: bytes, payload: bytes) -> bytes:
        kind = head[0]
        if t == b"1":
            self._expect(kind, "P")
            self._q.popleft()
            self._named(self._statements, head[1], _Desc(None))
        elif t == b"2":
            self._expect(kind, "B")
            self._q.popleft()
            _, portal, stmt, codes = head
            desc = self._statements.get(stmt)
            # a statement this masker never saw parsed (SQL PREPARE, which the server
            # accepted: it bound it) has no known columns; its portal gets them from a
            # Describe of the portal (libpq sends one with every Bind), else its rows are
            # refused in band ("never described") — never guessed, never a disconnect
            self._named(self._portals, portal,
                        _Desc(desc.row_description if desc is not None else None, codes))
        elif t == b"t":
            self._expect(kind, "DS")
        elif t == b"n":
            if kind not in ("DS", "DP"):
                raise Desync("NoData out of order")
            self._q.popleft()
            store = self._statements if kind == "DS" else self._portals
            if head[1] in store:
                store[head[1]].row_description = b"\x00\x00"  # no columns
        elif t in (b"C", b"I", b"s"):
            self._expect(kind, "E")
            self._finish(payload if t == b"C" else b"", head[2])
            self._q.popleft()
        elif t == b"3":
            if kind not in ("CS", "CP"):
                raise Desync("CloseComplete out of order")
            self._q.popleft()
            (self._statements if kind == "CS" else self._portals).pop(head[1], None)
        elif t == b"Z":
            if kind == "F":
                self._finish(b"", head[1])
            else:
                self._expect(kind, "S")
            self._q.popleft()
            self._end_unit(payload)
        elif t == b"V":  # FunctionCallResponse: a value of unknown type, masked as text
            self._expect(kind, "F")
            self._start(head[1])
            payload = self._function_result(payload)
        elif t == b"H":
            self._expect(kind, "E")
            self._start(head[2])
            self._exec = self._execution(None, None)
            payload = self._exec.copy_out_response(payload)
            self._copy = True
        elif t not in (b"c", b"G", b"W"):
            raise Desync(f"unexpected server message {t!r}")
        return payload

    @staticmethod
    def _expect(kind: str, want: str) -> None:
        if kind != want:
            raise Desync(f"server answer out of order (expected one for {want}, got {kind})")

    @staticmethod
    def _named(store: dict[bytes, _Desc], name: bytes, value: _Desc) -> None:
        if name not in store and len(store) >= MAX_NAMED:
            raise MaskRefused(f"more than {MAX_NAMED} prepared statements or portals on one "
                              "connection")
        store[name] = value

    def _row_description(self, head: list[Any], payload: bytes) -> bytes:
        kind = head[0]
        if kind == "Q":
            self._start(head[1])
            self._exec = self._execution(payload, None, head[1])  # simple query: real formats
        elif kind == "DS":
            self._q.popleft()
            if head[1] in self._statements:
                self._statements[head[1]].row_description = payload
            # the client will Bind with its formats: checked when the rows come
            self._execution(payload, None)  # malformed -> MaskRefused now
        elif kind == "DP":
            self._q.popleft()
            portal = self._portals.get(head[1])
            if portal is not None:
                portal.row_description = payload
                self._execution(payload, portal.formats)  # refuse an uninspectable binary now
        else:
            raise Desync("RowDescription out of order")
        return payload

    def _data_row(self, head: list[Any], payload: bytes) -> bytes:
        if head[0] == "E":
            if self._exec is None:
                self._start(head[2])
                portal = self._portals.get(head[1])
                if portal is None:
                    raise Desync("rows for a portal that was never bound")
                if portal.row_description is None:
                    raise MaskRefused("rows of a statement that was never described: the "
                                      "gateway cannot tell its columns apart (send Describe "
                                      "first)")
                self._exec = self._execution(portal.row_description, portal.formats, head[2])
        elif head[0] != "Q" or self._exec is None:
            raise Desync("DataRow out of order")
        ex = self._exec
        ex.findings = self._stmt.entities if self._stmt else ex.findings
        if ex._ctx is not None:  # noqa: SLF001 - same module
            ex._ctx.findings = ex.findings  # noqa: SLF001
        out = ex.data_row(payload)
        if self._stmt is not None:
            self._stmt.rows += 1
        return out

    def _function_result(self, payload: bytes) -> bytes:
        (ln,) = struct.unpack_from(">i", payload, 0)
        ctx = self._conn_ctx()
        if ln < 0 or ctx is None:
            return payload
        try:
            text = payload[4:4 + ln].decode("utf-8")
        except UnicodeDecodeError:
            raise MaskRefused("a function result that is not text cannot be masked") from None
        new = ctx.text(text).encode("utf-8")
        return struct.pack(">i", len(new)) + new

    def _async_message(self, t: bytes, payload: bytes) -> bytes:
        if t == b"S":
            return payload
        ex = ExecutionMasker(self.masker, self.session, self.rules)
        if self._stmt is not None:
            ex.findings = self._stmt.entities
            if ex._ctx is not None:  # noqa: SLF001 - same module
                ex._ctx.findings = ex.findings  # noqa: SLF001
        out = ex.notice(t, payload)
        if self._stmt is None:
            for entity, entry in ex.findings.items():
                count(self.findings, entity, entry["strategy"], entry["count"])
        return out

    def _error(self, payload: bytes) -> list[tuple[bytes, bytes]]:
        masked = self._async_message(b"N", payload)  # same fields as a notice
        if self._dropping:
            return []  # our refusal already answered this unit
        head = self._q[0] if self._q else None
        if head is not None and head[0] in ("Q", "E", "F"):
            token = head[2] if head[0] == "E" else head[1]
            if self._stmt is None:
                self._start(token)
            message = ""
            code = ""
            try:
                for c, v in parse_fields(masked):
                    if c == ord("M"):
                        message = v.decode("utf-8", "replace")
                    elif c == ord("C"):
                        code = v.decode("ascii", "replace")
            except Desync:
                pass
            assert self._stmt is not None
            self._stmt.error = f"{code}: {message}" if code else (message or "error")
            self._finish(b"", token)
        self._skip_to_sync()
        if head is None or head[0] not in ("Q", "F"):
            # extended protocol: the server now ignores every message up to the client's
            # Sync, including those the client has not sent yet; its ReadyForQuery ends it
            self._dropping = True
        return [(b"E", masked)]

    def _skip_to_sync(self) -> None:
        """After an error the server ignores everything up to the next Sync (extended) or
        ends the simple query: forget the answers that will not come."""
        self._exec = None
        self._copy = False
        while self._q and self._q[0][0] not in ("S", "Q", "F"):
            self._q.popleft()

    def _refuse(self, why: str) -> list[tuple[bytes, bytes]]:
        message = f"agentgate: result refused: {why}"
        head = self._q[0] if self._q else None
        if self._stmt is None and head is not None and head[0] in ("Q", "E"):
            self._start(head[2] if head[0] == "E" else head[1])
        if self._stmt is not None:
            self._stmt.error = f"0A000: {message}"
            self._stmt.refused = True
            self._finish(b"", self._stmt.token)
        self._skip_to_sync()
        self._dropping = True
        fields = [(ord("S"), b"ERROR"), (ord("V"), b"ERROR"), (ord("C"), b"0A000"),
                  (ord("M"), message.encode("utf-8"))]
        return [(b"E", build_fields(fields))]

    # ------------------------------------------------------------ statements
    def _start(self, token: Any) -> StatementResult:
        if self._stmt is not None:
            self._finish(b"", self._stmt.token)
        self._stmt = StatementResult(token)
        return self._stmt

    def _finish(self, tag_payload: bytes, token: Any) -> None:
        st = self._stmt if self._stmt is not None else StatementResult(token)
        self._stmt = None
        self._exec = None
        self._copy = False
        if tag_payload:
            st.tag = tag_payload.rstrip(b"\0").decode("utf-8", "replace")
            self._follow_sql_prepare(st.tag, token)
        for entity, entry in st.entities.items():
            count(self.findings, entity, entry["strategy"], entry["count"])
        self.results.append(st)
        if len(self.results) > MAX_QUEUED:
            raise Desync("the relay does not drain statement results")

    def _follow_sql_prepare(self, tag: str, token: Any) -> None:
        """SQL PREPARE / DEALLOCATE / DISCARD ALL change the server's statements behind the
        protocol: a name they touch loses what a Parse + Describe told this masker (a stale
        RowDescription would mask another statement's rows by the wrong columns)."""
        if not tag.startswith(("PREPARE", "DEALLOCATE", "DISCARD")):
            return
        stmt = getattr(token, "statement", None)
        name = getattr(stmt, "prepared", None) or getattr(stmt, "deallocates", None)
        if tag in ("DEALLOCATE ALL", "DISCARD ALL") or not name or name == "*":
            self._statements.clear()
        else:
            self._statements.pop(str(name).encode("utf-8"), None)

    def _end_unit(self, status: bytes) -> None:
        self._exec = None
        self._copy = False
        if self._stmt is not None:
            self._finish(b"", self._stmt.token)
        if status == b"I":  # outside a transaction block no portal survives
            self._portals.clear()


# ---------------------------------------------------------------- the hook
_MASKERS: dict[int, tuple[Any, Masker]] = {}


def masker_for(masking: Any) -> Masker | None:
    """The masker of a masking section (built once per section object, like the masking
    addon does); None when masking is switched off there."""
    if masking is not None and not getattr(masking, "enabled", True):
        return None
    key = id(masking)
    hit = _MASKERS.get(key)
    if hit is not None and hit[0] is masking:
        return hit[1]
    from addons.masking.detectors import DetectorSet
    key_bytes = masking.hmac_key() if masking is not None and hasattr(masking, "hmac_key") \
        else None
    m = Masker(DetectorSet(masking), key_bytes or _PROCESS_KEY)
    if len(_MASKERS) > 8:
        _MASKERS.clear()
    _MASKERS[key] = (masking, m)
    return m


_PROCESS_KEY = hmac_key_from_env(None)[0]


def column_rules(db: Any) -> ColumnRules:
    """The database's `mask_columns` as ColumnRules (mapping glob -> strategy, a list of
    {column, strategy} / (glob, strategy) / ColumnRule, or ColumnRules)."""
    raw = getattr(db, "mask_columns", None)
    if isinstance(raw, ColumnRules):
        return raw
    if not raw:
        return ColumnRules()
    items: list[ColumnRule] = []
    pairs = raw.items() if isinstance(raw, dict) else raw
    for item in pairs:
        if isinstance(item, ColumnRule):
            items.append(item)
        elif isinstance(item, dict):
            items.append(ColumnRule(str(item.get("column") or item.get("pattern")),
                                    str(item.get("strategy", "redact"))))
        else:
            glob, strategy = item
            items.append(ColumnRule(str(glob), str(strategy)))
    return ColumnRules(items)


_CATALOGS: dict[tuple[str, str], Catalog] = {}
_SESSIONS = SessionStore()  # placeholder maps when the relay does not share masking's


def make_result_masker(db: Any, masking: Any, identity: dict[str, Any] | None, *,
                       masker: Masker | None = None, sessions: SessionStore | None = None,
                       session: str | None = None) -> ResultMasker:
    """addons/database/hooks.py's factory: one ResultMasker per client connection.

    Detectors: the rules' masking section (same detectors and strategies as LLM traffic);
    `db.mask` false or `masking.enabled: false` switches them off (column rules still
    apply). Placeholders: pass the masking addon's `masker()` and `sessions` and the
    connection's `session` id, and a value gets the same placeholder as in the agent's LLM
    traffic of that identity + session (`[EMAIL_2]` for bob in both, never bob's and alice's
    `[EMAIL_1]` side by side, which `restore: true` would resolve to the wrong person; the
    hash strategy then uses the same key too). Without them the maps are this module's own
    (per identity + session when `session` is given, else per connection). Values from
    results are never restorable. The catalog is shared per database."""
    detect = getattr(db, "mask", True) is not False and \
        getattr(masking, "enabled", True) is not False
    m = (masker if masker is not None else masker_for(masking)) if detect else None
    store = sessions if sessions is not None else _SESSIONS
    placeholders = store.get(session_key(principal(identity), session)) if session else Session()
    name = str(getattr(db, "name", "") or "")
    database = str(getattr(db, "database", "") or "")
    cat = _CATALOGS.get((name, database))
    if cat is None:
        if len(_CATALOGS) > 1000:
            _CATALOGS.clear()
        cat = _CATALOGS[(name, database)] = Catalog()
    return ResultMasker(m, placeholders, column_rules(db), cat)
