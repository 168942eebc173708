"""The audit store: schema, record building, hash chain, verification, retention.

Pure logic (no mitmproxy import): the recorder addon hands over a plain snapshot of a
finished flow (`flow.get_state()` plus a few facts) and this module turns it into one row of
the `flows` table. The writer (addons/recording/writer.py, in the writer process) and the
CLI use the same functions, so what `agentgate audit verify` checks is exactly what was
written.

Tamper evidence: every row carries `prev_hash` (the `hash` of the row before it, by `seq`)
and `hash = sha256(prev_hash + "\\n" + canonical(row))`. The canonical form is a JSON object
of every column except `seq` and `hash` (blobs by their sha256, timestamps as epoch
microseconds), so editing any value breaks that row's hash, deleting a row breaks the link of
the next one, and reordering rows (swapping `seq`, or swapping contents) breaks the links
around them. Retention deletes only a prefix of the chain and first writes a checkpoint
(`chain_checkpoints`: the seq and hash of the last purged row), from which verification
starts. See docs/SCHEMA.md.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import datetime
import hashlib
import json
import marshal
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from addons.frame import credshape
from addons.frame.principal import principal

try:  # in install_requires; without it the json module writes the same bytes, slower
    import orjson as _orjson
except ImportError:  # pragma: no cover - a broken install
    _orjson = None

SCHEMA_VERSION = 3
GENESIS = "0" * 64
REDACTED = "[REDACTED]"
KILLED_MESSAGE = "Connection killed."

# Headers that carry a credential somewhere; their values never reach the store.
# (addons/egress/credentials.py strips the agent's; these also cover the gateway's injected ones,
# cookies both ways and refusals that happened before credentials ran.)
REDACT_HEADERS = frozenset({
    "authorization", "proxy-authorization", "x-api-key", "api-key", "cookie", "set-cookie",
    "x-goog-api-key", "x-auth-token", "x-access-token", "ocp-apim-subscription-key",
    "x-amz-security-token", "proxy-authenticate", "www-authenticate-token",
})
# Secrets shorter than this are not scrubbed by value (they would match ordinary text).
MIN_SECRET_LEN = 8

# (column, DuckDB type). Order is the table's column order and the INSERT order.
FLOW_COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "VARCHAR"),
    ("seq", "BIGINT"),
    ("session_id", "VARCHAR"),
    ("started", "TIMESTAMP"),
    ("ended", "TIMESTAMP"),
    ("identity_sub", "VARCHAR"),
    ("identity_iss", "VARCHAR"),
    ("identity_groups", "VARCHAR[]"),
    ("client", "VARCHAR"),
    ("method", "VARCHAR"),
    ("url", "VARCHAR"),
    ("host", "VARCHAR"),
    ("upstream", "VARCHAR"),
    ("upstream_url", "VARCHAR"),
    ("model", "VARCHAR"),
    ("status", "INTEGER"),
    ("outcome", "VARCHAR"),
    ("decision", "VARCHAR"),
    ("rule", "VARCHAR"),
    ("refusal_code", "VARCHAR"),
    ("refusal_step", "VARCHAR"),
    ("error", "VARCHAR"),
    ("approval_id", "VARCHAR"),
    ("approval", "JSON"),
    ("findings", "JSON"),
    ("findings_total", "INTEGER"),
    ("request_headers", "JSON"),
    ("request_body", "BLOB"),
    ("request_body_note", "VARCHAR"),
    ("request_size", "BIGINT"),
    ("response_headers", "JSON"),
    ("response_body", "BLOB"),
    ("response_body_note", "VARCHAR"),
    ("response_size", "BIGINT"),
    ("latency_ms", "DOUBLE"),
    ("is_replay", "VARCHAR"),
    ("metadata", "JSON"),
    ("flow_state", "BLOB"),
    ("prev_hash", "VARCHAR"),
    ("hash", "VARCHAR"),
)
COLUMN_NAMES = tuple(c for c, _ in FLOW_COLUMNS)
# Schema 2: a body larger than INLINE_MAX is stored content-addressed in `blobs` and the row
# holds its address here (its BLOB column is NULL). Added after `hash` (ALTER TABLE appends)
# and hashed only when set, so rows written before schema 2 keep verifying unchanged.
# Schema 3: the TLS certificate chains of a flow state (the same PEM chain on every flow to
# one upstream) are one leaf in `blobs`, and the row holds its address in `certs_ref`.
REF_COLUMNS: tuple[tuple[str, str], ...] = (
    ("request_body_ref", "VARCHAR"),
    ("response_body_ref", "VARCHAR"),
    ("certs_ref", "VARCHAR"),
)
REF_NAMES = tuple(c for c, _ in REF_COLUMNS)
ALL_COLUMNS = FLOW_COLUMNS + REF_COLUMNS
ALL_NAMES = COLUMN_NAMES + REF_NAMES
TIMESTAMP_COLUMNS = frozenset(c for c, t in FLOW_COLUMNS if t == "TIMESTAMP")
HASHED_COLUMNS = tuple(c for c in ALL_NAMES if c not in ("seq", "hash"))
OPTIONAL_HASHED = frozenset(REF_NAMES)
# Bodies up to this size stay inline in request_body/response_body: below it a blob's
# address and chain node cost about as much as the bytes they would save.
INLINE_MAX = 4096
# Top-level JSON arrays whose elements are stored one blob each: the conversation (OpenAI
# chat `messages`, Responses `input`, Gemini `contents`, Anthropic `system`) and tool lists.
SPLIT_KEYS = frozenset({"messages", "input", "contents", "system", "tools"})
NODE_TAG = b"agentgate-node\n"

# Stored with DuckDB's ZSTD instead of its own choice (FSST, dictionary): values that repeat
# most of their text from row to row (a flow state is ~2 KB of the same JSON keys, three
# UUIDs and a few timestamps; metadata and header blocks differ by a few fields), which
# FSST's 255-symbol table compresses per value ~2x and ZSTD across the values of a segment
# ~10x (multi-turn run: flow_state 786 -> 66 KB, metadata 180 -> 16 KB per 800 rows).
# Only where the file's storage format has ZSTD for strings (DuckDB storage v1.2.0, which
# writer.DB_CONFIG asks for when it creates a store): an older file would store such a
# column uncompressed, twice the default's size.
ZSTD_COLUMNS = frozenset({"flow_state", "metadata", "request_headers", "response_headers",
                          "request_body", "response_body", "approval", "findings",
                          "blobs.data"})
ZSTD_STORAGE = (1, 2, 0)


def schema_sql(zstd: bool) -> str:
    """The CREATE statements; `zstd`: the file's storage format has ZSTD (ZSTD_COLUMNS)."""
    def z(name: str) -> str:
        return " USING COMPRESSION zstd" if zstd and name in ZSTD_COLUMNS else ""

    return f"""
CREATE TABLE IF NOT EXISTS flows (
    {", ".join(f"{c} {t}{z(c)}" for c, t in ALL_COLUMNS)}
);
CREATE TABLE IF NOT EXISTS blobs (
    hash VARCHAR PRIMARY KEY, data BLOB{z("blobs.data")}, prev VARCHAR, part VARCHAR,
    size BIGINT
);
CREATE TABLE IF NOT EXISTS approvals (
    id VARCHAR, flow_id VARCHAR, requester VARCHAR, rule VARCHAR,
    requested_at TIMESTAMP, decided_at TIMESTAMP, decision VARCHAR,
    approvers VARCHAR[], reason VARCHAR, votes JSON
);
CREATE TABLE IF NOT EXISTS chain_checkpoints (
    seq BIGINT, hash VARCHAR, purged_rows BIGINT, cutoff TIMESTAMP, created TIMESTAMP
);
CREATE TABLE IF NOT EXISTS audit_meta (key VARCHAR PRIMARY KEY, value VARCHAR);
"""

# SQL built only from the constant column list above (no outside input).
# Columnar bulk insert: one list parameter per column, unnested in parallel. About 10x
# faster than executemany, which runs the statement once per row.
def _unnest(cols: tuple[tuple[str, str], ...]) -> str:
    return ", ".join(f"CAST(make_timestamp(unnest(?)) AS {t})" if c in TIMESTAMP_COLUMNS
                     else f"CAST(unnest(?) AS {t})" for c, t in cols)


# INSERT_FLOWS: the schema-1 columns, as before (the refs stay NULL); _ALL: every column.
INSERT_FLOWS = f"INSERT INTO flows ({', '.join(COLUMN_NAMES)}) SELECT {_unnest(FLOW_COLUMNS)}"  # noqa: S608,E501
INSERT_FLOWS_ALL = f"INSERT INTO flows ({', '.join(ALL_NAMES)}) SELECT {_unnest(ALL_COLUMNS)}"  # noqa: S608,E501


# The writer's inserts take a batch as ONE JSON text (blobs base64) that DuckDB parses in C++:
# binding Python lists costs DuckDB's Python layer ~5 us per value, all of it holding the
# GIL the event loop needs (a 1 KB flow has ~42 values: ~0.21 ms; as JSON ~0.03 ms).
def _json_insert(table: str, cols: tuple[tuple[str, str], ...], verb: str = "INSERT") -> str:
    as_json = {"BLOB": "VARCHAR", "JSON": "VARCHAR", "TIMESTAMP": "BIGINT"}
    shape = "[{" + ",".join(f'"{c}":"{as_json.get(t, t)}"' for c, t in cols) + "}]"

    def value(c: str, t: str) -> str:
        if t == "BLOB":
            return f"from_base64(r.{c})"
        if t == "JSON":
            return f"CAST(r.{c} AS JSON)"
        if t == "TIMESTAMP":
            return f"make_timestamp(r.{c})"
        return f"r.{c}"

    return (f"{verb} INTO {table} ({', '.join(c for c, _ in cols)}) SELECT "  # noqa: S608
            f"{', '.join(value(c, t) for c, t in cols)} "
            f"FROM (SELECT unnest(from_json(?, '{shape}')) AS r)")


BLOB_COLUMNS: tuple[tuple[str, str], ...] = (
    ("hash", "VARCHAR"), ("data", "BLOB"), ("prev", "VARCHAR"), ("part", "VARCHAR"),
    ("size", "BIGINT"))
INSERT_FLOWS_JSON = _json_insert("flows", ALL_COLUMNS)
# A blob already stored (same address, so same content) is skipped, not an error.
INSERT_BLOBS = _json_insert("blobs", BLOB_COLUMNS, "INSERT OR IGNORE")
INSERT_NEW_BLOBS = _json_insert("blobs", BLOB_COLUMNS)  # none stored yet (see append)
_BLOB_COLS = frozenset(c for c, t in ALL_COLUMNS if t == "BLOB")


def _b64(v: Any) -> Any:
    return base64.b64encode(bytes(v)).decode("ascii") if v is not None else None


def rows_doc(rows: list[dict[str, Any]], checked: bool = False) -> tuple[str, str]:
    """(the batch's JSON, exact: blobs as base64; the INSERT that takes it). `checked`:
    _canonical found every row's values orjson-safe (the batch's are the same values,
    blobs as base64 text, seq and hash added), so they are not looked at again.

    A row's NULL values are left out of its object and a column NULL in every row of
    the batch out of the INSERT (a 1 KB flow has ~15 of the 44: approval, refusal, error,
    notes, body references …). DuckDB's `from_json` reads an absent member as NULL and an
    INSERT leaves an unnamed column NULL (no column has a DEFAULT), so the stored rows are
    the same; each column in the statement costs its parse and cast per batch and per row
    (~12 % of the INSERT at 80 1 KB rows)."""
    doc = []
    present: set[str] = set()
    for r in rows:
        d = {c: v for c in ALL_NAMES if (v := r.get(c)) is not None}
        for c in _BLOB_COLS.intersection(d):
            d[c] = _b64(d[c])
        present.update(d)
        doc.append(d)
    if checked and _orjson is not None:
        try:
            text = _orjson.dumps(doc).decode()
        except TypeError:
            text = _batch_json(doc)
    else:
        text = _batch_json(doc)
    return text, flows_insert(frozenset(present))


_FLOWS_INSERTS: dict[frozenset[str], str] = {}
_FLOWS_INSERTS_MAX = 256  # column sets seen (a few in practice): bounded all the same


def flows_insert(present: frozenset[str]) -> str:
    """The JSON INSERT of flows naming only the columns in `present` (in schema order)."""
    sql = _FLOWS_INSERTS.get(present)
    if sql is None:
        if len(_FLOWS_INSERTS) >= _FLOWS_INSERTS_MAX:
            _FLOWS_INSERTS.clear()
        cols = tuple((c, t) for c, t in ALL_COLUMNS if c in present)
        sql = _FLOWS_INSERTS[present] = _json_insert("flows", cols)
    return sql


STAGE = "agentgate_batch"  # the writer connection's temporary table (BatchStatements)
_STAGE_COLUMNS = ("flows", "blobs")
STAGE_PUT = f"INSERT INTO temp.{STAGE} VALUES (?, ?)"  # noqa: S608 - constants only
STAGE_CLEAR = f"DELETE FROM temp.{STAGE}"  # noqa: S608 - constants only
_FROM_PARAM = "FROM (SELECT unnest(from_json(?, '"
_FROM_END = "')) AS r)"


def staged_sql(sql: str, column: str) -> str:
    """A JSON INSERT (_json_insert) reading its document from temp.STAGE's `column`
    instead of the statement's one parameter: the same SQL otherwise."""
    if sql.count(_FROM_PARAM) != 1 or not sql.endswith(_FROM_END) \
            or column not in _STAGE_COLUMNS:
        raise ValueError("not a JSON batch INSERT")
    source = f"FROM (SELECT unnest(from_json(s.{column}, '"
    return (sql.replace(_FROM_PARAM, source).removesuffix(_FROM_END)
            + f"')) AS r FROM temp.{STAGE} AS s)")  # noqa: S608 - constants only


class BatchStatements:
    """The batch INSERTs of the writer's connection, each bound once instead of per batch.

    DuckDB binds a statement every time Python's execute() runs it, and binding the JSON
    INSERTs is most of their cost at the batch sizes a gateway sees: ~3.5 ms of CPU for
    the flows INSERT (a 40-field from_json shape, a cast per column) and ~2 ms for the
    blobs INSERT, whatever the batch's size (a 1 KB flow's row costs ~0.05 ms to insert).
    A statement PREPAREd in SQL is bound once and EXECUTE runs it again without binding —
    but EXECUTE takes no parameter from Python, and a batch spelled into the SQL text would
    cost its parse per byte. So the batch's documents go into a one-row temporary table
    (this connection's, in memory: never in the store or its WAL) by a plain parameterised
    INSERT, the prepared statements read them there, and the row is deleted again, all in
    the batch's transaction. The INSERTs are the same SQL (staged_sql), reading the same
    text: the same rows are stored. The flows INSERT must report as many rows as the batch
    has (append checks it): a document left staged by anything else would add rows, and
    the transaction is rolled back instead."""

    MAX = 256  # prepared statements kept (column sets seen: a few in practice)
    # Staging copies the documents once more: past ~1.5 MB of JSON that copy costs more
    # than the binding saved (measured: 1 MB 7.9 vs 8.6 ms a batch, 4 MB 27.6 vs 23.0),
    # so larger batches (100 KB bodies) bind their INSERTs as before
    STAGE_MAX = 1536 * 1024  # characters of JSON (the batch's and its blobs')

    def __init__(self, con: Any) -> None:
        self.con = con
        self._names: dict[tuple[str, str], str] = {}
        self._made = 0
        self._staged = False

    def prepare(self, sql: str, column: str) -> str:
        """The name of `sql` prepared to read temp.STAGE's `column` (outside a
        transaction: a PREPARE or CREATE rolled back would be gone)."""
        if not self._staged:
            self.con.execute(f"CREATE OR REPLACE TEMP TABLE {STAGE} "
                             "(flows VARCHAR, blobs VARCHAR)")
            self._staged = True
        name = self._names.get((sql, column))
        if name is None:
            if len(self._names) >= self.MAX:
                for old in self._names.values():
                    self.con.execute(f"DEALLOCATE {old}")
                self._names.clear()
            self._made += 1
            name = f"agentgate_batch_{self._made}"
            self.con.execute(f"PREPARE {name} AS {staged_sql(sql, column)}")
            self._names[(sql, column)] = name
        return name

    @property
    def prepared(self) -> int:
        return len(self._names)


def blobs_json(blobs: Iterable[Blob]) -> str:
    return _batch_json([{"hash": h, "data": _b64(d), "prev": p, "part": q, "size": n}
                        for h, d, p, q, n in blobs])


def _batch_json(doc: list[dict[str, Any]]) -> str:
    """A batch as JSON for DuckDB to parse: orjson's text (~10x faster than the json
    module's) when it is the json module's byte for byte (_orjson_same), else the json
    module's (which refuses a float that is not finite: the batch fails and is split, as
    before)."""
    if _orjson is not None and all(_orjson_same(r.values()) for r in doc):
        try:
            return _orjson.dumps(doc).decode()
        except TypeError:
            pass
    return json.dumps(doc, allow_nan=False, separators=(",", ":"))


# Named columns: an audit DB made before `votes` existed gets the column added (init_schema)
INSERT_APPROVAL = ("INSERT INTO approvals (id, flow_id, requester, rule, requested_at, "
                   "decided_at, decision, approvers, reason, votes) VALUES (?, ?, ?, ?, "
                   "make_timestamp(?), make_timestamp(?), ?, ?, ?, ?)")
# Columns as verify reads them: timestamps as the integers they were hashed as.
# (SELECT_FOR_VERIFY: the schema-1 columns, as before; _ALL: with the body references)
SELECT_FOR_VERIFY = ", ".join(
    f"epoch_us({c}) AS {c}" if c in TIMESTAMP_COLUMNS else c for c in COLUMN_NAMES)
SELECT_FOR_VERIFY_ALL = ", ".join(
    f"epoch_us({c}) AS {c}" if c in TIMESTAMP_COLUMNS else c for c in ALL_NAMES)


# ---------------------------------------------------------------- small helpers
def cjson(value: Any) -> str:
    """Canonical JSON text: sorted keys, no spaces, non-ASCII kept as is."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=_json_default)


def _json_default(o: Any) -> Any:
    if isinstance(o, bytes | bytearray):
        try:
            return bytes(o).decode("utf-8")
        except UnicodeDecodeError:
            return {"$b64": base64.b64encode(bytes(o)).decode()}
    if isinstance(o, tuple | set | frozenset):
        return list(o)
    return str(o)


def micros(ts: float | int | None) -> int | None:
    return None if ts is None else int(round(float(ts) * 1_000_000))


def _s(v: Any) -> str:
    if isinstance(v, bytes | bytearray):
        return bytes(v).decode("utf-8", "replace")
    return "" if v is None else str(v)


def canonical(row: dict[str, Any]) -> bytes:
    """The hashed content of a row: every column but seq and hash, blobs by digest."""
    return _canonical(row)[0]


_HASHED_SORTED = tuple(sorted(HASHED_COLUMNS))  # (ASCII names: code point order)


def _canonical(row: dict[str, Any]) -> tuple[bytes, bool]:
    """(canonical(row), whether orjson wrote it: every value one it writes as the json
    module does — then so are the row's values in the batch JSON, see rows_doc)."""
    out = {c: row.get(c) for c in _HASHED_SORTED}  # in sorted order: no sort when written
    same = _orjson is not None
    for c, v in out.items():
        if type(v) in _PLAIN_TYPES:  # most values: nothing to change or check (one test)
            continue
        if isinstance(v, bytes | bytearray | memoryview):
            out[c] = "sha256:" + hashlib.sha256(v).hexdigest()
            continue
        if isinstance(v, tuple):
            v = out[c] = list(v)
        if same and not _orjson_same((v,)):
            same = False
    for c in OPTIONAL_HASHED:
        if out[c] is None:
            del out[c]  # not a column of schema 1: absent, so old rows hash as they did
    if same:
        try:
            return _orjson.dumps(out), True
        except TypeError:
            pass
    return json.dumps(out, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode(), False


# exact types orjson writes as the json module does, whatever their value (bool, int
# past 64 bits aside: orjson refuses those, TypeError, and the json module writes them)
_PLAIN_TYPES = frozenset({str, int, bool, type(None)})
_SCALARS = (str, int, type(None))  # bool is an int


def _orjson_same(values: Iterable[Any]) -> bool:
    """Whether orjson writes these values (a row's: text, integers, None, floats, lists of
    text) as the json module does, byte for byte (same escapes: tests/recording/
    test_canonical.py): not for a float it spells otherwise (1e-05, NaN, inf), a nested
    float or container. Integers past 64 bits and lone surrogates it refuses (TypeError)."""
    for v in values:
        if isinstance(v, _SCALARS):
            continue
        if type(v) is float:  # a subclass: orjson raises TypeError, json writes its value
            if repr(v) == _orjson.dumps(v).decode():
                continue
        elif isinstance(v, list) and all(isinstance(x, _SCALARS) for x in v):
            continue
        return False
    return True


def _canonical_text(out: dict[str, Any]) -> bytes:
    """json.dumps(out, sort_keys=True, separators=(",", ":"), ensure_ascii=False) as UTF-8:
    these exact bytes are hashed into the chain; orjson writes them ~5x faster where it
    writes the same (_orjson_same)."""
    return _canonical_written(out)[0]


def _canonical_written(out: dict[str, Any], ordered: bool = False) -> tuple[bytes, bool]:
    """(_canonical_text(out), whether orjson wrote it); `ordered`: out's keys are in
    sorted order already (orjson then need not sort them)."""
    if _orjson is not None and _orjson_same(out.values()):
        try:
            return _orjson.dumps(out, option=0 if ordered else _orjson.OPT_SORT_KEYS), True
        except TypeError:
            pass
    return json.dumps(out, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode(), False


_DIGITS = frozenset(b"0123456789")
_EXP_DIGITS = frozenset(b"123456789")


def _odd_float(raw: bytes) -> bool:
    """Whether orjson's text may hold a float it spells otherwise than the json module
    (float.__repr__): that is 1e-05 .. 9.99e-10 only, which orjson writes as "0.0000…" or
    with a one-digit exponent ("1e-7" for "1e-07"); NaN and infinities it writes as null
    (_gate rules those out). Looked for in orjson's own text, as a number token (after
    ":", ",", "[" or "-"; before ",", "]", "}" or the end: compact JSON) (tests/recording/
    test_exact_json.py: every float that differs is found, none that does not); text in a
    string that reads so only sends the value the json module's way (a UUID's "3e-7c" does
    not). C substring searches (a regular expression took ~12 us per flow state)."""
    end = len(raw)
    i = raw.find(b"0.0000")
    while i >= 0:
        if not i or raw[i - 1] in _BEFORE_NUMBER:
            return True
        i = raw.find(b"0.0000", i + 6)
    i = raw.find(b"e-")
    while i >= 0:
        if (i and raw[i - 1] in _DIGITS and i + 2 < end and raw[i + 2] in _EXP_DIGITS
                and (i + 3 == end or raw[i + 3] in _AFTER_NUMBER)):
            return True
        i = raw.find(b"e-", i + 2)
    return False


_BEFORE_NUMBER = frozenset(b":,[-")
_AFTER_NUMBER = frozenset(b",]}")
_REDACTED_RAW = REDACTED.encode()


def _gate(packed: bytes | None) -> bool:
    """Whether data that marshal wrote as `packed` (None: marshal refused it) may be
    serialised with orjson where the json module's exact text is wanted: marshal takes
    only the exact plain types (so no object orjson writes natively and the json module
    refuses: UUID, enum, datetime, dataclass, a subclass), and no NaN or infinity is in
    it: marshal writes a float as "g" and its 8 little-endian bytes, whose last two are
    [0xf0-0xff][0x7f or 0xff] for those (elsewhere such bytes only cost the fast path).
    Floats orjson spells otherwise are checked in its text (_odd_float)."""
    if packed is None or _orjson is None:
        return False
    # (C substring searches: a regular expression over the ~3 KB took ~10 us; a 0x7f is
    # often there, as the length of a 127-byte text)
    for top in (b"\x7f", b"\xff"):
        i = packed.find(top, 8)
        while i > 0:
            if packed[i - 1] >= 0xF0 and packed[i - 8] in _FLOAT_CODES:
                return False
            i = packed.find(top, i + 1)
    return True


_FLOAT_CODES = (0x67, 0xE7)  # marshal's "g" (a binary float), with and without FLAG_REF


def chain_hash(prev_hash: str, row: dict[str, Any]) -> str:
    return hashlib.sha256(prev_hash.encode() + b"\n" + canonical(row)).hexdigest()


# ---------------------------------------------------------------- redaction
class Scrubber:
    """Replace known secret values (the gateway's real credentials) wherever they occur."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        vals = {s for s in secrets if isinstance(s, str) and len(s) >= MIN_SECRET_LEN}
        # Longest first (then by value: the same order in every process, whatever the hash
        # seed); redact() replaces the union of every secret's occurrences anyway.
        self.text = sorted(vals, key=lambda v: (-len(v), v))
        self.raw = [s.encode() for s in self.text]
        # each secret as it reads inside JSON text (dump_state's replacements, the checks
        # on a serialised value), worked out once instead of per use; `escaped_raw` as
        # UTF-8 (surrogatepass: a secret holding a lone surrogate matches no UTF-8 text)
        self.escaped = [json.dumps(v, ensure_ascii=False)[1:-1] for v in self.text]
        self.escaped_raw = [v.encode("utf-8", "surrogatepass") for v in self.escaped]
        # The secrets that hold no other one: every secret holds one of them (or is one),
        # so where none of them is, no secret is — a value without secrets (nearly every
        # one) costs one search per such secret, not per secret ("Bearer sk-…" and
        # "sk-…": one search of a 100 KB body instead of two)
        self._min_text = [v for v in self.text if not any(o != v and o in v for o in self.text)]
        self._min_raw = [v.encode() for v in self._min_text]
        # A value shorter than the shortest secret holds none: most values a flow state
        # scrubs are a few bytes (a method, a scheme, a header value), and their length
        # answers without a search (~0.5 us each, ~11 a 1 KB flow)
        self._shortest = min((len(v) for v in self._min_text), default=0)
        self._shortest_raw = min((len(v) for v in self._min_raw), default=0)

    def __bool__(self) -> bool:
        return bool(self.text)

    def str(self, s: str) -> str:
        if len(s) < self._shortest or not any(v in s for v in self._min_text):
            return s
        return redact(s, self.text, REDACTED)

    def bytes(self, b: bytes) -> bytes:
        if len(b) < self._shortest_raw or not any(v in b for v in self._min_raw):
            return b
        return redact(b, self.raw, _REDACTED_RAW)

    def found_in(self, b: bytes) -> bool:
        return len(b) >= self._shortest_raw and any(v in b for v in self._min_raw)

    def walk(self, obj: Any) -> Any:
        if not self:
            return obj
        if isinstance(obj, str):
            return self.str(obj)
        if isinstance(obj, bytes):
            return self.bytes(obj)
        if isinstance(obj, dict):
            # keys too: a secret as a key of the flow's metadata went into the metadata
            # column whole (dump_state redacts the state's JSON text, keys and all)
            return {(self.str(k) if isinstance(k, str) else k): self.walk(v)
                    for k, v in obj.items()}
        if isinstance(obj, list):
            return [self.walk(v) for v in obj]
        if isinstance(obj, tuple):
            return tuple(self.walk(v) for v in obj)
        return obj


def redact[T: (str, bytes)](data: T, needles: Sequence[T], repl: T) -> T:
    """`data` with every character that is part of an occurrence of any needle replaced:
    overlapping occurrences (of one needle, or of two secrets sharing an edge: "…gh12" and
    "gh12…" in "…gh12…") become one `repl`. Replacing each needle in turn left the part of
    the second one that the first replacement did not cover (and which part depended on
    the order)."""
    spans: list[tuple[int, int]] = []
    for v in needles:
        i = data.find(v)
        while i >= 0:
            spans.append((i, i + len(v)))
            i = data.find(v, i + 1)
    if not spans:
        return data
    spans.sort()
    out: list[T] = []
    pos = 0
    start, end = spans[0]
    for a, b in spans[1:]:
        if a < end:  # overlaps the current run
            end = max(end, b)
            continue
        out += [data[pos:start], repl]
        pos, (start, end) = end, (a, b)
    out += [data[pos:start], repl, data[end:]]
    return data[:0].join(out)


_SCRUBBERS: dict[Any, Scrubber] = {}


def scrubber(secrets: Iterable[str]) -> Scrubber:
    """The Scrubber of these secrets, made once: every flow of a gateway carries the same
    few (its upstreams' credentials), and a Scrubber is never changed after it is made.
    Bounded: the cache starts again past 64 sets."""
    try:
        key = tuple(secrets)
        got = _SCRUBBERS.get(key)
    except TypeError:  # not hashable: made afresh
        return Scrubber(secrets)
    if got is None:
        if len(_SCRUBBERS) >= 64:
            _SCRUBBERS.clear()
        got = _SCRUBBERS[key] = Scrubber(key)
    return got


def redact_header_pairs(pairs: Sequence[Sequence[Any]], names: frozenset[str],
                        scrub: Scrubber) -> tuple[tuple[bytes, bytes], ...]:
    """Header pairs (bytes, bytes) with credential headers' values replaced."""
    out = []
    dirty = bool(scrub)
    if dirty and all(isinstance(v, bytes) for _, v in pairs):
        # one search of all the values (each is a part of the whole: a secret in one is in
        # it) instead of one per value; the separator can only add a match
        dirty = scrub.found_in(b"\0".join([v for _, v in pairs]))
    for k, v in pairs:
        kb = k if isinstance(k, bytes) else str(k).encode()
        vb = v if isinstance(v, bytes) else str(v).encode()
        if kb.decode("latin-1").lower() in names:
            vb = REDACTED.encode()
        elif dirty:
            vb = scrub.bytes(vb)
        out.append((kb, vb))
    return tuple(out)


def redact_query(url: str) -> str:
    """The URL (or path) with credential-like query values redacted: by key class (token,
    secret, key, signature, … — addons/frame/credshape.py) and JWT-shaped values."""
    return credshape.redact_url(url)


def _redact_path(path: Any) -> Any:
    if isinstance(path, bytes):
        if b"?" not in path and b"#" not in path:
            return path
        return redact_query(path.decode("utf-8", "surrogateescape")).encode(
            "utf-8", "surrogateescape")
    if isinstance(path, str):
        return redact_query(path)
    return path


def _header(pairs: Sequence[Sequence[bytes]], name: str) -> str | None:
    for k, v in pairs:
        if k.decode("latin-1").lower() == name:
            return v.decode("latin-1")
    return None


# ---------------------------------------------------------------- record building
@dataclass
class Pending:
    """What the addon hands over for one finished flow (plain data, built on the loop)."""

    state: dict[str, Any]
    session: str
    origin_url: str | None = None
    kind: str = "response"  # response | error | connect_error
    recorded_at: float = field(default_factory=time.time)
    secrets: tuple[str, ...] = ()
    redact: frozenset[str] = REDACT_HEADERS
    max_body: int = 256 * 1024
    size: int = 0  # about how many bytes the snapshot holds (bodies): bounds the backlog
    # (size, frame_plain) of the writer pipe's frame this snapshot was read from, when
    # that frame was small (writerproc): what _fits_state would otherwise work out
    frame: tuple[int, bool] | None = None


# Every leaf of a state as build_row caps it is at most this many times longer than in the
# snapshot, plus len(REDACTED): scrubbing turns a secret (MIN_SECRET_LEN bytes or more) into
# REDACTED (x1.25), a credential header's value becomes REDACTED, and a query's empty
# value `&k=` becomes `&k=[REDACTED]` (x4.3). Bodies are measured, not bounded so (a
# compressed one holding a secret is stored decoded), and so is a state with a backup.
LEAF_GROWTH = 16


def frame_plain(frame: bytes) -> bool:
    """_gate of a wire frame (marshal data): no NaN or infinity in the message it holds.
    What marshal.loads gives is exact plain types only, and build_row adds no float, so
    it stands for _gate of the state's serialisation (a body's bytes may only fail it)."""
    return _gate(frame)


@dataclass
class Direct:
    """A record that is not an HTTP flow (a SQL statement, addons/database/records.py), or
    a flow's row built ahead of its batch (writer.AuditWriter.prebuilt): `row` is its whole
    row (every column but seq, prev_hash and hash), built by the caller as plain data (it
    crosses to the writer process); it is chained and stored like every flow."""

    row: dict[str, Any]
    id: str
    session: str
    method: str | None = None
    url: str | None = None
    recorded_at: float = field(default_factory=time.time)
    size: int = 0  # about how many bytes the record holds: bounds the backlog


class BacklogBound:
    """When a writer must refuse new flows: shutting down, failing, or its backlog over the
    bound in records or bytes. One rule for the in-process writer (writer.AuditWriter) and
    the gateway's side of the writer process (remote.WriterProcess)."""

    _closed: bool
    _closing: bool
    failure: str | None
    max_pending: int
    pending_bytes: int
    max_pending_bytes: int
    backlog: int  # each writer counts what it still holds (a property there)

    def overloaded(self) -> str | None:
        """Why new flows must be refused right now, or None."""
        if self._closed or self._closing:
            return "the gateway is shutting down"
        if self.failure:
            return self.failure
        if self.backlog >= self.max_pending:
            return f"audit store backlog is full ({self.backlog} records waiting)"
        if self.pending_bytes >= self.max_pending_bytes:
            return f"audit store backlog is full ({self.pending_bytes} bytes waiting)"
        return None


Decoder = Callable[[bytes, str], bytes]


def _identity_decode(content: bytes, encoding: str) -> bytes:
    if encoding and encoding.lower() not in ("identity", "none"):
        raise ValueError("no decoder")
    return content


def _body(msg: dict[str, Any] | None, decode: Decoder, scrub: Scrubber, max_body: int,
          streamed: bool, safe: bool = False) -> tuple[bytes | None, str | None, int | None]:
    """(decoded body as stored, note, size on the wire). `safe`: msg comes from
    safe_state, which scrubbed a body that is not content-encoded already (scrubbing it
    again finds nothing: ~14 us per 120 KB body, twice a row)."""
    if msg is None:
        return None, None, None
    raw = msg.get("content")
    if raw is None:
        return None, "streamed; body not stored (enable store_streamed_bodies)" \
            if streamed else "no body", None
    size = len(raw)
    enc = (_header(msg.get("headers") or (), "content-encoding") or "").strip()
    note = None
    body = raw
    encoded = bool(enc) and enc.lower() != "identity"  # (safe_state's test, the same)
    if encoded:
        try:
            body = decode(raw, enc)
            note = f"decoded from {enc}"
        except Exception:  # noqa: BLE001 - keep the raw bytes, say so
            note = f"undecodable {enc}; raw bytes stored"
    if scrub and (encoded or not safe):
        body = scrub.bytes(body)
    if len(body) > max_body:
        note = (note + "; " if note else "") + truncation_note(body, max_body)
        body = body[:max_body]
    return body, note, size


def truncation_note(whole: bytes, kept: int) -> str:
    """How a value too large for the store is described: what was kept, the size and the
    sha256 of the whole (so a copy kept elsewhere can be matched to the record)."""
    return (f"truncated to the first {kept} of {len(whole)} bytes; sha256 of the whole: "
            f"{hashlib.sha256(whole).hexdigest()}")


def cap_value(v: Any, limit: int, path: str, notes: list[dict[str, Any]]) -> Any:
    """v with every bytes/str leaf longer than `limit` cut to its first `limit` bytes
    (characters for text); each cut is described in `notes` (path, size, sha256).

    Applied to the whole flow state, not to named fields: every copy of a body (request,
    response, `backup`, WebSocket messages, bytes an addon left in metadata) and any other
    oversized value (a huge header) is bounded the same way, so no single flow can make a
    row larger than the store can take. Containers with nothing to cut are returned as they
    are (shared, not copied: treat the result as read-only below the top level).
    """
    start = len(notes)
    out = _cap(v, limit, notes)
    for note in notes[start:]:  # paths are built only for the cuts (the walk is per flow)
        note["path"] = path + "".join(reversed(note.pop("_keys")))
    return out


def _cap(v: Any, limit: int, notes: list[dict[str, Any]]) -> Any:
    if isinstance(v, bytes | bytearray | memoryview):
        if len(v) <= limit:
            return v
        b = bytes(v)
        notes.append({"_keys": [], "size": len(b), "kept": limit,
                      "sha256": hashlib.sha256(b).hexdigest()})
        return b[:limit]
    if isinstance(v, str):
        if len(v) <= limit:
            return v
        whole = v.encode("utf-8", "surrogatepass")
        notes.append({"_keys": [], "size": len(whole), "kept": limit,
                      "sha256": hashlib.sha256(whole).hexdigest()})
        return v[:limit]
    if isinstance(v, dict):
        changed: dict[Any, Any] | None = None
        for k, x in v.items():
            n = len(notes)
            y = _cap(x, limit, notes)
            if y is not x:
                for note in notes[n:]:
                    note["_keys"].append(f".{k}")
                if changed is None:
                    changed = dict(v)
                changed[k] = y
        return v if changed is None else changed
    if isinstance(v, list | tuple):
        items: list[Any] | None = None
        for i, x in enumerate(v):
            n = len(notes)
            y = _cap(x, limit, notes)
            if y is not x:
                for note in notes[n:]:
                    note["_keys"].append(f"[{i}]")
                if items is None:
                    items = list(v)
                items[i] = y
        if items is None:
            return v
        return tuple(items) if isinstance(v, tuple) else items
    return v


def fits(v: Any, limit: int) -> bool:
    """True when no bytes/str leaf of v is longer than limit, so cap_value would return v
    as it is. marshal writes every leaf whole at least once (str as UTF-8: at least one byte
    per character), so a serialisation no longer than limit holds no longer leaf; it runs
    in C (~2 us for a 1 KB flow's state, a memcpy for large bodies) where cap_value's
    Python walk costs ~50 us per state. False when v is not plain data (cap_value walks)."""
    try:
        return len(marshal.dumps(v)) <= limit
    except ValueError:
        return False


def _fits_state(st: dict[str, Any], limit: int,
                frame: tuple[int, bool] | None = None) -> tuple[bool, bool]:
    """(fits(st, limit), _gate of st), without serialising the bodies: a body is one leaf,
    so it fits when its length does, and every other leaf is in the rest of the state (the
    whole state's marshal copied a late turn's ~120 KB body once more per row). The gate
    reads the same marshal data (bodies are bytes: no float, no other type in them).
    `frame`: Pending.frame. A snapshot read from a frame of n bytes has no leaf longer
    than n, so st none longer than LEAF_GROWTH * n + len(REDACTED); the frame's gate is
    the state's. Both answered without the rest's serialisation (~10 us of a 1 KB row's
    ~80); a larger frame is measured as above."""
    small = True
    for part in ("request", "response"):
        msg = st.get(part)
        if isinstance(msg, dict) and isinstance(msg.get("content"), bytes) \
                and len(msg["content"]) > limit:
            small = False
    # (not with a backup: safe_state may put a backup's body in decoded, of any size)
    if frame is not None and not st.get("backup") \
            and frame[0] * LEAF_GROWTH + len(REDACTED) <= limit:
        return small, frame[1]
    rest = dict(st)
    for part in ("request", "response"):
        msg = st.get(part)
        if isinstance(msg, dict) and isinstance(msg.get("content"), bytes):
            rest[part] = dict(msg, content=None)
    try:
        packed: bytes | None = marshal.dumps(rest)
    except ValueError:
        packed = None
    return small and packed is not None and len(packed) <= limit, _gate(packed)


def cap_state(st: dict[str, Any], limit: int) -> dict[str, Any]:
    """The flow state as stored: every oversized value truncated (see cap_value); the cuts
    are listed in the stored state's metadata under `agentgate_truncated`. The top level
    is a new dict (callers replace its parts)."""
    notes: list[dict[str, Any]] = []
    capped = cap_value(st, max(limit, 0), "", notes)
    if capped is st:
        capped = dict(st)
    if notes:
        meta = capped.get("metadata")
        capped["metadata"] = dict(meta) if isinstance(meta, dict) else {}
        capped["metadata"]["agentgate_truncated"] = notes
    return capped


def _model(req_body: bytes | None, resp_body: bytes | None,
           known: dict[str, Any] | None = None) -> str | None:
    """The `model` of the JSON request (else response) body. `known`: what split_body
    already read of the request body (then it is not parsed again)."""
    if known and "model" in known and req_body and req_body[:1] in (b"{", b" ", b"\n"):
        if isinstance(known["model"], str):
            return known["model"][:200]
        req_body = None  # read whole, no model: as json.loads would have found
    for body in (req_body, resp_body):
        if not body or len(body) > 4 * 1024 * 1024 or body[:1] not in (b"{", b" ", b"\n"):
            continue
        doc = _json_doc(body)
        if isinstance(doc, dict) and isinstance(doc.get("model"), str):
            return doc["model"][:200]
    return None


def _json_doc(body: bytes) -> Any:
    """json.loads(body), or None where it fails. orjson reads first (~3x faster on a 1 KB
    chat body): what it reads, it reads as the json module does (the same values, the last
    of duplicate keys); what it refuses (NaN, integers past 64 bits, lone surrogates, UTF-16
    or -32 text, nesting past 1,024) the json module reads. Nesting too deep for either is
    no model, not a failed record."""
    if _orjson is not None:
        try:
            return _orjson.loads(body)
        except ValueError:
            pass
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def _url(req: dict[str, Any]) -> str:
    scheme = _s(req.get("scheme")) or "http"
    host = _s(req.get("host"))
    port = int(req.get("port") or 0)
    default = (scheme == "https" and port == 443) or (scheme == "http" and port == 80)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    hostport = host if default or not port else f"{host}:{port}"
    path = _s(req.get("path"))
    if _s(req.get("method")).upper() == "CONNECT":
        return hostport
    return f"{scheme}://{hostport}{path}"


def safe_state(state: dict[str, Any], redact: frozenset[str], scrub: Scrubber,
               decode: Decoder, metadata: bool = True) -> dict[str, Any]:
    """A copy of a flow state with credential headers redacted and secret values scrubbed.

    A compressed body that holds a secret cannot be scrubbed in place; it is replaced by
    its scrubbed decoded form (and the content-encoding header dropped). `metadata`:
    False leaves the top-level metadata to the caller (build_row: _scrub_metadata).
    """
    st = dict(state)
    for part in ("request", "response"):
        msg = st.get(part)
        if not msg:
            continue
        msg = dict(msg)
        if part == "request":
            # tokens in the query (?id_token=, ?jwt=, ?sig=) never reach the store
            msg["path"] = _redact_path(msg.get("path"))
        msg["headers"] = redact_header_pairs(msg.get("headers") or (), redact, scrub)
        if msg.get("trailers"):
            msg["trailers"] = redact_header_pairs(msg["trailers"], redact, scrub)
        content = msg.get("content")
        if content and scrub:
            enc = (_header(msg["headers"], "content-encoding") or "").strip()
            if enc and enc.lower() != "identity":
                try:
                    plain = decode(content, enc)
                except Exception:  # noqa: BLE001 - undecodable: leave as is
                    plain = b""
                if scrub.found_in(plain):
                    msg["content"] = scrub.bytes(plain)
                    msg["headers"] = tuple(
                        (k, v) for k, v in msg["headers"]
                        if k.decode("latin-1").lower() not in ("content-encoding",
                                                               "content-length"))
            else:
                msg["content"] = scrub.bytes(content)
        st[part] = msg
    backup = st.get("backup")
    if isinstance(backup, dict):  # an earlier copy of the flow: redacted the same way
        st["backup"] = safe_state(backup, redact, scrub, decode)
    # The metadata feeds several columns: scrub it now. Everything else in the state (URL,
    # comment, connection facts) is scrubbed when it is serialised (dump_state).
    if metadata and st.get("metadata"):
        st["metadata"] = scrub.walk(st["metadata"])
    return st


def _scrub_metadata(meta: Any, scrub: Scrubber) -> tuple[Any, bytes | None]:
    """(the metadata as safe_state scrubs it, its orjson text when that shows no secret
    in it). A text value holding a secret holds its escaped form in the JSON text (orjson
    escapes each character as the json module does), so when the text holds none the walk
    would change nothing: a shallow copy stands for its copy (build_row changes only the
    top level), without the walk's ~9 us. The text is also the metadata's JSON (see
    build_row) unless it holds a float orjson spells otherwise."""
    if not meta:
        return meta, None
    text = None
    if _orjson is not None:
        try:
            text = _orjson.dumps(meta)
        except TypeError:  # bytes, a set, a key that is not text, …: the walk decides
            text = None
    if text is None or (scrub and any(v in text for v in scrub.escaped_raw)):
        return scrub.walk(meta), None
    return (dict(meta) if isinstance(meta, dict) else meta), text


def dump_state(st: dict[str, Any], scrub: Scrubber, checked: bool = False) -> bytes:
    """Serialise a flow state as JSON (bytes tagged), with secret values scrubbed.

    JSON rather than mitmproxy's tnetstring: the C encoder is several times faster, no
    mitmproxy import is needed, and auditors can read it (`flow_state::VARCHAR::JSON`).
    `load_state` gives back exactly what `flow.get_state()` returned (tuples as lists,
    as tnetstring does). `checked`: st passed _gate (the same bytes, written faster).
    """
    def default(o: Any) -> Any:
        if isinstance(o, bytes | bytearray | memoryview):
            b = bytes(o)
            if scrub:
                b = scrub.bytes(b)
            try:
                return {"$bytes": b.decode("utf-8")}
            except UnicodeDecodeError:
                return {"$b64": base64.b64encode(b).decode()}
        if isinstance(o, set | frozenset):
            return list(o)
        raise TypeError(f"not serialisable in a flow state: {type(o).__name__}")

    # Header lists are most of the bytes objects in a state; tagging them as one latin-1
    # list ({"$h": …}, lossless for any bytes) saves the per-object `default` callback.
    # Values are scrubbed as bytes first (a secret in latin-1 text may look different).
    st = dict(st)
    for part in ("request", "response"):
        msg = st.get(part)
        if msg:
            msg = dict(msg)
            for key in ("headers", "trailers"):
                pairs = msg.get(key)
                if pairs and isinstance(pairs, list | tuple) and all(
                        isinstance(k, bytes) and isinstance(v, bytes) for k, v in pairs):
                    msg[key] = {"$h": [[k.decode("latin-1"),
                                        (scrub.bytes(v) if scrub else v).decode("latin-1")]
                                       for k, v in pairs]}
            st[part] = msg
    if checked and _orjson is not None:
        # orjson writes what the json module would, byte for byte, for data _gate passed
        # (exact types only, no NaN or infinity) unless a float it spells otherwise is in
        # it (_odd_float) or it refuses a value (TypeError: the json module then decides)
        try:
            raw = _orjson.dumps(st, default=default)
        except TypeError:
            raw = None
        if raw is not None and not _odd_float(raw):
            return redact(raw, scrub.escaped_raw, _REDACTED_RAW) if scrub else raw
    text = json.dumps(st, default=default, separators=(",", ":"), ensure_ascii=False)
    if scrub:
        text = redact(text, scrub.escaped, REDACTED)
    return text.encode("utf-8", "surrogatepass")


def _state_hook(d: dict[str, Any]) -> Any:
    """The one-key objects dump_state writes for bytes, back as bytes. An object of the same
    key whose value has not that shape (a dict in the flow's metadata that merely looks like
    one) stays the dict it was: reading a stored state never fails on what a flow carried."""
    if len(d) == 1:
        try:
            if "$h" in d:
                return [[k.encode("latin-1"), v.encode("latin-1")] for k, v in d["$h"]]
            if "$bytes" in d:
                return d["$bytes"].encode("utf-8", "surrogatepass")
            if "$b64" in d:
                return base64.b64decode(d["$b64"], validate=True)
        except (TypeError, ValueError, AttributeError):
            return d  # (binascii.Error and UnicodeEncodeError are ValueErrors)
    return d


def load_state(blob: bytes) -> dict[str, Any]:
    """The flow state stored by dump_state (for export with mitmproxy's Flow.from_state)."""
    return json.loads(bytes(blob).decode("utf-8", "surrogatepass"), object_hook=_state_hook)


# ---------------------------------------------------------------- content-addressed bodies
# A body larger than INLINE_MAX is stored in `blobs`, once per distinct content:
#   leaf: hash = sha256(data), data = the bytes;
#   node: hash = sha256(NODE_TAG + prev + "\n" + part), data NULL: the content of `prev` (a
#         node, or "" when NULL) followed by the leaf `part`; `size` = bytes up to here.
# A chat body is cut at each element of its conversation arrays (SPLIT_KEYS), so it becomes
# a chain of nodes whose leaves are the JSON text between and of the messages, byte for byte.
# A node's address covers the whole prefix before it, so a turn that re-sends the history
# reuses every node of the previous turn and adds only nodes and leaves for its new
# messages: a conversation's storage grows with its new content, not with its length
# squared. The row's `*_ref` holds the root address and is hashed with the row; `verify`
# recomputes every blob's address from its content, so the chain covers the bodies.
_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def leaf_address(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def node_address(prev: str | None, part: str) -> str:
    return hashlib.sha256(NODE_TAG + (prev or "").encode() + b"\n" + part.encode()).hexdigest()


def split_body(body: bytes, facts: dict[str, Any] | None = None) -> list[bytes]:
    """The body cut before the first element of each of its top-level SPLIT_KEYS arrays
    and after every element (so each piece after the first holds the separator and the
    element: `, {…}`; pieces joined give the body back exactly); [body] when it is not
    such a JSON object.

    `facts`, when given, gets the top-level "model" (a string, else None) once the whole
    object was read, so the row need not parse the body a second time for it."""
    got = _split(body, facts, None)
    return [body] if got is None else [p for p in got.pieces if p is not None]


# A place in a body where cutting can resume: the end of an array element that closes with
# '}', ']' or '"' (the JSON decoder decides where such a value ends without looking past
# it), with the "model" read before it. The cut positions up to there and the parser's state
# depend only on the text before it, so a body with the same text up to there is cut the
# same way up to there.
_Resume = tuple[int, Any]


Blob = tuple[str, bytes | None, str | None, str | None, int]  # hash, data, prev, part, size


@dataclass
class _Cut:
    body: bytes
    pieces: list[bytes | None]  # None: a kept piece, body[ends[i-1]:ends[i]] (blob_tree)
    cuts: list[int]  # character offsets where the pieces but the last end
    ends: list[int]  # byte offsets where the pieces but the last end
    resumes: list[_Resume]
    kept: int = 0  # leading pieces cut as the earlier body's were (not parsed again)


@dataclass
class _Seen:
    """What SplitCache keeps of a body: no copy of its text or pieces, only the body
    itself (to compare the next one with), where it was cut and the pieces' addresses."""

    body: bytes
    cuts: list[int]
    ends: list[int]
    resumes: list[_Resume]
    addrs: list[tuple[str, str, int]]  # (leaf, node, size up to here) per piece


def _ws(s: str, i: int) -> int:
    m = _WS.match(s, i)
    return m.end() if m else i


def _split(body: bytes, facts: dict[str, Any] | None, prev: _Seen | None) -> _Cut | None:
    """split_body's work; None when the body is not a splittable object. `prev`: the cut
    of an earlier body; when this body starts with the same text as `prev` up to one of
    its resume points, that prefix is not parsed again (same result, see _Resume)."""
    if body[:1] not in (b"{", b" ", b"\n", b"\r", b"\t"):
        return None
    try:
        s = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    start: _Resume | None = None
    kept = 0  # pieces (and cuts) of prev reused: those up to the resume point
    if prev is not None:
        # the furthest resume point up to which body is prev's bytes (so its text: the
        # bytes before a resume point are whole UTF-8 characters): "the same up to there"
        # holds for every point before one where it holds, so a binary search
        # (cuts ascend: bisect finds a point's piece; the prefix is compared in place).
        # A conversation's next turn usually holds all of prev: its last point first.
        whole = memoryview(prev.body)

        def holds(k: int) -> bool:
            end = prev.ends[bisect.bisect_left(prev.cuts, prev.resumes[k][0])]
            return len(body) > end and body.startswith(whole[:end])

        lo, hi = 0, len(prev.resumes)
        if hi and holds(hi - 1):
            lo = hi
        else:
            hi = max(hi - 1, 0)
        while lo < hi:
            mid = (lo + hi) // 2
            if holds(mid):
                lo = mid + 1
            else:
                hi = mid
        if lo:
            start = prev.resumes[lo - 1]
            kept = bisect.bisect_left(prev.cuts, start[0]) + 1
    got = _cuts(s, start)
    if got is None:
        return None
    new_cuts, model, i, resumes = got
    if facts is not None and _ws(s, i + 1) == len(s):  # the whole body is this one object
        facts["model"] = model if isinstance(model, str) else None
    if start is None:
        cuts, pieces, ends, last, at = new_cuts, [], [], 0, 0
    else:
        assert prev is not None
        cuts = prev.cuts[:kept] + new_cuts
        ends = prev.ends[:kept]
        # the kept pieces are not copied out of the body: blob_tree takes the few whose
        # blobs the store may not hold (most of a late turn's history is held)
        pieces = [None] * kept
        resumes = [r for r in prev.resumes if r[0] <= start[0]] + resumes
        last, at = start[0], ends[-1]
    if not cuts:
        return None
    for c in [*new_cuts, len(s)]:
        if c > last:
            piece = s[last:c].encode("utf-8")
            pieces.append(piece)
            at += len(piece)
            ends.append(at)
            last = c
    ends.pop()  # the last piece ends with the body
    # the kept pieces are slices of body itself, end to end from its start: only what
    # follows them is compared (a late turn's body is mostly history)
    done = ends[kept - 1] if kept else 0
    if len(pieces) != len(cuts) + 1 or b"".join(pieces[kept:]) != body[done:]:
        return None
    return _Cut(body, pieces, cuts, ends, resumes, kept)


def _cuts(s: str, start: _Resume | None) -> tuple[list[int], Any, int, list[_Resume]] | None:
    """Cut offsets (before the first element of each top-level SPLIT_KEYS array and after
    every element), the top-level "model", where the object ends and the resume points;
    from `start` (inside an array, just after an element) or from the beginning."""
    cuts: list[int] = []
    resumes: list[_Resume] = []
    model: Any = None
    try:
        if start is None:
            i = _ws(s, 0)
            if s[i] != "{":
                return None
            i = _ws(s, i + 1)
            if s[i] == "}":
                return None
            in_array = after = False
        else:
            i, model = start
            in_array = after = True
        while True:
            if not in_array:
                if s[i] != '"':
                    return None
                key, i = json.decoder.scanstring(s, i + 1)
                i = _ws(s, i)
                if s[i] != ":":
                    return None
                i = _ws(s, i + 1)
                if key in SPLIT_KEYS and s[i] == "[":
                    i = _ws(s, i + 1)
                    if s[i] != "]":
                        # cut before the first element and after each one, so a piece is
                        # one element with the separator before it: a turn adds one node
                        # per new message (not one more for each "," between messages)
                        cuts.append(i)
                        in_array = True
                    else:
                        i += 1
                else:
                    value, i = _DECODER.raw_decode(s, i)
                    if key == "model":
                        model = value
            if in_array:
                while True:
                    if not after:
                        _, end = _DECODER.raw_decode(s, i)
                        cuts.append(end)
                        if s[end - 1] in '}]"':
                            resumes.append((end, model))
                        i = end
                    after = False
                    i = _ws(s, i)
                    if s[i] == ",":
                        i = _ws(s, i + 1)
                        continue
                    if s[i] == "]":
                        break
                    return None
                i += 1
                in_array = False
            i = _ws(s, i)
            if s[i] == ",":
                i = _ws(s, i + 1)
                continue
            if s[i] == "}":
                break
            return None
    except (ValueError, IndexError, RecursionError):
        # (RecursionError: a value nested deeper than the json module reads — an agent's
        # body must not turn its own record into a minimal one: it is stored unsplit)
        return None
    return cuts, model, i, resumes


class SplitCache:
    """The last cut body of each recent key (a session's request bodies): the next turn of
    a conversation re-sends the history and adds to its end, so only what follows the
    shared text is parsed and hashed — the writer's work per turn tracks the new content,
    not the length of the conversation. Bounded in entries and bytes (it holds each body
    once, plus ~200 bytes of addresses per piece), least recently used out first. A hit
    needs the very same bytes up to the resume point (compared whole), so nothing of one
    body can enter another's row; keyed by identity and session all the same."""

    def __init__(self, entries: int = 256, max_bytes: int = 8 * 1024 * 1024) -> None:
        self.entries = entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self.cuts = 0  # bodies cut with the cache at hand
        self.resumed = 0  # of those, cut only past an earlier body's text
        self._items: OrderedDict[Any, tuple[_Seen, int]] = OrderedDict()

    def get(self, key: Any) -> _Seen | None:
        got = self._items.get(key)
        if got is None:
            return None
        self._items.move_to_end(key)
        return got[0]

    def put(self, key: Any, cut: _Seen) -> None:
        size = len(cut.body) + 200 * len(cut.addrs)
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        if size > self.max_bytes:
            return
        self._items[key] = (cut, size)
        self.bytes += size
        while len(self._items) > self.entries or self.bytes > self.max_bytes:
            _, (_, n) = self._items.popitem(last=False)
            self.bytes -= n

    def __len__(self) -> int:
        return len(self._items)


def blob_tree(body: bytes, out: dict[str, Blob], facts: dict[str, Any] | None = None,
              cache: SplitCache | None = None, key: Any = None,
              known: Container[str] | None = None) -> str:
    """Add the blobs of body to out; returns its root address (a leaf or the last node).
    `cache`/`key`: where the cut of this key's previous body is kept (see SplitCache); the
    blobs and the address are the same with it or without it. `known`: addresses the
    store holds (committed): a piece reused from the cached body whose leaf and node are
    both held is left out of `out` (the writer would drop them there anyway)."""
    prev = cache.get(key) if cache is not None else None
    cut = _split(body, facts, prev)
    if cut is None:
        addr = leaf_address(body)
        out.setdefault(addr, (addr, body, None, None, len(body)))
        return addr
    addrs = prev.addrs[:cut.kept] if prev is not None and cut.kept else []
    node: str | None = None
    size = 0
    for i, piece in enumerate(cut.pieces):
        if i < len(addrs):  # the same bytes as the earlier body's piece: the same address
            leaf, addr, size = addrs[i]
            if known is not None and leaf in known and addr in known:
                node = addr
                continue
            if piece is None:
                piece = body[cut.ends[i - 1] if i else 0:cut.ends[i]]
        else:
            leaf = leaf_address(piece)
            size += len(piece)
            addr = node_address(node, leaf)
            addrs.append((leaf, addr, size))
        # every blob of the body, reused or not: one the store has not committed (an
        # earlier row reduced or still queued) must go with this row
        out.setdefault(leaf, (leaf, piece, None, None, len(piece)))
        out.setdefault(addr, (addr, None, node, leaf, size))
        node = addr
    if cache is not None:
        cache.cuts += 1
        cache.resumed += cut.kept > 0
        cache.put(key, _Seen(body, cut.cuts, cut.ends, cut.resumes, addrs))
    assert node is not None
    return node


class BlobMissing(LookupError):
    """A referenced blob is not in the store (deleted, or the store was edited)."""


# The chain of a root, newest node first, with the data of each node's leaf (or the root
# leaf's own data). Depth-bounded: an edited store could hold a cycle.
_CHAIN_SQL = """
WITH RECURSIVE chain(h, depth) AS (
    SELECT CAST(? AS VARCHAR), 0
    UNION ALL
    SELECT b.prev, c.depth + 1 FROM chain c JOIN blobs b ON b.hash = c.h
    WHERE b.prev IS NOT NULL AND c.depth < 1000000
)
SELECT c.depth, c.h, b.hash IS NOT NULL, b.data, b.part, p.hash IS NOT NULL, p.data
FROM chain c LEFT JOIN blobs b ON b.hash = c.h LEFT JOIN blobs p ON p.hash = b.part
ORDER BY c.depth DESC
"""


def read_blob(con: Any, addr: str) -> bytes:
    """The content at addr, reassembled; raises BlobMissing if any part is not stored."""
    parts: list[bytes] = []
    for _depth, h, found, data, part, part_found, part_data in con.execute(
            _CHAIN_SQL, [addr]).fetchall():
        if not found:
            raise BlobMissing(f"blob {h} is not in the store")
        if data is not None:  # a leaf: the whole content (only ever the root)
            parts.append(bytes(data))
            continue
        if not part_found or part_data is None:
            raise BlobMissing(f"blob {part} (a part of {h}) is not in the store")
        parts.append(bytes(part_data))
    return b"".join(parts)


class BlobCache:
    """Addresses known to be stored (committed): their data is not sent to DuckDB again.

    Bounded: two generations of at most size/2 addresses each; an address found in the
    older one moves to the newer, and when the newer is full the older is dropped — an
    address in use stays, as with least-recently-used order, for a dict lookup per
    address instead of an OrderedDict move per hit (a late turn re-sends ~160). A
    forgotten address that is stored costs one batch written twice (append: the plain
    INSERT fails, then INSERT OR IGNORE; `unsure` batches after it are written with OR
    IGNORE at once). Cleared after retention, which may delete blobs no record refers to
    any more.
    """

    UNSURE_BATCHES = 64  # after a conflict: while the cache may lag the store

    def __init__(self, size: int = 50_000) -> None:
        self._half = max(size // 2, 1)
        self._new: dict[str, None] = {}
        self._old: dict[str, None] = {}
        self.unsure = 0  # batches left to write with INSERT OR IGNORE (see append)

    def __contains__(self, addr: str) -> bool:
        if addr in self._new:
            return True
        if addr in self._old:
            self._put(addr)
            return True
        return False

    def __len__(self) -> int:
        return len(self._new) + len(self._old)

    def _put(self, addr: str) -> None:
        self._new[addr] = None
        if len(self._new) >= self._half:
            self._old, self._new = self._new, {}

    def add(self, addrs: Iterable[str]) -> None:
        for a in addrs:
            self._put(a)

    def clear(self) -> None:
        self._new.clear()
        self._old.clear()


def _headers_json(pairs: Sequence[Sequence[bytes]] | None) -> str | None:
    if pairs is None:
        return None
    text = [[k.decode("latin-1"), v.decode("utf-8", "replace")] for k, v in pairs]
    # text only, and none with a lone surrogate (neither decoding makes one): orjson
    # escapes every character as the json module does, so this is cjson's text
    return _exact_json(text) or cjson(text)


def _exact_json(value: Any, sort: bool = False) -> str | None:
    """cjson(value) (sort=True) or its text without sorted keys, written by orjson, or None
    where orjson's text might differ: a float it spells otherwise, or a value it refuses
    (bytes, a set, a key that is not text, an integer past 64 bits, a lone surrogate).
    Only for data _gate passed or plain text and integers (no NaN: orjson writes null)."""
    if _orjson is None:
        return None
    try:
        raw = _orjson.dumps(value, option=_orjson.OPT_SORT_KEYS if sort else 0)
    except TypeError:
        return None
    return None if _odd_float(raw) else raw.decode()


def build_row(p: Pending, decode: Decoder = _identity_decode,
              splits: SplitCache | None = None,
              known: Container[str] | None = None) -> dict[str, Any]:
    """One `flows` row (without seq, prev_hash, hash) from a pending flow snapshot.
    `splits`: the cuts of recent bodies per session (the same row, built faster);
    `known`: blob addresses the store holds (what the row's `_blobs` may leave out)."""
    scrub = scrubber(p.secrets)
    st = safe_state(p.state, p.redact, scrub, decode, metadata=False)
    meta_text = None  # orjson's text of the metadata (see _scrub_metadata)
    if st.get("metadata"):
        st["metadata"], meta_text = _scrub_metadata(st["metadata"], scrub)
    req = st.get("request") or {}
    resp = st.get("response")
    err = st.get("error")
    meta = st.get("metadata") or {}
    if isinstance(meta, dict) and "masked_response" in meta:
        meta_text = None  # the text of what it was
    masked = meta.pop("masked_response", None) if isinstance(meta, dict) else None
    if isinstance(masked, bytes) and resp:
        # Upstream with `restore: true`: the agent got the originals back, but the store
        # keeps the answer as the model sent it, masked (raw PII never lands here).
        resp = st["response"] = dict(resp)
        resp["content"] = scrub.bytes(masked) if scrub else masked
        resp["headers"] = tuple((k, v) for k, v in resp["headers"]
                                if k.decode("latin-1").lower() not in ("content-encoding",
                                                                       "content-length"))

    ident = meta.get("identity") if isinstance(meta.get("identity"), dict) else {}
    decision = meta.get("decision") if isinstance(meta.get("decision"), dict) else {}
    refusal = meta.get("refusal") if isinstance(meta.get("refusal"), dict) else {}
    approval = meta.get("approval") if isinstance(meta.get("approval"), dict) else None
    upstream = meta.get("upstream") if isinstance(meta.get("upstream"), dict) else {}
    findings_raw = meta.get("findings") if isinstance(meta.get("findings"), dict) else {}
    findings: dict[str, int] = {}
    for k, v in findings_raw.items():
        n = v.get("count", 0) if isinstance(v, dict) else v
        try:
            findings[str(k)] = int(n)
        except (TypeError, ValueError):
            findings[str(k)] = 0

    streamed = bool(meta.get("recorder", {}).get("streamed")) \
        if isinstance(meta.get("recorder"), dict) else False
    req_body, req_note, req_size = _body(req, decode, scrub, p.max_body, streamed, True)
    resp_body, resp_note, resp_size = _body(resp, decode, scrub, p.max_body, streamed, True)
    if isinstance(masked, bytes) and resp:
        resp_note = "masked, as the upstream answered (the agent got restored values)"

    started = req.get("timestamp_start") or st.get("timestamp_created") or p.recorded_at
    if resp and resp.get("timestamp_end"):
        ended = resp["timestamp_end"]
    elif err and err.get("timestamp"):
        ended = err["timestamp"]
    else:
        ended = p.recorded_at

    if err and not resp:
        outcome = "killed" if err.get("msg") == KILLED_MESSAGE else "error"
    elif p.kind == "connect_error" or refusal:
        outcome = "refused"
    elif st.get("is_replay") == "response":
        outcome = "replayed"
    else:
        outcome = "forwarded"

    peer = (st.get("client_conn") or {}).get("peername")
    client = f"{peer[0]}:{peer[1]}" if peer else None
    forwarded = _url(req) if req else None
    url = scrub.str(p.origin_url) if p.origin_url else forwarded
    groups = ident.get("groups") if isinstance(ident.get("groups"), list | tuple) else []

    limit = max(p.max_body, 0)
    # small: nothing to cut (the usual case): skip the walks; gate: its JSON may be
    # written by orjson (the json module's bytes, ~5-10x faster: _gate)
    small, gate = _fits_state(st, limit, p.frame)
    meta_json = None
    capped_meta: Any = None
    if meta:
        cuts: list[dict[str, Any]] = []
        capped_meta = meta if small else cap_value(meta, limit, "metadata", cuts)
        if cuts:
            capped_meta["agentgate_truncated"] = cuts
        if gate and capped_meta is meta:
            meta_json = _exact_json(meta, sort=True)
        if meta_json is None:
            meta_json = cjson(capped_meta)
    capped = dict(st) if small else cap_state(st, limit)
    blobs: dict[str, Blob] = {}
    refs: dict[str, str | None] = {"request": None, "response": None}
    facts: dict[str, Any] = {}
    for part, body in (("request", req_body), ("response", resp_body)):
        msg = capped.get(part)
        if body is None:
            continue
        if isinstance(msg, dict) and msg.get("content") == body:
            # the state's copy is the body column's: stored once (export puts it back)
            capped[part] = dict(msg, content={"$body": part})
        if len(body) > INLINE_MAX:
            refs[part] = blob_tree(body, blobs, facts if part == "request" else None,
                                   splits, (principal(ident), p.session, part), known)
    hdr_cols = {"request": _headers_json(req.get("headers")) if req else None,
                "response": _headers_json(resp.get("headers")) if resp else None}
    for part, col in hdr_cols.items():
        msg = capped.get(part)
        src = (req if part == "request" else resp or {}).get("headers")
        if col is not None and isinstance(msg, dict) and _same_headers(msg.get("headers"),
                                                                        col, src):
            # the same header block as the record's `*_headers` column (every turn of an
            # agent's conversation sends the same few): stored once, put back on read
            capped[part] = dict(msg, headers=dict(HEADERS_MARK))
    refs["certs"] = _certs_blob(capped, scrub, blobs, gate)
    if meta_json is not None and _same_metadata(capped.get("metadata"), meta_json, scrub,
                                                capped_meta, meta_text if gate else None):
        # the state's metadata is the `metadata` column's (identity, decision, findings,
        # upstream: ~0.8 KB on every row of a conversation): stored once, put back on read
        capped["metadata"] = dict(METADATA_MARK)
    state_blob = dump_state(capped, scrub, gate)
    row: dict[str, Any] = {
        "id": _s(st.get("id")),
        "session_id": p.session,
        "started": micros(started),
        "ended": micros(ended),
        "identity_sub": ident.get("sub"),
        "identity_iss": ident.get("iss"),
        "identity_groups": [str(g) for g in groups],
        "client": client,
        "method": _s(req.get("method")) or None,
        "url": url,
        "host": _host_of(url) if url else None,
        "upstream": upstream.get("name"),
        "upstream_url": forwarded if forwarded != url else None,
        "model": _model(req_body, resp_body, facts),
        "status": int(resp["status_code"]) if resp else None,
        "outcome": outcome,
        "decision": decision.get("action"),
        "rule": decision.get("rule") or refusal.get("rule") or None,
        "refusal_code": refusal.get("code"),
        "refusal_step": refusal.get("step"),
        "error": _s(err.get("msg")) if err else None,
        "approval_id": approval.get("id") if approval else None,
        "approval": cjson(approval) if approval else None,
        "findings": _exact_json(findings, sort=True) or cjson(findings),
        "findings_total": sum(findings.values()),
        "request_headers": hdr_cols["request"],
        "request_body": None if refs["request"] else req_body,
        "request_body_note": req_note,
        "request_size": req_size,
        "response_headers": hdr_cols["response"],
        "response_body": None if refs["response"] else resp_body,
        "response_body_note": resp_note,
        "response_size": resp_size,
        "latency_ms": round((float(ended) - float(started)) * 1000.0, 3),
        "is_replay": st.get("is_replay"),
        "metadata": meta_json,
        "flow_state": state_blob,
        "request_body_ref": refs["request"],
        "response_body_ref": refs["response"],
        "certs_ref": refs["certs"],
    }
    if blobs:
        row["_blobs"] = list(blobs.values())  # inserted with the row (append)
    return row


METADATA_MARK = {"$metadata": "column"}
CERTS_MARK = {"$certs": "certs_ref"}
CERTS_MIN = 256  # a chain shorter than this stays in the state (an address costs ~100 bytes)


# (the chains' JSON and leaf address by (secrets, chains): _certs_blob; bounded, started
# again when full)
_CERT_BLOBS: dict[Any, tuple[bytes, str]] = {}
_CERT_BLOBS_MAX = 256


def _certs_blob(capped: dict[str, Any], scrub: Scrubber, blobs: dict[str, Blob],
                checked: bool = False) -> str | None:
    """Move the connections' certificate chains out of the state into one leaf blob
    (`{"client_conn": [...], "server_conn": [...]}` as dump_state writes it); the state's
    lists become CERTS_MARK. Returns the leaf's address, or None (nothing worth moving)."""
    chains: dict[str, Any] = {}
    for conn in ("client_conn", "server_conn"):
        c = capped.get(conn)
        if isinstance(c, dict) and isinstance(c.get("certificate_list"), list | tuple) \
                and c["certificate_list"]:
            chains[conn] = c["certificate_list"]
    if not chains:
        return None
    # A connection's chain is the same on each of its flows (and one upstream's on every
    # connection to it): its serialised form and address are made once (~10 us a row)
    try:
        key: Any = (tuple(scrub.text), tuple((c, tuple(v)) for c, v in chains.items()))
        got = _CERT_BLOBS.get(key)
    except TypeError:  # an item that is not hashable: made afresh
        key, got = None, None
    if got is None:
        data = dump_state(chains, scrub, checked)  # (part of the state `checked` is about)
        got = (data, leaf_address(data))
        if key is not None:
            if len(_CERT_BLOBS) >= _CERT_BLOBS_MAX:
                _CERT_BLOBS.clear()
            _CERT_BLOBS[key] = got
    data, addr = got
    if len(data) < CERTS_MIN:
        return None
    blobs.setdefault(addr, (addr, data, None, None, len(data)))
    for conn in chains:
        capped[conn] = dict(capped[conn], certificate_list=dict(CERTS_MARK))
    return addr
HEADERS_MARK = {"$headers": "column"}
_PLAIN = frozenset(range(0x20, 0x7F)) - {ord('"'), ord("\\")}
_PLAIN_BYTES = bytes(sorted(_PLAIN))  # x.translate(None, _PLAIN_BYTES) == b"": x is plain


def _same_headers(pairs: Any, col: str, source: Any = None) -> bool:
    """Whether the state's header pairs are exactly the `*_headers` column's: only for
    printable ASCII without quote or backslash (the column decodes values as UTF-8, the
    state as Latin-1, and the state's secret scrubbing also works on its JSON text).
    `source`: the pairs the column was made from; the same object, all plain ASCII, reads
    back equal by construction (both decodings of plain ASCII are the ASCII text, and its
    canonical JSON round-trips), so the column is not parsed again."""
    if not pairs or not isinstance(pairs, list | tuple):
        return False
    for pair in pairs:
        if (not isinstance(pair, list | tuple) or len(pair) != 2
                or not isinstance(pair[0], bytes) or not isinstance(pair[1], bytes)):
            return False
    # every name and value plain: one translate of them all (a byte outside the set is
    # left over whichever of them it is in)
    if b"".join([x for pair in pairs for x in pair]).translate(None, _PLAIN_BYTES):
        return False
    if pairs is source:
        return True
    text = [[pair[0].decode("ascii"), pair[1].decode("ascii")] for pair in pairs]
    return bool(json.loads(col) == text)


def _same_metadata(state_meta: Any, meta_json: str, scrub: Scrubber,
                   source: Any = None, text: bytes | None = None) -> bool:
    """Whether the state's metadata, stored and read back, is exactly what reading the
    `metadata` column gives (so the state can say `{"$metadata": "column"}` instead):
    not when the state's copy holds bytes, or cuts of other parts of the state.
    `source`: the dict meta_json was made from (cjson); `text`: orjson's text of
    state_meta, for data _gate passed (_scrub_metadata)."""
    if not isinstance(state_meta, dict) or not state_meta:
        return False
    if source is state_meta:
        # The usual case, without serialising and parsing it twice more: the column was
        # made from this very dict. Its JSON text (the json module's: orjson's where that
        # is the same) holds each of its members once, as the column's text does in
        # another order, so both read back as equal values when that text holds no
        # one-key object _state_hook turns into something else (or fails on), and no
        # secret's text (dump_state would change it there; NaN and infinities are left
        # to the reference comparison too, though its parser reads them back equal) — and
        # dump_state writes it so when the json module could (no bytes, no sets: its
        # `default` is never called).
        whole = None
        if text is not None and not _odd_float(text):
            whole = b'{"m":' + text + b"}"
        else:
            with contextlib.suppress(TypeError, ValueError):
                whole = json.dumps({"m": state_meta}, separators=(",", ":"),
                                   ensure_ascii=False).encode("utf-8", "surrogatepass")
        if whole is not None and not any(v in whole for v in scrub.escaped_raw) \
                and _plain_json(whole):
            return True
    try:
        back = load_state(dump_state({"m": state_meta}, scrub))["m"]
        return bool(back == json.loads(meta_json, object_hook=_state_hook))
    except (TypeError, ValueError):
        return False


# JSON text left to _same_metadata's reference comparison: the one-key objects
# _state_hook turns into other values (or fails on), NaN and infinities
_NOT_PLAIN = (b"NaN", b"Infinity", b'"$h"', b'"$bytes"', b'"$b64"')
_TAGS = _NOT_PLAIN[2:]


def _plain_json(text: bytes) -> bool:
    """No _NOT_PLAIN text in `text`: the three tags looked for only where a key (or text)
    starts with "$" at all (three searches of a row's metadata instead of five)."""
    return (b"NaN" not in text and b"Infinity" not in text
            and (b'"$' not in text or not any(v in text for v in _TAGS)))


def _host_of(url: str) -> str:
    rest = url.split("://", 1)[-1]
    host = rest.split("/", 1)[0]
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def fallback_row(p: Pending | Direct, reason: str) -> dict[str, Any]:
    """A minimal row for a record whose full row could not be built (never drop one)."""
    if isinstance(p, Direct):
        return {c: None for c in COLUMN_NAMES} | {
            "id": p.id, "session_id": p.session, "started": micros(p.recorded_at),
            "ended": micros(p.recorded_at), "identity_groups": [], "method": p.method,
            "url": p.url, "outcome": "record_error", "error": reason,
            "findings": cjson({}), "findings_total": 0}
    st = p.state or {}
    req = st.get("request") or {}
    return {c: None for c in COLUMN_NAMES} | {
        "id": _s(st.get("id")) or f"unknown-{time.time_ns()}",
        "session_id": p.session,
        "started": micros(req.get("timestamp_start") or p.recorded_at),
        "ended": micros(p.recorded_at),
        "identity_groups": [],
        "method": _s(req.get("method")) or None,
        "url": p.origin_url,
        "outcome": "record_error",
        "error": reason,
        "findings": cjson({}),
        "findings_total": 0,
    }


# What a row keeps when the full record could not be stored (see the writer's bisect).
_REDUCED_KEEP = frozenset({
    "id", "session_id", "started", "ended", "identity_sub", "identity_iss", "identity_groups",
    "client", "method", "url", "host", "upstream", "upstream_url", "model", "status",
    "outcome", "decision", "rule", "refusal_code", "refusal_step", "error", "approval_id",
    "approval", "findings", "findings_total", "request_size", "response_size", "latency_ms",
    "is_replay"})
_REDUCED_TEXT = 4096  # characters kept of any text column of a reduced row


def reduced_row(row: dict[str, Any], reason: str, minimal: bool = False) -> dict[str, Any]:
    """The row of a flow whose full record the store refused (too large, or one value it
    cannot take): bodies, headers, metadata and flow state dropped, every text cut short,
    with a note saying why. `minimal` keeps only what identifies the flow. Never raises."""
    keep = ({"id", "session_id", "started", "ended", "identity_sub", "method", "url",
             "status", "outcome", "decision", "rule"} if minimal else _REDUCED_KEEP)
    out: dict[str, Any] = {c: None for c in COLUMN_NAMES}
    for c in keep:
        v = row.get(c)
        if isinstance(v, str) and len(v) > _REDUCED_TEXT:
            v = v[:_REDUCED_TEXT]
        out[c] = v
    if c_groups := out.get("identity_groups"):
        out["identity_groups"] = [str(g)[:200] for g in list(c_groups)[:50]]
    else:
        out["identity_groups"] = []
    for c in ("approval", "findings"):
        if out.get(c) is not None and len(out[c]) >= _REDUCED_TEXT:
            out[c] = None  # cut JSON is not JSON
    if out.get("findings") is None:
        out["findings"] = cjson({})
        out["findings_total"] = out.get("findings_total") or 0
    note = f"not stored: {reason}"[:500]
    out["request_body_note"] = note
    out["response_body_note"] = note
    err = row.get("error") if not minimal else None
    out["error"] = (f"{err[:1000]}; " if isinstance(err, str) and err else "") + \
        f"audit record reduced: {reason}"[:500]
    if not out.get("id"):
        out["id"] = f"unknown-{time.time_ns()}"
    if out.get("started") is None:
        out["started"] = micros(time.time())
    if out.get("ended") is None:
        out["ended"] = out["started"]
    return out


def approval_row(row: dict[str, Any]) -> tuple | None:
    if not row.get("approval"):
        return None
    a = json.loads(row["approval"])
    decided = a.get("decided_at")
    requested = a.get("requested_at")
    approvers = a.get("approvers")
    if isinstance(approvers, str):
        approvers = [approvers]
    return (
        _s(a.get("id")) or None, row["id"], row.get("identity_sub"), a.get("rule"),
        micros(requested) if isinstance(requested, int | float) else row["started"],
        micros(decided) if isinstance(decided, int | float) else None,
        a.get("state"), [str(x) for x in approvers or []], a.get("reason"),
        # every vote: who, via (page, api, cli, slack, mitmweb), when, and the reason
        cjson(a["votes"]) if isinstance(a.get("votes"), list) else None,
    )


# ---------------------------------------------------------------- store operations (duckdb)
def storage_version(con: Any) -> tuple[int, ...]:
    """The storage format of the connection's database file ("v1.2.0+" -> (1, 2, 0));
    () when it is not known (in memory, or an unfamiliar tag)."""
    got = con.execute("SELECT tags FROM duckdb_databases() WHERE database_name = "
                      "current_database()").fetchone()
    tag = str((got[0] or {}).get("storage_version", "")) if got else ""
    m = re.match(r"v(\d+)\.(\d+)\.(\d+)", tag)
    return tuple(int(x) for x in m.groups()) if m else ()


def init_schema(con: Any) -> None:
    con.execute(schema_sql(storage_version(con) >= ZSTD_STORAGE))
    # audit DBs written before votes were recorded: add the column (old rows keep NULL)
    con.execute("ALTER TABLE approvals ADD COLUMN IF NOT EXISTS votes JSON")
    # schema 1 DBs: the body reference columns (old rows keep NULL, and hash as before)
    for c, t in REF_COLUMNS:
        con.execute(f"ALTER TABLE flows ADD COLUMN IF NOT EXISTS {c} {t}")
    con.execute(FLOW_BODIES_VIEW)
    con.execute("INSERT OR REPLACE INTO audit_meta VALUES ('schema_version', ?)",
                [str(SCHEMA_VERSION)])


# `SELECT … FROM flow_bodies` gives every record's bodies whole, wherever they are stored
# (inline or content-addressed): the query convenience for schema 2. It reassembles every
# body it returns, so filter on flows first (`WHERE seq IN (SELECT seq FROM flows WHERE …)`).
FLOW_BODIES_VIEW = """
CREATE OR REPLACE VIEW flow_bodies AS
WITH RECURSIVE roots AS (
    SELECT seq, 'request' AS which, request_body_ref AS ref FROM flows
    WHERE request_body_ref IS NOT NULL
    UNION ALL
    SELECT seq, 'response', response_body_ref FROM flows WHERE response_body_ref IS NOT NULL
), chain(seq, which, h, depth) AS (
    SELECT seq, which, ref, 0 FROM roots
    UNION ALL
    SELECT c.seq, c.which, b.prev, c.depth + 1 FROM chain c JOIN blobs b ON b.hash = c.h
    WHERE b.prev IS NOT NULL AND c.depth < 1000000
), pieces AS (
    SELECT c.seq, c.which, c.depth, coalesce(b.data, p.data) AS data, b.data IS NOT NULL AS leaf
    FROM chain c JOIN blobs b ON b.hash = c.h LEFT JOIN blobs p ON p.hash = b.part
), bodies AS (
    SELECT seq, which,
           CASE WHEN bool_or(leaf) THEN first(data) FILTER (WHERE leaf)
                ELSE encode(string_agg(decode(data), '' ORDER BY depth DESC)) END AS body
    FROM pieces GROUP BY seq, which
)
SELECT f.seq, f.id, f.session_id,
       coalesce(f.request_body, rq.body) AS request_body,
       coalesce(f.response_body, rs.body) AS response_body
FROM flows f
LEFT JOIN bodies rq ON rq.seq = f.seq AND rq.which = 'request'
LEFT JOIN bodies rs ON rs.seq = f.seq AND rs.which = 'response'
"""


def head(con: Any) -> tuple[int, str]:
    """(seq, hash) of the last record, or of the last checkpoint, or genesis."""
    r = con.execute("SELECT seq, hash FROM flows ORDER BY seq DESC LIMIT 1").fetchone()
    if r:
        return int(r[0]), r[1]
    c = con.execute("SELECT seq, hash FROM chain_checkpoints ORDER BY seq DESC LIMIT 1"
                    ).fetchone()
    if c:
        return int(c[0]), c[1]
    return 0, GENESIS


def _text(v: str) -> str:
    if v.isascii():  # (a flag of the string object: no copy) the usual case
        return v
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        # undecodable bytes an agent sent (mitmproxy keeps them as lone surrogates, e.g. in
        # a URL path): stored as U+FFFD. Kept as they were, no row holding them could be
        # hashed or stored, and the store would refuse every flow after it (fail closed).
        try:
            return v.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        except UnicodeEncodeError:  # a surrogate that is not an escaped byte
            return v.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return v


def _valid_text(row: dict[str, Any]) -> None:
    """Every text value of the row as valid Unicode (in place)."""
    for c in ALL_NAMES:
        v = row.get(c)
        if isinstance(v, str):
            row[c] = _text(v)
        elif isinstance(v, list | tuple):
            row[c] = [_text(x) if isinstance(x, str) else x for x in v]


def append(con: Any, rows: list[dict[str, Any]], last: tuple[int, str],
           known: BlobCache | None = None,
           marks: Sequence[tuple[str, str]] = (),
           stmts: BatchStatements | None = None) -> tuple[int, str]:
    """Chain and insert rows (and their blobs) in one transaction; returns the new head.
    Mutates rows. `known`: addresses already stored (skipped; this batch's are added once
    it committed). `marks`: (key, value) pairs for `audit_meta`, committed with the rows
    (the writer process's progress: what a restarted one must not write again).
    `stmts`: the connection's prepared INSERTs (the writer's; BatchStatements), else each
    INSERT is bound anew."""
    seq, prev = last
    blobs: dict[str, Blob] = {}
    for row in rows:
        for b in row.get("_blobs") or ():
            if b[0] not in blobs and (known is None or b[0] not in known):
                blobs[b[0]] = b
    approvals = []
    checked = True  # every row's values orjson-safe (rows_doc)
    for row in rows:
        seq += 1
        row["seq"] = seq
        row["prev_hash"] = prev
        lists = [c for c, v in row.items() if isinstance(v, tuple)]
        for c in lists:  # (as _valid_text leaves them)
            row[c] = list(row[c])
        try:
            text, fast = _canonical(row)
        except UnicodeEncodeError:
            # Text that is not valid Unicode is the only thing _valid_text changes, and
            # the canonical form cannot be written with it (orjson refuses a lone
            # surrogate, the json module's text does not encode): fixed only when found,
            # instead of every value of every row looked at first (~15 us a row).
            _valid_text(row)
            text, fast = _canonical(row)
        checked = checked and fast
        row["hash"] = prev = hashlib.sha256(prev.encode() + b"\n" + text).hexdigest()
        a = approval_row(row)
        if a is not None:
            approvals.append(a)
    blob_doc = blobs_json(blobs.values()) if blobs else None
    row_doc, insert_flows = rows_doc(rows, checked)
    # With `known` (the writer's BlobCache), the new blobs go in with a plain INSERT
    # first: INSERT OR IGNORE's conflict handling costs ~2 ms more per 100 blobs, and
    # the blobs sent are those the cache does not know to be stored. One stored all the
    # same (after a restart, or forgotten by the bounded cache) fails the transaction on
    # the primary key: it is written again with INSERT OR IGNORE (the stored blob has the
    # same content: same address), so the rows stored are the same either way; the next
    # `unsure` batches use OR IGNORE at once. Without `known`: OR IGNORE.
    tries = (INSERT_BLOBS,)
    if known is not None:
        if known.unsure:
            known.unsure -= 1
        else:
            tries = (INSERT_NEW_BLOBS, INSERT_BLOBS)
    if stmts is not None and (stmts.con is not con or len(row_doc)
                              + len(blob_doc or "") > BatchStatements.STAGE_MAX):
        # another connection's (the writer reopened its own), or a batch so large that
        # copying it into the stage costs more than binding the INSERTs saves
        stmts = None
    for insert_blobs in tries:
        if stmts is not None:  # (outside the transaction)
            names = (stmts.prepare(insert_blobs, "blobs") if blob_doc is not None else None,
                     stmts.prepare(insert_flows, "flows"))
        con.execute("BEGIN TRANSACTION")
        try:
            if stmts is not None:
                con.execute(STAGE_PUT, [row_doc, blob_doc])
                if names[0] is not None:
                    con.execute(f"EXECUTE {names[0]}")
                got = con.execute(f"EXECUTE {names[1]}").fetchone()
                if got is None or got[0] != len(rows):
                    raise RuntimeError(f"the batch INSERT stored {got} rows, not {len(rows)}")
                con.execute(STAGE_CLEAR)
            else:
                if blob_doc is not None:
                    con.execute(insert_blobs, [blob_doc])
                con.execute(insert_flows, [row_doc])
            if approvals:
                con.executemany(INSERT_APPROVAL, approvals)
            _set_meta(con, dict([("head", f"{seq}:{prev}"), *marks]))
            con.execute("COMMIT")
        except BaseException as e:
            # A failed COMMIT has already rolled back: the ROLLBACK's own error ("no
            # transaction is active") must not hide the reason the write failed.
            with contextlib.suppress(Exception):
                con.execute("ROLLBACK")
            if (insert_blobs is INSERT_NEW_BLOBS and blob_doc is not None
                    and type(e).__name__ == "ConstraintException"):
                assert known is not None
                known.unsure = known.UNSURE_BATCHES
                continue  # a blob already stored: again, skipping those
            raise
        break
    if known is not None and blobs:
        known.add(blobs)
    return seq, prev


def _set_meta(con: Any, meta: dict[str, str]) -> None:
    """Set audit_meta keys (in the caller's transaction). The head and the marks in one
    statement, an UPDATE of the rows when they all exist (every batch but a store's
    first): an upsert's conflict check costs ~1.5 ms of CPU per batch, the UPDATE ~0.9."""
    keys = list(meta)
    got = con.execute(
        "UPDATE audit_meta SET value = CASE key "  # noqa: S608 - placeholders only
        + " ".join(["WHEN ? THEN ?"] * len(keys)) + " END WHERE key IN ("
        + ", ".join(["?"] * len(keys)) + ")",
        [x for kv in meta.items() for x in kv] + keys).fetchone()
    if got is not None and got[0] == len(keys):
        return
    con.execute("INSERT OR REPLACE INTO audit_meta VALUES "  # noqa: S608 - placeholders
                + ", ".join(["(?, ?)"] * len(keys)), [x for kv in meta.items() for x in kv])


def apply_retention(con: Any, days: float, now: float | None = None) -> int:
    """Delete the prefix of records that ended before now - days; keep the chain provable.

    Before deleting, a checkpoint row records the seq and hash of the last purged record;
    verification starts from the newest checkpoint. Returns the number of rows purged.
    """
    if days <= 0:
        return 0
    now = time.time() if now is None else now
    cutoff = micros(now - days * 86400)
    # The first record still inside the window bounds the purgeable prefix: the chain is
    # only ever cut at one point, never in the middle.
    first_kept = con.execute(
        "SELECT min(seq) FROM flows WHERE epoch_us(ended) >= ?", [cutoff]).fetchone()[0]
    if first_kept is None:
        first_kept = (con.execute("SELECT max(seq) FROM flows").fetchone()[0] or 0) + 1
    last = con.execute("SELECT seq, hash FROM flows WHERE seq < ? ORDER BY seq DESC LIMIT 1",
                       [first_kept]).fetchone()
    if last is None:
        return 0
    n = con.execute("SELECT count(*) FROM flows WHERE seq <= ?", [last[0]]).fetchone()[0]
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute("INSERT INTO chain_checkpoints VALUES (?, ?, ?, make_timestamp(?), "
                    "make_timestamp(?))", [last[0], last[1], n, cutoff, micros(now)])
        con.execute("DELETE FROM approvals WHERE flow_id IN "
                    "(SELECT id FROM flows WHERE seq <= ?)", [last[0]])
        con.execute("DELETE FROM flows WHERE seq <= ?", [last[0]])
        con.execute(_BLOB_GC_SQL)
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return int(n)


# Blobs no remaining record reaches (through node chains) are deleted with the purged rows.
_BLOB_GC_SQL = """
DELETE FROM blobs WHERE hash NOT IN (
    WITH RECURSIVE reach(h) AS (
        SELECT request_body_ref FROM flows WHERE request_body_ref IS NOT NULL
        UNION
        SELECT response_body_ref FROM flows WHERE response_body_ref IS NOT NULL
        UNION
        SELECT certs_ref FROM flows WHERE certs_ref IS NOT NULL
        UNION
        SELECT unnest([b.prev, b.part]) FROM reach r JOIN blobs b ON b.hash = r.h
        WHERE b.prev IS NOT NULL OR b.part IS NOT NULL
    )
    SELECT h FROM reach WHERE h IS NOT NULL
)
"""


@dataclass
class VerifyResult:
    ok: bool
    count: int
    head_seq: int
    head_hash: str
    problem: str | None = None
    seq: int | None = None
    id: str | None = None
    checkpoint_seq: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# Records read per query by rows_by_seq (a window of seq numbers).
SEQ_WINDOW = 500


def rows_by_seq(con: Any, select: str, where: str = "TRUE", params: Sequence[Any] = (),
                width: int = SEQ_WINDOW) -> Iterator[tuple[Any, ...]]:
    """The rows of `select` ("SELECT … FROM flows") that match `where`, in seq order, read one
    window of `width` seq numbers at a time. One ORDER BY over the whole table makes DuckDB
    sort every row with all its columns at once: on a store of ~20,000 records that ran out
    of the 64 MB memory_limit (DB_CONFIG), so `audit verify` and `export --all` failed on a
    realistic store (and, asked through the gateway's socket, took the writer's memory). A
    window sorts at most `width` records; gaps in seq (retention, deletions) cost one query
    each, never a walk over the missing numbers."""
    top = (1 << 63) - 1  # BIGINT's largest
    nxt_sql = f"SELECT min(seq) FROM flows WHERE ({where}) AND seq > ?"  # noqa: S608
    win_sql = f"{select} WHERE ({where}) AND seq BETWEEN ? AND ? ORDER BY seq"  # noqa: S608
    nxt = con.execute(f"SELECT min(seq) FROM flows WHERE ({where})",  # noqa: S608
                      list(params)).fetchone()[0]
    while nxt is not None:
        lo = int(nxt)
        hi = lo + width - 1 if lo <= top - width else top
        yield from con.execute(win_sql, [*params, lo, hi]).fetchall()
        if hi == top:
            break
        nxt = con.execute(nxt_sql, [*params, hi]).fetchone()[0]
    # last, as ORDER BY seq puts them (NULLS LAST): records without a seq (an edited file)
    yield from con.execute(f"{select} WHERE ({where}) AND seq IS NULL", list(params)  # noqa: S608
                           ).fetchall()


def verify(con: Any, chunk: int = SEQ_WINDOW) -> VerifyResult:
    """Walk the chain by seq from the newest checkpoint; stop at the first bad record."""
    ck = con.execute("SELECT seq, hash FROM chain_checkpoints ORDER BY seq DESC LIMIT 1"
                     ).fetchone()
    exp_seq, exp_prev = (int(ck[0]) + 1, ck[1]) if ck else (1, GENESIS)
    ck_seq = int(ck[0]) if ck else 0
    rows = rows_by_seq(con, f"SELECT {_verify_select(con)} FROM flows",  # noqa: S608
                       width=chunk)
    count = 0
    last_seq, last_hash = exp_seq - 1, exp_prev

    def fail(problem: str, row: dict[str, Any] | None) -> VerifyResult:
        return VerifyResult(False, count, last_seq, last_hash, problem,
                            row["seq"] if row else None, row["id"] if row else None, ck_seq)

    for values in rows:
        row = dict(zip(ALL_NAMES, values, strict=True))
        if isinstance(row.get("identity_groups"), tuple):
            row["identity_groups"] = list(row["identity_groups"])
        if chain_hash(row["prev_hash"] or "", row) != row["hash"]:
            return fail(f"edited: record seq {row['seq']} (id {row['id']}) does not match "
                        "its hash", row)
        if row["prev_hash"] != exp_prev:
            where = con.execute("SELECT seq FROM flows WHERE hash = ?",
                                [row["prev_hash"]]).fetchone()
            if where is not None:
                return fail(f"reordered: record seq {row['seq']} (id {row['id']}) follows "
                            f"seq {last_seq} but was chained after seq {where[0]}", row)
            if row["seq"] != exp_seq:
                return fail(f"deleted: records seq {exp_seq}..{row['seq'] - 1} are missing "
                            f"before record seq {row['seq']} (id {row['id']})", row)
            return fail(f"edited or deleted: the record before seq {row['seq']} "
                        f"(id {row['id']}) is not the one it was chained to (rewritten "
                        "with a recomputed hash, or replaced)", row)
        if row["seq"] != exp_seq:
            return fail(f"renumbered: record seq {row['seq']} (id {row['id']}) expected "
                        f"seq {exp_seq}", row)
        count += 1
        last_seq, last_hash = row["seq"], row["hash"]
        exp_seq, exp_prev = row["seq"] + 1, row["hash"]
    meta = con.execute("SELECT value FROM audit_meta WHERE key = 'head'").fetchone()
    if meta and meta[0]:
        h_seq, _, h_hash = meta[0].partition(":")
        if int(h_seq) != last_seq or (int(h_seq) > ck_seq and h_hash != last_hash):
            return VerifyResult(False, count, last_seq, last_hash,
                                f"deleted: the chain ends at seq {last_seq} but the writer's head "
                                f"is seq {h_seq} (records removed from the end)", None, None,
                                ck_seq)
    bad, bad_seq, bad_id = _blobs_problem(con)
    if bad:
        return VerifyResult(False, count, last_seq, last_hash, bad, bad_seq, bad_id, ck_seq)
    bad = _approvals_mismatch(con)
    if bad:
        return VerifyResult(False, count, last_seq, last_hash, bad, None, None, ck_seq)
    return VerifyResult(True, count, last_seq, last_hash, None, None, None, ck_seq)


def _columns(con: Any, table: str) -> set[str]:
    return {r[0] for r in con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = ?",
        [table]).fetchall()}


def _verify_select(con: Any) -> str:
    """SELECT_FOR_VERIFY, with NULL for the columns a schema-1 file opened read-only (not
    migrated) does not have yet."""
    have = _columns(con, "flows")
    if all(c in have for c in REF_NAMES):
        return SELECT_FOR_VERIFY_ALL
    return ", ".join(f"epoch_us({c}) AS {c}" if c in TIMESTAMP_COLUMNS
                     else (c if c in have else f"NULL AS {c}") for c in ALL_NAMES)


def _blobs_problem(con: Any, chunk: int = 2000) -> tuple[str | None, int | None, str | None]:
    """Every blob's content matches its address, and every address a record or a node
    refers to is stored. (problem, seq, id) or (None, None, None)."""
    if not _columns(con, "blobs"):
        return None, None, None  # a schema-1 file: no body is stored by reference
    cur = con.execute("SELECT hash, data, prev, part FROM blobs")
    while batch := cur.fetchmany(chunk):
        for h, data, prev, part in batch:
            if data is not None:
                ok = prev is None and part is None and leaf_address(bytes(data)) == h
            else:
                ok = part is not None and node_address(prev, part) == h
            if not ok:
                return (f"edited: blob {h} does not match its address (its content was "
                        "changed)"), None, None
    have = _columns(con, "flows")
    named = [f"SELECT seq, '{what}' AS which, {c} AS ref FROM flows"  # noqa: S608
             for c, what in (("request_body_ref", "request body"),
                             ("response_body_ref", "response body"),
                             ("certs_ref", "certificates")) if c in have]
    if named:  # (a schema-2 file read-only has no certs_ref column)
        r = con.execute(
            f"SELECT f.seq, f.id, r.which, r.ref FROM flows f, ({' UNION ALL '.join(named)}) r "  # noqa: S608
            "WHERE r.seq = f.seq AND r.ref IS NOT NULL AND r.ref NOT IN (SELECT hash FROM "
            "blobs) ORDER BY f.seq LIMIT 1").fetchone()
        if r:
            return (f"missing: blob {r[3]} ({r[2]} of record seq {r[0]}, id {r[1]}) is "
                    "not in the store"), r[0], r[1]
    r = con.execute(
        "SELECT b.hash, x.ref FROM blobs b, (SELECT hash, prev AS ref FROM blobs UNION ALL "
        "SELECT hash, part FROM blobs) x WHERE x.hash = b.hash AND x.ref IS NOT NULL AND "
        "x.ref NOT IN (SELECT hash FROM blobs) LIMIT 1").fetchone()
    if r:
        return f"missing: blob {r[1]} (a part of blob {r[0]}) is not in the store", None, None
    return None, None, None


def _approvals_mismatch(con: Any) -> str | None:
    """The approvals table is derived from flows.approval (which is hashed): compare."""
    # an old DB opened read-only may not have the votes column: compare it where it exists
    has_votes = con.execute("SELECT count(*) FROM information_schema.columns WHERE "
                            "table_name = 'approvals' AND column_name = 'votes'").fetchone()[0]
    rows = con.execute(
        "SELECT a.id, a.flow_id, a.decision, a.approvers, a.reason, a.rule, f.approval, "
        + ("a.votes " if has_votes else "NULL ")
        + "FROM approvals a LEFT JOIN flows f ON f.id = a.flow_id").fetchall()
    for aid, flow_id, decision, approvers, reason, rule, approval, votes in rows:
        if approval is None:
            return f"edited: approval {aid} refers to flow {flow_id}, which has no approval"
        a = json.loads(approval)
        want_approvers = a.get("approvers")
        if isinstance(want_approvers, str):
            want_approvers = [want_approvers]
        if (decision != a.get("state") or list(approvers or []) != [str(x) for x in
                                                                   want_approvers or []]
                or reason != a.get("reason") or rule != a.get("rule")
                or (_s(a.get("id")) or None) != aid
                or (has_votes and (json.loads(votes) if votes else None)
                    != (a["votes"] if isinstance(a.get("votes"), list) else None))):
            return f"edited: approval {aid} (flow {flow_id}) differs from the hashed flow record"
    return None


SESSIONS_SQL = """
SELECT session_id,
       min(started) AS first_seen, max(ended) AS last_seen,
       count(*) AS flows,
       count(*) FILTER (WHERE outcome = 'refused' OR decision = 'block') AS blocks,
       count(*) FILTER (WHERE approval_id IS NOT NULL) AS holds,
       coalesce(sum(findings_total), 0) AS findings,
       count(*) FILTER (WHERE outcome IN ('error', 'killed')) AS errors,
       string_agg(DISTINCT identity_sub, ',') AS identities
FROM flows
WHERE (? IS NULL OR ended >= make_timestamp(?))
GROUP BY session_id
ORDER BY last_seen DESC
LIMIT ?
"""


def sessions(con: Any, limit: int = 50, since: float | None = None) -> tuple[list[str], list]:
    us = micros(since)
    cur = con.execute(SESSIONS_SQL, [us, us, limit])
    return [d[0] for d in cur.description], cur.fetchall()


def export_rows(con: Any, session: str | None, since: float | None = None
                ) -> list[tuple[str, str | None, bytes]]:
    """(id, url as the agent asked, flow_state) of a session's flows, in recorded order;
    each state whole again (bodies put back from their columns or blobs: see resolve_state)."""
    rows, after = export_page(con, session, since)
    while after is not None:
        more, after = export_page(con, session, since, after)
        rows += more
    return rows


# Flows per page of an export (one request to the gateway's socket, one read of the file).
EXPORT_PAGE = 500


def export_page(con: Any, session: str | None, since: float | None = None,
                after: int | None = None, limit: int = EXPORT_PAGE
                ) -> tuple[list[tuple[str, str | None, bytes]], int | None]:
    """One page of export_rows: the flows after seq `after`, about `limit` of them (a page
    ends where seq changes, so flows of several replicas sharing a seq in the lake are never
    split), and the seq to continue after (None: that was the last page). Reading the whole
    session in one query sorted every row at once (see rows_by_seq), and answering it in one
    message held every state in the gateway's writer process. Records without a seq (an
    edited file) come last, as rows_by_seq gives them: a page that reaches them takes them
    all (no page is cut inside them), and `after` never leaves them out (a page never
    yields one before a numbered record, so none is given twice)."""
    us = micros(since)
    have = _columns(con, "flows")
    refs = ", ".join(c if c in have else f"NULL AS {c}" for c in REF_NAMES)
    select = ("SELECT seq, id, url, flow_state, request_body, response_body, metadata, "  # noqa: S608
              f"request_headers, response_headers, {refs} FROM flows")
    where = ("(? IS NULL OR session_id = ?) AND (? IS NULL OR ended >= make_timestamp(?)) "
             "AND flow_state IS NOT NULL AND (? IS NULL OR seq > ? OR seq IS NULL)")
    out: list[tuple[str, str | None, bytes]] = []
    last = None
    for seq, fid, url, blob, rq, rs, meta, rq_h, rs_h, rq_ref, rs_ref, c_ref in rows_by_seq(
            con, select, where, [session, session, us, us, after, after]):
        if len(out) >= max(1, limit) and seq != last:
            return out, last
        last = seq
        out.append((fid, url, resolve_state(con, blob, {"request": (rq, rq_ref),
                                                        "response": (rs, rs_ref)}, meta,
                                            {"request": rq_h, "response": rs_h},
                                            read_blob(con, c_ref) if c_ref else None)))
    return out, None


def row_state(row: dict[str, Any], con: Any = None) -> dict[str, Any]:
    """The whole flow state of a row (as built, or read with its body columns and refs)."""
    blobs = {b[0]: b for b in row.get("_blobs") or ()}

    def certs(ref: str | None) -> bytes | None:
        if not ref:
            return None
        return blob_content(blobs, ref) if con is None else read_blob(con, ref)

    def body(part: str) -> tuple[Any, str | None]:
        ref = row.get(f"{part}_body_ref")
        if ref and con is None:
            return blob_content(blobs, ref), None
        return row.get(f"{part}_body"), ref

    return load_state(resolve_state(con, row["flow_state"],
                                    {"request": body("request"), "response": body("response")},
                                    row.get("metadata"),
                                    {"request": row.get("request_headers"),
                                     "response": row.get("response_headers")},
                                    certs(row.get("certs_ref"))))


def row_body(row: dict[str, Any], part: str) -> bytes | None:
    """A built row's request or response body as stored (inline, or from its new blobs)."""
    ref = row.get(f"{part}_body_ref")
    if ref:
        return blob_content({b[0]: b for b in row.get("_blobs") or ()}, ref)
    return row.get(f"{part}_body")


def blob_content(blobs: dict[str, Blob], addr: str) -> bytes:
    """The content at addr from a mapping of blobs (hash -> Blob); raises BlobMissing."""
    parts: list[bytes] = []
    h: str | None = addr
    while h is not None:
        b = blobs.get(h)
        if b is None:
            raise BlobMissing(f"blob {h} is not in the store")
        if b[1] is not None:
            parts.append(b[1])
            break
        leaf = blobs.get(b[3] or "")
        if leaf is None or leaf[1] is None:
            raise BlobMissing(f"blob {b[3]} (a part of {h}) is not in the store")
        parts.append(leaf[1])
        h = b[2]
    return b"".join(reversed(parts))


def resolve_state(con: Any, blob: bytes, bodies: dict[str, tuple[Any, str | None]],
                  metadata: str | None = None,
                  headers: dict[str, str | None] | None = None,
                  certs: bytes | None = None) -> bytes:
    """A stored flow state with each `{"$body": part}` content replaced by that record's
    body (inline column, else reassembled from its blobs), and a `{"$metadata": "column"}`
    by the record's `metadata` column: exactly what was recorded."""
    raw = bytes(blob)
    if (b'"$body"' not in raw and b'"$metadata"' not in raw and b'"$headers"' not in raw
            and b'"$certs"' not in raw):
        return raw  # schema 1, or nothing stored by reference
    st = load_state(raw)
    for conn in ("client_conn", "server_conn"):
        c = st.get(conn)
        if isinstance(c, dict) and c.get("certificate_list") == CERTS_MARK:
            if certs is None:
                raise BlobMissing(f"the certificates of flow {st.get('id')} are not stored")
            c["certificate_list"] = load_state(certs)[conn]
    for part in ("request", "response"):
        msg = st.get(part)
        if isinstance(msg, dict) and msg.get("headers") == HEADERS_MARK:
            col = (headers or {}).get(part)
            if col is None:
                raise BlobMissing(f"the {part} headers of flow {st.get('id')} are not stored")
            msg["headers"] = [[k.encode("latin-1"), v.encode("latin-1")]
                              for k, v in json.loads(col)]
    if st.get("metadata") == METADATA_MARK:
        if metadata is None:
            raise BlobMissing(f"the metadata of flow {st.get('id')} is not stored")
        st["metadata"] = json.loads(metadata, object_hook=_state_hook)
    for part, (inline, ref) in bodies.items():
        msg = st.get(part)
        if isinstance(msg, dict) and msg.get("content") == {"$body": part}:
            if inline is not None:
                msg["content"] = bytes(inline)
            elif ref is not None:
                msg["content"] = read_blob(con, ref)
            else:
                raise BlobMissing(f"the {part} body of flow {st.get('id')} is not stored")
    return dump_state(st, Scrubber())


READ_ONLY_TYPES = ("SELECT", "EXPLAIN")


def check_read_only(con: Any, sql: str) -> None:
    """Raise ValueError unless every statement in sql only reads (SELECT/EXPLAIN/DESCRIBE)."""
    try:
        stmts = con.extract_statements(sql)
    except Exception as e:  # noqa: BLE001 - duckdb parser errors have several types
        raise ValueError(f"cannot parse query: {e}") from None
    if not stmts:
        raise ValueError("empty query")
    for s in stmts:
        name = getattr(s.type, "name", str(s.type))
        if name not in READ_ONLY_TYPES:
            raise ValueError(f"only read-only queries are allowed (got {name})")


def run_query(con: Any, sql: str, max_rows: int = 100_000) -> tuple[list[str], list]:
    """Run a read-only query (checked), returning (columns, rows) of the last statement."""
    check_read_only(con, sql)
    stmts = con.extract_statements(sql)
    cur = None
    for s in stmts:
        cur = con.execute(s.query)
    assert cur is not None
    cols = [d[0] for d in cur.description] if cur.description else []
    return cols, cur.fetchmany(max_rows)


def to_jsonable(v: Any) -> Any:
    if isinstance(v, bytes | bytearray | memoryview):
        return {"$b64": base64.b64encode(bytes(v)).decode()}
    if isinstance(v, datetime.datetime | datetime.date | datetime.time):
        return v.isoformat()
    if isinstance(v, list | tuple):
        return [to_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): to_jsonable(x) for k, x in v.items()}
    if v is None or isinstance(v, bool | int | float | str):
        return v
    return str(v)


def from_jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        if set(v) == {"$b64"}:
            return base64.b64decode(v["$b64"])
        return {k: from_jsonable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [from_jsonable(x) for x in v]
    return v
